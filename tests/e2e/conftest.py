"""Fixtures for the end-to-end suite (marker `envoy`): Envoy binary, keys, a work directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.demo.processes import WorkDir
from authz.mesh.envoy_binary import EnvoyNotFound, find_envoy

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
