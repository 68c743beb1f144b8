"""The service's metrics: counted in plain Python on the hot path, handed to the SDK at collection.

Why not call `Counter.add` / `Histogram.record` per check: with opentelemetry-sdk 1.45 one
`record` of the check's latency (three attributes) costs ~7-8 us and the store call's (none)
~4 us (`python -m loadtests.telemetry_overhead`); in the full server the SDK's two histograms
took parent-based 1% sampling from ~0.94 to ~0.82 of telemetry-off throughput
(loadtests/README.md, "Telemetry's cost"). Here a check costs a dict increment and a bisect
(~1 us), and the SDK only sees the totals when a reader collects (a Prometheus scrape, an OTLP
export):
- counters, gauges and up-down counters are *observable* instruments whose callbacks read the
  totals (the SDK's public API for values kept elsewhere);
- the two latency histograms are aggregated here (explicit buckets, cumulative) and appended to
  what each reader collects, as the SDK's own `Metric`/`HistogramDataPoint` values, by wrapping
  the reader's collect callback (`HistogramBridge`). The OpenTelemetry API has no observable
  histogram, so this is the one place that uses an SDK internal: pyproject.toml bounds
  opentelemetry-sdk to the versions tests/telemetry/test_telemetry_sdk_seam.py has passed on.

Writers are the event-loop thread only (one asyncio loop per worker process); readers run on the
exporter threads and only copy, which the GIL keeps consistent enough for monitoring (a count
may be one observation ahead of its sum).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from authz.errors import StoreError, StoreProtocolError, StoreTimeout, StoreUnavailable

_log = logging.getLogger(__name__)

# Bucket bounds in seconds. A check costs ~450 us of CPU and answers in ~0.6-1.2 ms under light
# load (loadtests/README.md, "Reading the results"), Redis round trips take ~160 us; the store
# timeout is 50 ms and the mesh's check timeout 200 ms-1 s. So: fine steps from 50 us to 5 ms,
# coarser up to 1 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)

# Decision series are (outcome, reason, plan, model): bounded by the quota file, but a caller
# passing raw model names would make them unbounded. Past this many distinct series new ones
# fold into plan/model "_other" (the SDK's own default cardinality limit is 2000 per metric).
MAX_DECISION_SERIES = 1000
OTHER = "_other"

DecisionKey = tuple[str, str, str, str]

# authz.store.errors starts with these at 0 (the store's error classes, authz/errors.py): an
# alert on `rate(authz_store_errors_total[5m]) > 0` or `increase(...)` only sees the first
# error of a process if the series existed before it; a counter born at 1 looks like no change.
STORE_ERROR_TYPES: tuple[str, ...] = tuple(sorted({
    cls.error_type for cls in (StoreError, StoreTimeout, StoreUnavailable, StoreProtocolError)
}))

class LocalHistogram:
    """Explicit-bucket histogram, cumulative. `record` is the hot path: keep it tiny."""

    __slots__ = ("bounds", "counts", "max", "min", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # counts[i] holds values in (bounds[i-1], bounds[i]]; the last one (bounds[-1], +inf).
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def record(self, value: float) -> None:
        # bisect_left: a value equal to a bound lands in that bound's bucket (upper-inclusive,
        # as OpenTelemetry and Prometheus' `le` define it).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


class Counts:
    """Running totals, written by the event loop, read by exporters."""

    def __init__(self) -> None:
        self.decisions: dict[DecisionKey, int] = {}
        self._decision_attrs: dict[DecisionKey, dict[str, str]] = {}
        self.store_errors: dict[str, int] = dict.fromkeys(STORE_ERROR_TYPES, 0)
        self.config_reloads: dict[str, int] = {"ok": 0, "error": 0}
        self.inflight = 0
        self.check_duration = LocalHistogram(LATENCY_BUCKETS)
        self.http_check_duration = LocalHistogram(LATENCY_BUCKETS)  # the HTTP edge's checks
        self.store_duration = LocalHistogram(LATENCY_BUCKETS)
        self.token_cache: tuple[Callable[[], int], Callable[[], int], Callable[[], int]] | None
        self.token_cache = None
        self.jwks: Callable[[], Mapping[tuple[str, str], int]] | None = None
        self._overflow_warned = False

    def count_decision(self, key: DecisionKey) -> None:
        decisions = self.decisions
        n = decisions.get(key)
        if n is not None:
            decisions[key] = n + 1
            return
        if len(decisions) >= MAX_DECISION_SERIES:
            if not self._overflow_warned:
                self._overflow_warned = True
                _log.warning(
                    "authz.decisions reached %d series; new plan/model values are counted as %r",
                    MAX_DECISION_SERIES, OTHER,
                )
            key = (key[0], key[1], OTHER, OTHER)
            if key in decisions:
                decisions[key] += 1
                return
        self._decision_attrs[key] = {
            "outcome": key[0], "reason": key[1], "plan": key[2], "model": key[3],
        }
        decisions[key] = 1

    # Observable-instrument callbacks (exporter threads). `dict(...)` copies in one C call under
    # the GIL, so a concurrent insert on the loop thread cannot break the iteration.

    def observe_decisions(self, _: CallbackOptions) -> Iterable[Observation]:
        attrs = self._decision_attrs
        return [Observation(n, attrs[key]) for key, n in dict(self.decisions).items()]

    def observe_store_errors(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"error.type": t}) for t, n in dict(self.store_errors).items()]

    def observe_reloads(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"result": r}) for r, n in dict(self.config_reloads).items()]

    def observe_inflight(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.inflight)]

    def _token_cache_value(self, index: int) -> Iterable[Observation]:
        sources = self.token_cache
        if sources is None:
            return []
        return [Observation(_call(sources[index], "token cache"))]

    def observe_cache_hits(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._token_cache_value(0)

    def observe_cache_misses(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._token_cache_value(1)

    def observe_cache_entries(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._token_cache_value(2)

    def observe_jwks(self, _: CallbackOptions) -> Iterable[Observation]:
        source = self.jwks
        if source is None:
            return []
        try:
            counts = dict(source())
        except Exception:
            _log.exception("the JWKS refresh counts callback failed")
            return []
        return [
            Observation(n, {"issuer": issuer, "result": result})
            for (issuer, result), n in counts.items()
        ]


def _call(source: Callable[[], int], what: str) -> int:
    try:
        return int(source())
    except Exception:
        _log.exception("the %s callback failed", what)
        return 0


def create_instruments(meter: Meter, counts: Counts) -> None:
    """The observable instruments. Names and units make the Prometheus names the deploy side
    alerts on: unit "s" adds `_seconds`, counters add `_total`, `{...}` units add nothing."""
    meter.create_observable_counter(
        "authz.decisions", [counts.observe_decisions], unit="{decision}",
        description="Check decisions by outcome, reason, plan and quota model rule.",
    )
    meter.create_observable_counter(
        "authz.store.errors", [counts.observe_store_errors], unit="{error}",
        description="Bucket store calls that failed, by error.type.",
    )
    meter.create_observable_counter(
        "authz.token_cache.hits", [counts.observe_cache_hits], unit="{hit}",
        description="Verified-token cache hits.",
    )
    meter.create_observable_counter(
        "authz.token_cache.misses", [counts.observe_cache_misses], unit="{miss}",
        description="Verified-token cache misses (the token was verified).",
    )
    meter.create_observable_gauge(
        "authz.token_cache.entries", [counts.observe_cache_entries], unit="{entry}",
        description="Entries in the verified-token cache.",
    )
    meter.create_observable_counter(
        "authz.jwks.refreshes", [counts.observe_jwks], unit="{refresh}",
        description="JWKS fetches by issuer and result (ok, error).",
    )
    meter.create_observable_counter(
        "authz.config.reloads", [counts.observe_reloads], unit="{reload}",
        description="Configuration reloads by result (ok, error).",
    )
    meter.create_observable_up_down_counter(
        "authz.checks.inflight", [counts.observe_inflight], unit="{check}",
        description="Checks started and not yet answered.",
    )


class BridgedHistogram:
    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        attributes: Mapping[str, str],
        histogram: LocalHistogram,
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.attributes = dict(attributes)
        self.histogram = histogram

    def metric(self, start_ns: int, now_ns: int) -> Metric:
        h = self.histogram
        counts = list(h.counts)  # one C-level copy
        total = sum(counts)
        point = HistogramDataPoint(
            attributes=self.attributes,
            start_time_unix_nano=start_ns,
            time_unix_nano=now_ns,
            count=total,
            sum=h.sum,
            bucket_counts=counts,
            explicit_bounds=list(h.bounds),
            min=h.min if total else 0.0,
            max=h.max if total else 0.0,
        )
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(
                data_points=[point],
                aggregation_temporality=AggregationTemporality.CUMULATIVE,
            ),
        )


CollectFn = Callable[..., "MetricsData | None"]


class HistogramBridge:
    """Appends locally aggregated histograms to what a reader collects.

    Relies on `MetricReader._set_collect_callback` / `_collect`, the seam through which
    `MeterProvider` hands each reader its data (unchanged since SDK 1.12; pyproject.toml admits
    only the SDK versions tests/telemetry/test_telemetry_sdk_seam.py passed on). The histograms
    are always reported with cumulative temporality, whatever the reader prefers.
    """

    def __init__(
        self,
        scope: InstrumentationScope,
        resource: Resource,
        histograms: Sequence[BridgedHistogram],
    ) -> None:
        self._scope = scope
        self._resource = resource
        self._histograms = tuple(histograms)
        self._start_ns = time.time_ns()

    def attach(self, reader: MetricReader) -> None:
        inner: CollectFn | None = getattr(reader, "_collect", None)
        if inner is None:
            raise RuntimeError(
                "MetricReader has no collect callback: attach after creating the MeterProvider"
            )
        bridge = self

        def collect(r: MetricReader, *args: Any, **kwargs: Any) -> MetricsData | None:
            return bridge.merge(inner(r, *args, **kwargs))

        reader._set_collect_callback(collect)  # type: ignore[arg-type]

    def _scope_metrics(self, metrics: Sequence[Metric]) -> ScopeMetrics:
        return ScopeMetrics(self._scope, metrics, self._scope.schema_url or "")

    def merge(self, data: MetricsData | None) -> MetricsData:
        now = time.time_ns()
        ours = [h.metric(self._start_ns, now) for h in self._histograms]
        if data is None or not data.resource_metrics:
            return MetricsData(
                resource_metrics=[
                    ResourceMetrics(
                        resource=self._resource,
                        scope_metrics=[self._scope_metrics(ours)],
                        schema_url=self._resource.schema_url,
                    )
                ]
            )
        # One MeterProvider -> one resource. Put our metrics in our scope's block.
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, sm in enumerate(scopes):
            if sm.scope.name == self._scope.name:
                scopes[i] = replace(sm, metrics=[*sm.metrics, *ours])
                break
        else:
            scopes.append(self._scope_metrics(ours))
        return MetricsData(resource_metrics=[replace(first, scope_metrics=scopes), *rest])
