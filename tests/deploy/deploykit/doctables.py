"""Read the tables in deploy/README.md that tests compare with the manifests.

A table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; cells are split on `|`,
and backticks are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from .netpol import Endpoint, Model, format_ports

ALL_OVERLAYS = "all"


def table(markdown: str, name: str) -> list[dict[str, str]]:
    m = re.search(rf"<!-- {re.escape(name)}:begin -->\n(.*?)<!-- {re.escape(name)}:end -->",
                  markdown, re.S)
    if m is None:
        raise AssertionError(f"table {name!r} not found in the deploy guide")
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:  # lines[1] is the |---| separator
        cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            raise AssertionError(f"table {name!r}: row {line!r} has {len(cells)} cells")
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _labels(text: str) -> dict[str, str]:
    if text in ("", "-", "(none)"):
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise AssertionError(f"label {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def endpoints(markdown: str) -> list[Endpoint]:
    out = []
    for row in table(markdown, "reachability-endpoints"):
        ns = row["Namespace"]
        if ns in ("", "-"):
            out.append(Endpoint(name=row["Endpoint"], ip=row["Address"]))
        else:
            out.append(Endpoint(name=row["Endpoint"], namespace=ns,
                                namespace_labels=_labels(row["Namespace labels"]),
                                labels=_labels(row["Pod labels"])))
    return out


Row = tuple[str, str, str, str]  # from, to, ports, overlays


def computed_rows(eps: list[Endpoint], models: dict[str, Model]) -> set[Row]:
    """Every allowed (from, to) pair with at least one side in a policy-managed namespace."""
    per_overlay: dict[tuple[str, str, str], list[str]] = {}
    for overlay, model in models.items():
        managed = model.namespaces()
        for src in eps:
            for dst in eps:
                if src.namespace not in managed and dst.namespace not in managed:
                    continue
                ports = format_ports(model.reach(src, dst))
                if ports:
                    per_overlay.setdefault((src.name, dst.name, ports), []).append(overlay)
    rows = set()
    for (src, dst, ports), overlays in per_overlay.items():
        label = ALL_OVERLAYS if len(overlays) == len(models) else ", ".join(sorted(overlays))
        rows.add((src, dst, ports, label))
    return rows


def documented_rows(markdown: str) -> set[Row]:
    return {(r["From"], r["To"], r["Ports"], r["Overlays"])
            for r in table(markdown, "reachability")}


def as_markdown(rows: set[Row]) -> str:
    lines = ["| From | To | Ports | Overlays |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in sorted(rows)]
    return "\n".join(lines)


def readme(path: Path) -> str:
    return path.read_text(encoding="utf-8")
