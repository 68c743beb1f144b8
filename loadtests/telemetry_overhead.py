"""Per-check CPU cost of telemetry's check path in a tight loop, without gRPC or Redis.

    .venv/bin/python -m loadtests.telemetry_overhead [checks per run, default 20000]

Each check does what the server does: start_check, a store span ("redis.charge", a child of the
check span, via Telemetry.tracer), a store-call observation, finish_check, and a rate-limited
deny line every 10th check. Configurations:

  metrics only          tracing off (no exporter), metrics on
  always-on             sampler always_on, a sampled traceparent, spans exported to an
                        exporter that drops them (DiscardSpanExporter): every check traced
  parent not sampled    the default parent-based sampler and a traceparent whose sampled flag
                        is off: what ~99% of a mesh's checks cost at the usual 1% sampling
  1% of roots sampled   parentbased_traceidratio 0.01 and no trace headers: the sampler asks
                        for every check
  always-on, no Redis write span   always-on without the store's span: what that span costs

CPU time of the whole process is measured, the export thread's included (every run ends with a
flush). For scale: the SDK's own floor for one span (start + end, no attributes), and one
histogram record with the check's three attributes and with none (the check path records one
of each per Redis-backed check). The load benchmark (`python -m loadtests.bench`, servers
full-notel, full-otel, full-otel-1pct) measures the same costs inside the full server, where
they are larger: the code runs cold, once per check, between two gRPC calls.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Mapping

from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import SpanKind

from authz.config.settings import ServerSettings, Settings
from authz.decision import Decision, Outcome
from authz.telemetry import RPC_ATTRIBUTES, Telemetry
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
UNSAMPLED = {**HEADERS, "traceparent": HEADERS["traceparent"][:-2] + "00"}
NO_TRACE = {k: v for k, v in HEADERS.items() if k != "traceparent"}
ALLOW = Decision(
    allowed=True, status=200, outcome=Outcome.ALLOWED, reason="ok",
    plan="pro", model="*", limit="per-second", token_cache_hit=True,
)
DENY = Decision(
    allowed=False, status=429, outcome=Outcome.RATE_LIMITED, reason="rate_limited",
    plan="free", model="*", limit="per-minute", token_cache_hit=True,
)
NO_STORE_SPAN = "always-on, no Redis write span"
STORE_ATTRS = {"db.system": "redis", "db.operation.name": "EVALSHA", "db.operation.batch.size": 1}


def run(telemetry: Telemetry, n: int, headers: Mapping[str, str],
        store_span: bool = True) -> float:
    """CPU us per check over `n` checks (`store_span=False`: without the Redis write's span,
    to show what that span costs)."""
    decisions = [DENY if i % 10 == 0 else ALLOW for i in range(n)]
    it = iter(decisions)
    store = telemetry.tracer("authz.buckets.redis") or trace.NoOpTracer()

    def one() -> None:
        with telemetry.start_check(headers) as scope:
            caller = trace.get_current_span()
            # As the Redis store decides: no span for a write whose caller is not recorded.
            if store_span and (caller.is_recording() or not caller.get_span_context().is_valid):
                store.start_span("redis.charge", kind=SpanKind.CLIENT,
                                 attributes=STORE_ATTRS).end()
            telemetry.observe_store_call(0.0002, True)
            scope.finish(next(it), "user-1234", path="/v1/models/llama:predict")

    # CPU time of this process (all threads, so the export thread counts too), not wall time:
    # other work on a shared machine must not inflate the result.
    start = time.process_time()
    for _ in range(n):
        one()
    telemetry.force_flush()
    return (time.process_time() - start) / n * 1e6


def per_call(fn: Callable[[], object], n: int) -> float:
    return timeit.Timer(fn, timer=time.process_time).timeit(number=n) / n * 1e6


def main() -> None:
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)  # noqa: SIM115
    settings = Settings(server=ServerSettings(metrics_port=0))

    def make(sampler: str | None, arg: str | None = None) -> Telemetry:
        # The SDK reads the sampler from the process environment when the provider is built.
        for name, value in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return Telemetry.from_settings(
            settings, span_exporter=DiscardSpanExporter() if sampler else None,
            metric_reader=InMemoryMetricReader(), environ={}, install_global=False,
        )

    setups: dict[str, tuple[Telemetry, Mapping[str, str]]] = {
        "metrics only": (make(None), HEADERS),
        "always-on": (make("always_on"), HEADERS),
        "parent not sampled": (make("parentbased_always_on"), UNSAMPLED),
        "1% of roots sampled": (make("parentbased_traceidratio", "0.01"), NO_TRACE),
    }
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    on = setups["always-on"][0]
    assert on.tracer_provider is not None and on.meter_provider is not None
    tracer = on.tracer_provider.get_tracer("bench")
    meter = on.meter_provider.get_meter("bench")
    with_attrs = meter.create_histogram("bench.with_attributes", unit="s")
    without = meter.create_histogram("bench.without_attributes", unit="s")
    references: dict[str, Callable[[], object]] = {
        "bare SDK span": lambda: tracer.start_span("x").end(),
        "histogram record, 3 attributes": lambda: with_attrs.record(0.0004, RPC_ATTRIBUTES),
        "histogram record, no attributes": lambda: without.record(0.0004),
    }
    results: dict[str, list[float]] = {name: [] for name in [*setups, *references]}
    results[NO_STORE_SPAN] = []
    for _ in range(5):
        for name, (telemetry, headers) in setups.items():
            results[name].append(run(telemetry, n, headers))
        results[NO_STORE_SPAN].append(run(on, n, HEADERS, store_span=False))
        for name, fn in references.items():
            results[name].append(per_call(fn, n))
    for name, values in results.items():
        unit = "us/check" if name in setups or name == NO_STORE_SPAN else "us"
        print(f"{name:32s} median {statistics.median(values):5.1f} {unit} "
              f"(min {min(values):.1f}, runs {', '.join(f'{v:.1f}' for v in values)})")
    for telemetry, _headers in setups.values():
        telemetry.shutdown()


if __name__ == "__main__":
    main()
