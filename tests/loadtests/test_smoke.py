"""CI smoke of the load tests: each runs for seconds against real, freshly started processes.

Not a benchmark: on a shared CI machine the numbers mean nothing, so no speed is asserted. What is
asserted is that the documented commands work end to end and that the properties the benchmark
reports hold: every server answers the benchmark request, the service spends exactly one Redis
command per decision and none on an identity it already knows is over its limit, the locust
scenarios see allows, 401s and 429s and nothing unexpected.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.stack import running_stack

REPO = Path(__file__).resolve().parents[2]

needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None,
    reason="h2load missing: apt-get install -y nghttp2-client",
)


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


@needs_h2load
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "-m", "loadtests.bench", "--quick", "--json", str(out)],
               timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert set(summary) == {"floor", "io-floor", "full-redis", "naive", "full-memory",
                            "full-notel", "full-otel", "full-otel-1pct", "full-cluster",
                            "full-body", "full-body-unused", "http-floor", "full-http-redis",
                            "full-http-memory"}
    for name, s in summary.items():
        assert s["rps"] > 0, name
        assert s["light_p99_ms"] > 0, name
    # One Redis command per decision although the bench plan has two limits (a reconnection's
    # handshake, should a loaded CI machine cause one, is per connection and not counted).
    assert summary["full-redis"]["redis_per_check"] == 1.0
    assert summary["full-redis"]["redis_per_decision"]["evalsha"] == 1.0
    # The naive baseline also sends one EVALSHA per decision (its connection pool's handshakes
    # aside): the comparison is like for like.
    assert summary["naive"]["redis_per_decision"]["evalsha"] == 1.0
    deny = {d["server"]: d for d in data["deny_cache"]}
    # The local deny cache: no Redis traffic for an identity known to be over its limit
    # (h2load keeps at most 4 connections x 8 streams in flight before the first 429 lands).
    assert deny["full-redis"]["over_limit_checks"] == 500
    assert deny["full-redis"]["redis_commands"] <= 32
    # ... whereas the naive server asks Redis every time.
    assert deny["naive"]["redis_commands"] >= 500
    assert set(data["scaling"]) == {"floor", "full-redis"}
    rss = data["rss"]
    assert rss["checks"] == 2000 and rss["users"] == 500
    assert rss["outcomes"].get("allow", 0) > 0 and rss["outcomes"].get("429", 0) > 0
    assert 0 < rss["rss_mb_peak"] < 1024
    assert "full/floor" in data["ratios"] and "full/naive" in data["ratios"]
    assert "full-http-redis/floor" in data["ratios"]
    assert "light p99 full-http-redis/floor" in data["ratios"]
    # The chart of the same run: a bar per server and round, in both panels.
    svg = tmp_path / "bench.svg"
    proc = run([sys.executable, "-m", "loadtests.chart", str(out), "--out", str(svg)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = svg.read_text()
    for name in summary:
        assert text.count(f"<title>{name} round 1:") == 2, name


def read_stats(prefix: Path) -> dict[str, tuple[int, int]]:
    """{name: (requests, failures)} from locust's --csv stats file, without the total row."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: (int(row["Request Count"]), int(row["Failure Count"]))
                for row in csv.DictReader(f) if row["Name"] != "Aggregated"}


def locust(locustfile: str, csv_prefix: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    # 24 users spawned at once, 3 s: with 25% invalid and 25% greedy users (seeded, so the mix is
    # fixed) every outcome shows up. Locust exits 1 when any request failed.
    return run([sys.executable, "-m", "locust", "-f", locustfile, "--headless", "-u", "24",
                "-r", "24", "-t", "3s", "--stop-timeout", "2", "--only-summary",
                "--invalid-share", "0.25", "--over-limit-share", "0.25",
                "--csv", str(csv_prefix), "--html", f"{csv_prefix}.html", *extra], timeout=90)


def test_locust_grpc_scenario(tmp_path: Path) -> None:
    with running_stack(tmp_path / "world", tmp_path, envoy=False) as stack:
        proc = locust("loadtests/locust_grpc.py", tmp_path / "grpc",
                      ["--world", str(stack.world.root), "--grpc-target", stack.grpc_target])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = read_stats(tmp_path / "grpc")
    assert {"Check allow", "Check 401", "Check 429"} <= set(stats), stats
    # The HTML report (charts of requests/s, response times and users over the run).
    report = (tmp_path / "grpc.html").read_text()
    assert "Check allow" in report and "<html" in report.lower()
    # ... and the chart of the run over time, from the same --csv history.
    svg = tmp_path / "grpc.svg"
    proc = run([sys.executable, "-m", "loadtests.chart", "--locust",
                str(tmp_path / "grpc_stats_history.csv"), "--out", str(svg)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert svg.read_text().count("<polyline") >= 4  # requests/s, users, p50, p95, ...
    assert all(failures == 0 for _, failures in stats.values()), stats
    assert not [n for n in stats if "grpc" in n or n.startswith("Check 5")], stats


def test_locust_http_scenario(tmp_path: Path) -> None:
    with running_stack(tmp_path / "world", tmp_path, envoy=False) as stack:
        proc = locust("loadtests/locust_http.py", tmp_path / "http",
                      ["--world", str(stack.world.root), "--host", stack.check_url])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = read_stats(tmp_path / "http")
    assert {"Check allow", "Check 401", "Check 429"} <= set(stats), stats
    assert all(failures == 0 for _, failures in stats.values()), stats
    assert not [n for n in stats if n.startswith("Check 5")], stats


@pytest.mark.envoy
@pytest.mark.parametrize("provider", ["grpc", "http"])
def test_locust_envoy_scenario(tmp_path: Path, provider: str) -> None:
    from authz.errors import EnvoyNotFound
    from authz.mesh.envoy_binary import find_envoy

    try:
        find_envoy()
    except EnvoyNotFound as e:
        pytest.skip(str(e))
    with running_stack(tmp_path / "world", tmp_path, envoy=True, provider=provider) as stack:
        assert stack.http_url is not None
        proc = locust("loadtests/locust_envoy.py", tmp_path / "envoy",
                      ["--world", str(stack.world.root), "--host", stack.http_url])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = read_stats(tmp_path / "envoy")
    statuses = {name.rsplit("[", 1)[-1].rstrip("]") for name in stats}
    assert {"200", "401", "429"} <= statuses, stats
    assert all(failures == 0 for _, failures in stats.values()), stats
