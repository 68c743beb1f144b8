"""Fixtures for the deploy/ tests. Rendering and the external tools run once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deploykit import render
from deploykit.tools import DEPLOY


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[render.Doc]]:
    """Each overlay's `kustomize build` output, as documents."""
    return {overlay: render.render(overlay) for overlay in render.OVERLAYS}


@pytest.fixture(scope="session")
def readme() -> str:
    return (DEPLOY / "README.md").read_text(encoding="utf-8")
