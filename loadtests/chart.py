"""Charts of load-test runs, as SVG: a benchmark run (checks/s and light-load p99 per server,
one bar per round), or a locust run over time (requests/s, users, response-time percentiles).

    python -m loadtests.chart loadtests/results/bench-<time>.json --out docs/images/bench.svg
    python -m loadtests.chart --locust loadtests/results/grpc_stats_history.csv \
        --out docs/images/locust-grpc.svg

Reads the JSON `python -m loadtests.bench` writes and draws an SVG (no plotting library: the
file is small, diffable and shown by any Markdown viewer). Each server gets one group of bars,
one bar per round in the order the rounds ran, so the spread between rounds -- how noisy the
machine was -- is visible next to the medians the bench reports.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

# Colours per round (Okabe-Ito: readable for the common colour-vision deficiencies).
ROUND_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
PANEL_W, PANEL_H = 900, 260
MARGIN_L, MARGIN_T, MARGIN_B = 70, 40, 90


def _nice_max(value: float) -> float:
    """The smallest 1/2/5 x 10^k at or above value (the y axis's top)."""
    if value <= 0:
        return 1.0
    k = 1.0
    while k * 10 <= value:
        k *= 10
    while k > value:
        k /= 10
    for step in (1, 2, 5, 10):
        if k * step >= value:
            return k * step
    return k * 10


def _label(v: float) -> str:
    """An axis or bar label: whole thousands with separators, small values to 3 digits."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _panel(series: dict[str, list[float]], title: str, unit: str, top: float) -> list[str]:
    """One bar panel; `series`: server -> value per round. `top`: y offset of the panel."""
    out: list[str] = []
    names = list(series)
    peak = _nice_max(max((v for vs in series.values() for v in vs), default=1.0))
    plot_w = PANEL_W - MARGIN_L - 20
    plot_h = PANEL_H - MARGIN_T - MARGIN_B
    y0 = top + MARGIN_T + plot_h
    out.append(f'<text x="{MARGIN_L}" y="{top + 22}" font-size="15" font-weight="bold">'
               f'{escape(title)}</text>')
    for i in range(5):  # grid and y labels
        v = peak * i / 4
        y = y0 - plot_h * i / 4
        out.append(f'<line x1="{MARGIN_L}" y1="{y:.1f}" x2="{MARGIN_L + plot_w}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN_L - 6}" y="{y + 4:.1f}" font-size="11" '
                   f'text-anchor="end">{_label(v)}</text>')
    out.append(f'<text x="14" y="{top + MARGIN_T + plot_h / 2:.1f}" font-size="11" '
               f'transform="rotate(-90 14 {top + MARGIN_T + plot_h / 2:.1f})" '
               f'text-anchor="middle">{escape(unit)}</text>')
    group_w = plot_w / max(1, len(names))
    for g, name in enumerate(names):
        values = series[name]
        bar_w = min(18.0, (group_w * 0.8) / max(1, len(values)))
        x_start = MARGIN_L + g * group_w + (group_w - bar_w * len(values)) / 2
        for r, v in enumerate(values):
            h = plot_h * v / peak
            x = x_start + r * bar_w
            colour = ROUND_COLOURS[r % len(ROUND_COLOURS)]
            out.append(f'<rect x="{x:.1f}" y="{y0 - h:.1f}" width="{bar_w - 1:.1f}" '
                       f'height="{h:.1f}" fill="{colour}"><title>{escape(name)} round '
                       f'{r + 1}: {v:,.4g} {escape(unit)}</title></rect>')
        if values:
            median = statistics.median(values)
            y = y0 - plot_h * median / peak
            out.append(f'<line x1="{x_start - 2:.1f}" y1="{y:.1f}" '
                       f'x2="{x_start + bar_w * len(values) + 1:.1f}" y2="{y:.1f}" '
                       'stroke="#000" stroke-width="1.5"/>')
            # The median in figures above the group: a short bar beside a tall one stays
            # readable (the HTTP floor is ~30x the gRPC one).
            label_y = y0 - plot_h * max(values) / peak - 5
            out.append(f'<text x="{x_start + bar_w * len(values) / 2:.1f}" y="{label_y:.1f}" '
                       f'font-size="11" text-anchor="middle">{_label(median)}</text>')
        cx = MARGIN_L + g * group_w + group_w / 2
        out.append(f'<text x="{cx:.1f}" y="{y0 + 14}" font-size="11" text-anchor="end" '
                   f'transform="rotate(-35 {cx:.1f} {y0 + 14})">{escape(name)}</text>')
    return out


def render_svg(report: dict[str, Any]) -> str:
    results = report["results"]
    rps = {name: [run["rps"] for run in r["runs"]] for name, r in results.items()}
    p99 = {name: [light["p99_ms"] for light in r["lights"]] for name, r in results.items()}
    rounds = max((len(v) for v in rps.values()), default=0)
    height = 2 * PANEL_H + 40
    opts = report.get("options", {})
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_W}" height="{height}" '
        f'viewBox="0 0 {PANEL_W} {height}" font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="#fff"/>',
        *_panel(rps, f"Closed-loop throughput (h2load -c {opts.get('connections', '?')} -m "
                     f"{opts.get('streams', '?')}), one bar per round, line = median",
                "checks/s", 0),
        *_panel(p99, f"Latency p99 at a light open-loop rate (~{opts.get('light_rate', 0):g}/s "
                     "nominal), one bar per round, line = median", "p99 ms", PANEL_H),
    ]
    legend_y = 2 * PANEL_H + 22
    for r in range(rounds):
        x = MARGIN_L + r * 90
        parts.append(f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" '
                     f'fill="{ROUND_COLOURS[r % len(ROUND_COLOURS)]}"/>')
        parts.append(f'<text x="{x + 16}" y="{legend_y}" font-size="12">round {r + 1}</text>')
    started = escape(str(report.get("started", "")))
    parts.append(f'<text x="{PANEL_W - 10}" y="{legend_y}" font-size="11" text-anchor="end">'
                 f'python -m loadtests.bench, {started}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


LINE_COLOURS = ("#0072B2", "#E69F00", "#D55E00", "#009E73")


def _lines(xs: list[float], series: dict[str, list[float | None]], title: str, unit: str,
           top: float) -> list[str]:
    """One line panel over time (xs in seconds from the start); None values are gaps."""
    out: list[str] = []
    plot_w = PANEL_W - MARGIN_L - 20
    plot_h = PANEL_H - MARGIN_T - 50
    y0 = top + MARGIN_T + plot_h
    peak = _nice_max(max((v for vs in series.values() for v in vs if v is not None),
                         default=1.0))
    span = max(xs[-1] if xs else 1.0, 1.0)
    out.append(f'<text x="{MARGIN_L}" y="{top + 22}" font-size="15" font-weight="bold">'
               f'{escape(title)}</text>')
    for i in range(5):
        v = peak * i / 4
        y = y0 - plot_h * i / 4
        out.append(f'<line x1="{MARGIN_L}" y1="{y:.1f}" x2="{MARGIN_L + plot_w}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN_L - 6}" y="{y + 4:.1f}" font-size="11" '
                   f'text-anchor="end">{v:,.4g}</text>')
    for i in range(6):
        t = span * i / 5
        x = MARGIN_L + plot_w * i / 5
        out.append(f'<text x="{x:.1f}" y="{y0 + 16}" font-size="11" '
                   f'text-anchor="middle">{t:.0f} s</text>')
    out.append(f'<text x="14" y="{top + MARGIN_T + plot_h / 2:.1f}" font-size="11" '
               f'transform="rotate(-90 14 {top + MARGIN_T + plot_h / 2:.1f})" '
               f'text-anchor="middle">{escape(unit)}</text>')
    for k, (name, values) in enumerate(series.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        points = [f"{MARGIN_L + plot_w * x / span:.1f},{y0 - plot_h * v / peak:.1f}"
                  for x, v in zip(xs, values, strict=True) if v is not None]
        if points:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                       f'points="{" ".join(points)}"><title>{escape(name)}</title></polyline>')
        lx = MARGIN_L + 10 + k * 130
        out.append(f'<rect x="{lx}" y="{y0 + 26}" width="12" height="4" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="{y0 + 32}" font-size="12">{escape(name)}</text>')
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # locust writes N/A before the first response
        return None


def render_locust_svg(rows: list[dict[str, str]], source: str) -> str:
    """From locust's --csv PREFIX_stats_history.csv (its "Aggregated" rows)."""
    agg = [r for r in rows if r.get("Name") == "Aggregated"]
    if not agg:
        raise ValueError("no Aggregated rows: is this a locust _stats_history.csv?")
    t0 = float(agg[0]["Timestamp"])
    xs = [float(r["Timestamp"]) - t0 for r in agg]
    rate = {"requests/s": [_number(r["Requests/s"]) for r in agg],
            "failures/s": [_number(r["Failures/s"]) for r in agg],
            "users": [_number(r["User Count"]) for r in agg]}
    times = {f"p{q}": [_number(r[f"{q}%"]) for r in agg] for q in ("50", "95", "99")}
    height = 2 * PANEL_H + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_W}" height="{height}" '
        f'viewBox="0 0 {PANEL_W} {height}" font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="#fff"/>',
        *_lines(xs, rate, "Requests per second and users over the run", "per second / users",
                0),
        *_lines(xs, times, "Response time percentiles as the client sees them", "ms",
                PANEL_H),
        f'<text x="{PANEL_W - 10}" y="{height - 8}" font-size="11" text-anchor="end">'
        f'locust, {escape(source)}</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, nargs="?",
                    help="a bench JSON (loadtests/results/bench-*.json)")
    ap.add_argument("--locust", type=Path, default=None, metavar="HISTORY_CSV",
                    help="instead: a locust --csv PREFIX_stats_history.csv")
    ap.add_argument("--out", type=Path, required=True, help="the SVG to write")
    args = ap.parse_args(argv)
    if args.locust is not None:
        with open(args.locust, newline="") as f:
            rows = list(csv.DictReader(f))
        try:
            svg = render_locust_svg(rows, args.locust.name)
        except (ValueError, KeyError) as e:
            ap.error(f"{args.locust}: {e}")
    else:
        if args.report is None:
            ap.error("give a bench JSON, or --locust HISTORY_CSV")
        report = json.loads(args.report.read_text())
        if not report.get("results"):
            ap.error(f"{args.report}: no results (was it an --rss-only run?)")
        svg = render_svg(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
