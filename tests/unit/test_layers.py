"""Imports point one way (docs/architecture.md): every `authz` import, at module level or inside
a function, goes to the same layer or a lower one, never up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "authz"

# Lowest first. A module belongs to the first prefix that matches it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("authz.errors", "authz.jwa", "authz.redact", "authz.log_throttle")),
    ("config", ("authz.config",)),
    # The core, itself in order: leaves first, the pipeline on top.
    ("core: leaves", ("authz.paths", "authz.tokens", "authz.buckets")),
    ("core: quota", ("authz.quota",)),
    ("core: decision", ("authz.decision",)),
    ("core: pipeline", ("authz.pipeline",)),
    ("edges", ("authz.telemetry", "authz.server", "authz.mesh", "authz.service_config",
               "authz.quota_tool")),
    ("commands", ("authz.cli", "authz.demo", "authz.__main__", "authz")),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every authz import in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("authz")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("authz"):
                out.append((node.lineno, target))
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_point_down(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    upward = [f"line {line}: {target} ({LAYERS[layer_of(target)][0]})"
              for line, target in imports(path) if layer_of(target) > mine]
    assert not upward, f"{me} ({LAYERS[mine][0]}) imports upward: {upward}"


def test_stores_take_plain_arguments() -> None:
    """The bucket stores know nothing of the service's settings (limitador's storage habit)."""
    for path in (PACKAGE / "buckets").glob("*.py"):
        targets = [t for _, t in imports(path)]
        assert "authz.config.settings" not in targets, path.name
