"""Per-check CPU cost of telemetry's check path, tracing off and on (not a test; run by hand).

    .venv/bin/python tests/telemetry/bench_overhead.py

Each check does what the server does: start_check, a store span ("redis.charge", a child of the
check span, via Telemetry.tracer), a store-call observation, finish_check, and a rate-limited
deny line every 10th check. "on" = sampler always_on, a traceparent header with the sampled
flag, spans exported to an exporter that drops them (DiscardSpanExporter); "parent not
sampled" = the default parent-based sampler and the traceparent's sampled flag off (Envoy/Istio
sample ~1% of requests by default). CPU time of the whole process is measured, the export
thread's included: every run ends with a flush, so the spans' deferred work (spans.py) is
counted. "bare SDK span" is the SDK's own floor for one span (start + end, no attributes).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
import timeit

from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import SpanKind

from authz.config.settings import ServerSettings, Settings
from authz.decision import Decision, Outcome
from authz.telemetry import Telemetry
from authz.telemetry.exporters import DiscardSpanExporter

HEADERS = {
    ":authority": "models.example.com",
    ":method": "POST",
    ":path": "/v1/models/llama:predict",
    "authorization": "Bearer " + "x" * 800,
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-request-id": "5d1c2c1e-5b8a-4c7e-9d1a-0c7a1f6d2b11",
    "content-type": "application/json",
}
ALLOW = Decision(
    allowed=True, status=200, outcome=Outcome.ALLOWED, reason="ok",
    plan="pro", model="*", limit="per-second", token_cache_hit=True,
)
DENY = Decision(
    allowed=False, status=429, outcome=Outcome.RATE_LIMITED, reason="rate_limited",
    plan="free", model="*", limit="per-minute", token_cache_hit=True,
)


STORE_ATTRS = {"db.system": "redis", "db.operation.name": "EVALSHA", "db.operation.batch.size": 1}
UNSAMPLED = {**HEADERS, "traceparent": HEADERS["traceparent"][:-2] + "00"}


def run(telemetry: Telemetry, n: int, headers: dict[str, str] = HEADERS) -> float:
    decisions = [DENY if i % 10 == 0 else ALLOW for i in range(n)]
    it = iter(decisions)

    store = telemetry.tracer("authz.buckets.redis") or trace.NoOpTracer()

    def one() -> None:
        with telemetry.start_check(headers) as scope:
            store.start_span("redis.charge", kind=SpanKind.CLIENT, attributes=STORE_ATTRS).end()
            telemetry.observe_store_call(0.0002, True)
            scope.finish(next(it), "user-1234", path="/v1/models/llama:predict")

    # CPU time of this process (all threads, so the export thread counts too), not wall time:
    # other work on a shared machine must not inflate the result.
    start = time.process_time()
    for _ in range(n):
        one()
    telemetry.force_flush()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)  # noqa: SIM115
    settings = Settings(server=ServerSettings(metrics_port=0))
    env_off = {"OTEL_TRACES_EXPORTER": "none"}
    off = Telemetry.from_settings(
        settings, metric_reader=InMemoryMetricReader(), environ=env_off, install_global=False
    )

    def traced(sampler: str) -> Telemetry:
        os.environ["OTEL_TRACES_SAMPLER"] = sampler  # the SDK reads it from the process env
        return Telemetry.from_settings(
            settings, span_exporter=DiscardSpanExporter(), metric_reader=InMemoryMetricReader(),
            environ={}, install_global=False,
        )

    on = traced("always_on")
    # The default sampler: follows the caller's decision.
    parent_based = traced("parentbased_always_on")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    # Reference: the SDK's own floor for one sampled span (start + end, no attributes), with the
    # same provider, so a loaded machine shows up in both numbers.
    assert on.tracer_provider is not None
    tracer = on.tracer_provider.get_tracer("bench")

    def bare_span() -> None:
        tracer.start_span("x").end()

    results: dict[str, list[float]] = {
        "tracing off": [], "tracing on": [], "tracing on, parent not sampled": [],
        "bare SDK span": [],
    }
    for _ in range(5):
        results["tracing off"].append(run(off, n))
        results["tracing on"].append(run(on, n))
        results["tracing on, parent not sampled"].append(run(parent_based, n, UNSAMPLED))
        results["bare SDK span"].append(
            timeit.Timer(bare_span, timer=time.process_time).timeit(number=n) / n * 1e6
        )
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.1f} us/check "
              f"(min {min(values):.1f}, runs {', '.join(f'{v:.1f}' for v in values)})")
    for t in (off, on, parent_based):
        t.shutdown()


if __name__ == "__main__":
    main()
