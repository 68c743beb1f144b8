"""Fixtures for the tests that start `authz` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.authz_process import Proc
from tests.support.issuer import TestIssuer


@pytest.fixture
def issuer(tmp_path: Path) -> TestIssuer:
    return TestIssuer(tmp_path / "idp")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes (or anything with stop()) stopped when the test ends, whatever happens."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
