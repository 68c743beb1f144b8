"""One scrape endpoint for several worker processes.

`authz serve --workers N` runs N processes, each with its own counters. Prometheus (a
ServiceMonitor/PodMonitor) scrapes one fixed port per pod, and N varies with the node's CPUs,
so the supervisor serves `server.metrics_port` with this aggregator: each scrape fetches every
worker's own endpoint on loopback and re-serves all series with a `worker` label added.

Series are not summed here on purpose: a restarted worker's counters start again from zero, and
Prometheus handles that reset per series; a sum across workers would go down and look like a
reset of everything. Dashboards and alerts use `sum by (...)` / `sum(rate(...))` as usual.

`authz_worker_up{worker="i"}` is 1 when worker i answered the last scrape, else 0 (a worker that
is restarting). Families appear once each, as the text format requires.

The supervisor is a process of the pod too (memory, fds): its own process metrics (`process_*`,
`python_gc_*`, `python_info`) join the workers' in the same families, labelled
`worker="supervisor"`, so `sum(process_resident_memory_bytes)` by pod is the pod's total.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from authz.telemetry.endpoint import register_process_collectors, serve_metrics

_log = logging.getLogger(__name__)

# A worker answers a scrape in a few ms; a stuck one must not hold the whole scrape past
# Prometheus' default scrape_timeout (10 s), whatever the worker count.
DEFAULT_WORKER_TIMEOUT = 2.0

# The `worker` label of the supervisor's own process metrics (workers are "0".."N-1").
SUPERVISOR = "supervisor"


def _merge(families: dict[str, Metric], family: Metric, worker: str) -> None:
    merged = families.get(family.name)
    if merged is None:
        merged = Metric(family.name, family.documentation, family.type, family.unit)
        families[family.name] = merged
    for s in family.samples:
        merged.add_sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)


class _WorkersCollector(Collector):
    def __init__(self, targets: Sequence[tuple[str, int]], timeout: float,
                 own: CollectorRegistry) -> None:
        self._targets = tuple(targets)
        self._timeout = timeout
        self._own = own

    def _fetch(self, host: str, port: int) -> str | None:
        url = f"http://{host}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as response:
                body: bytes = response.read()
                return body.decode("utf-8")
        except (OSError, ValueError) as e:  # refused, timed out, bad status, bad encoding
            _log.debug("worker metrics unavailable", extra={"url": url, "error": str(e)})
            return None

    def _scrape_all(self) -> list[str | None]:
        results: list[str | None] = [None] * len(self._targets)

        def fetch(i: int, host: str, port: int) -> None:
            results[i] = self._fetch(host, port)

        # In parallel: one slow worker costs one timeout, not one per worker.
        threads = [
            threading.Thread(target=fetch, args=(i, host, port), daemon=True)
            for i, (host, port) in enumerate(self._targets)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self._timeout + 1.0)
        return results

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        up = Metric("authz_worker_up", "1 when the worker answered this scrape.", "gauge")
        for index, text in enumerate(self._scrape_all()):
            worker = str(index)
            up.add_sample("authz_worker_up", {"worker": worker}, 0.0 if text is None else 1.0)
            if text is None:
                continue
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError as e:
                _log.warning("unparseable worker metrics", extra={"worker": index, "error": str(e)})
                continue
            for family in parsed:
                _merge(families, family, worker)
        for family in self._own.collect():
            _merge(families, family, SUPERVISOR)
        yield up
        yield from families.values()


class MetricsAggregator:
    """Serves `host:port` with the merged metrics of `targets` (worker i = targets[i])."""

    def __init__(
        self,
        host: str,
        port: int,
        targets: Sequence[tuple[str, int]],
        *,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        own = CollectorRegistry(auto_describe=False)
        register_process_collectors(own)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_WorkersCollector(targets, worker_timeout, own))
        self._server: Any = None

    def start(self) -> None:
        """Raises OSError naming the address if the port is taken."""
        try:
            server = serve_metrics(self.host, self.port, self._registry)
        except OSError as e:
            raise OSError(e.errno, f"metrics endpoint {self.host}:{self.port}: {e.strerror}") from e
        self._server = server
        self.port = server.server_address[1]

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> MetricsAggregator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def worker_targets(base_port: int, workers: int) -> list[tuple[str, int]]:
    """The loopback endpoints workers serve when aggregated: base_port + 1 + i."""
    return [("127.0.0.1", base_port + 1 + i) for i in range(workers)]


def worker_environment(base_port: int, index: int) -> dict[str, str]:
    """Environment for worker `index` so its own endpoint is private and where the aggregator
    looks (read by Telemetry through the standard OTEL_EXPORTER_PROMETHEUS_* variables)."""
    host, port = worker_targets(base_port, index + 1)[index]
    return {"OTEL_EXPORTER_PROMETHEUS_HOST": host, "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)}
