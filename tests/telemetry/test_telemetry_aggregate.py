"""The supervisor's scrape endpoint: several workers' metrics behind one port."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.config.settings import ServerSettings, Settings
from authz.demo.processes import free_port
from authz.telemetry import Telemetry
from authz.telemetry.aggregate import MetricsAggregator, worker_environment, worker_targets
from tests.telemetry.conftest import ALLOWED, RATE_LIMITED


@pytest.fixture
def workers() -> Iterator[list[Telemetry]]:
    """Two 'workers' (Telemetry objects serving their own loopback endpoints)."""
    made = []
    try:
        for _ in range(2):
            port = free_port()
            t = Telemetry.from_settings(
                Settings(server=ServerSettings(host="127.0.0.1", metrics_port=port)),
                environ={}, install_global=False,
            )
            made.append(t)
            t.start()
        yield made
    finally:
        for t in made:
            t.shutdown()


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
        return body.decode()


def test_one_endpoint_serves_every_workers_series_labelled(workers: list[Telemetry]) -> None:
    for i, decision in enumerate((ALLOWED, RATE_LIMITED)):
        for _ in range(i + 1):
            with workers[i].start_check({}) as scope:
                scope.finish(decision)
    targets = [w.metrics_address for w in workers]
    assert all(t is not None for t in targets)
    dead = ("127.0.0.1", free_port())  # a worker that is restarting
    with MetricsAggregator("127.0.0.1", 0, [*targets, dead]) as agg:  # type: ignore[list-item]
        text = get(agg.port)
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "each family exactly once"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families for s in f.samples}
    assert samples[("authz_worker_up", (("worker", "0"),))] == 1
    assert samples[("authz_worker_up", (("worker", "1"),))] == 1
    assert samples[("authz_worker_up", (("worker", "2"),))] == 0
    decisions = {dict(labels)["worker"]: (dict(labels)["outcome"], v)
                 for (name, labels), v in samples.items() if name == "authz_decisions_total"}
    assert decisions == {"0": ("allowed", 1), "1": ("rate_limited", 2)}
    counts = {dict(labels)["worker"]: v for (name, labels), v in samples.items()
              if name == "rpc_server_call_duration_seconds_count"}
    assert counts == {"0": 1, "1": 2}
    types = {f.name: f.type for f in families}
    assert types["authz_decisions"] == "counter"
    assert types["rpc_server_call_duration_seconds"] == "histogram"


def test_worker_ports_and_environment() -> None:
    assert worker_targets(9464, 3) == [("127.0.0.1", 9465), ("127.0.0.1", 9466),
                                       ("127.0.0.1", 9467)]
    assert worker_environment(9464, 2) == {
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1", "OTEL_EXPORTER_PROMETHEUS_PORT": "9467",
    }


def test_all_workers_down_still_answers() -> None:
    with MetricsAggregator("127.0.0.1", 0, [("127.0.0.1", free_port())],
                          worker_timeout=0.5) as agg:
        text = get(agg.port)
    assert 'authz_worker_up{worker="0"} 0.0' in text
