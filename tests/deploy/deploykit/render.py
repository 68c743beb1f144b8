"""Render kustomizations with `kubectl kustomize` and load YAML documents."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .tools import DEPLOY, kubectl

Doc = dict[str, Any]
# With the ML namespaces' policies (components/namespace-policies).
FULL_OVERLAYS = ("dev", "production")
# The service and one CUSTOM policy (sidecar selector, or the ambient waypoint).
MINIMAL_OVERLAYS = ("minimal", "minimal-ambient")
OVERLAYS = FULL_OVERLAYS + MINIMAL_OVERLAYS

# Kinds served by Kubernetes itself (validated with kubernetes-validate); everything else is
# a CRD kind validated elsewhere.
BUILTIN_GROUPS = {"", "apps", "policy", "autoscaling", "networking.k8s.io", "batch"}


def group_of(doc: Doc) -> str:
    api = str(doc.get("apiVersion", ""))
    return api.split("/")[0] if "/" in api else ""


def is_builtin(doc: Doc) -> bool:
    return group_of(doc) in BUILTIN_GROUPS


def load_docs(text: str, source: str) -> list[Doc]:
    docs = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise AssertionError(f"{source}: a document is a {type(doc).__name__}, not a mapping")
        docs.append(doc)
    return docs


def kustomize(path: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize build {path} failed:\n{result.stderr}")
    return result.stdout


@cache
def _render_cached(path: str) -> str:
    return kustomize(Path(path))


def render(target: str | Path) -> list[Doc]:
    """Render an overlay name ("dev") or a kustomization directory."""
    path = DEPLOY / "overlays" / target if isinstance(target, str) else target
    return load_docs(_render_cached(str(path)), str(path))


def render_with_components(overlay: str, components: Iterable[str]) -> list[Doc]:
    """An overlay with more components (names under deploy/components), as a user adds them to
    the overlay's `components:`: rendered from a kustomization in a temporary directory."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        def rel(path: Path) -> str:  # kustomize refuses absolute paths
            return os.path.relpath(path, tmp)

        lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
                 "resources:", f"  - {rel(DEPLOY / 'overlays' / overlay)}", "components:"]
        lines += [f"  - {rel(DEPLOY / 'components' / c)}" for c in components]
        (Path(tmp) / "kustomization.yaml").write_text("\n".join(lines) + "\n")
        return load_docs(kustomize(Path(tmp)), f"{overlay} + {', '.join(components)}")


def values(overlay: str) -> dict[str, Any]:
    """The overlay's values.yaml (InstallValues `spec`): what the user sets in one place."""
    doc = yaml.safe_load((DEPLOY / "overlays" / overlay / "values.yaml").read_text())
    assert doc["kind"] == "InstallValues", doc["kind"]
    return dict(doc["spec"])


def render_variant(overlay: str, values_changes: dict[str, Any] | None = None,
                   components: dict[str, str | None] | None = None) -> list[Doc]:
    """The overlay as a user would edit it: a copy with some values.yaml entries changed and
    some components replaced (name -> other name, or None to drop it), rendered from a
    temporary directory (its relative paths rewritten to point at deploy/ again)."""
    import os
    import shutil
    import tempfile

    source = DEPLOY / "overlays" / overlay
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(source, root, dirs_exist_ok=True)
        kust = yaml.safe_load((root / "kustomization.yaml").read_text())

        def rel(entry: str) -> str:
            if not entry.startswith(".."):
                return entry
            return os.path.relpath((source / entry).resolve(), root)

        swapped = []
        for entry in kust.get("components", []):
            name = Path(entry).name
            if components and name in components:
                if components[name] is None:
                    continue
                entry = f"../../components/{components[name]}"
            swapped.append(rel(entry))
        kust["components"] = swapped
        kust["resources"] = [rel(e) for e in kust.get("resources", [])]
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kust, sort_keys=False))
        if values_changes:
            doc = yaml.safe_load((root / "values.yaml").read_text())
            doc["spec"].update(values_changes)
            (root / "values.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        return load_docs(kustomize(root), f"{overlay} (edited copy)")


def find(docs: Iterable[Doc], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[Doc]:
    out = []
    for d in docs:
        meta = d.get("metadata", {})
        if d.get("kind") != kind:
            continue
        if name is not None and meta.get("name") != name:
            continue
        if namespace is not None and meta.get("namespace") != namespace:
            continue
        out.append(d)
    return out


def one(docs: Iterable[Doc], kind: str, name: str, namespace: str | None = None) -> Doc:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def ref(doc: Doc) -> str:
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')}/{meta.get('namespace', '-')}/{meta.get('name')}"
