"""Fixtures for the end-to-end suite (marker `envoy`): Envoy binary, keys, a work directory."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.demo.processes import WorkDir
from authz.errors import EnvoyNotFound
from authz.mesh.envoy_binary import find_envoy

from .harness import Keys


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    try:
        return find_envoy()
    except EnvoyNotFound as exc:
        # Fail, not skip: a suite that silently skips its Envoy tests proves nothing.
        pytest.fail(f"{exc} (or deselect these tests with -m 'not envoy')", pytrace=False)


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    """Configs and logs of one test module; KEEP_E2E_LOGS=1 keeps them for a post-mortem."""
    wd = WorkDir()
    try:
        yield wd.path
    finally:
        wd.cleanup()


@pytest.fixture(scope="module")
def keys(work_dir: Path) -> Keys:
    return Keys(work_dir)


# On a failure, the end of every component's log (service, Envoy, Redis) goes into the report:
# in CI that is the only post-mortem there is.
LOG_TAIL_LINES = 30


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.when not in ("setup", "call") or not report.failed:
        return
    work = getattr(item, "funcargs", {}).get("work_dir")
    if not isinstance(work, Path):
        return
    for log in sorted(work.rglob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        report.sections.append((f"log {log.relative_to(work)}", "\n".join(lines)))
