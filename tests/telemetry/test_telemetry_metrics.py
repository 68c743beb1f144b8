"""Metrics as a reader collects them: decisions, latency histograms, store, cache, JWKS, reloads."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import AggregationTemporality

from authz.decision import Decision, Outcome
from authz.telemetry import LATENCY_BUCKETS, RPC_ATTRIBUTES
from authz.telemetry.metrics import MAX_DECISION_SERIES, OTHER, LocalHistogram
from tests.telemetry.conftest import (
    ALLOWED,
    BACKEND_ERROR,
    RATE_LIMITED,
    UNAUTHENTICATED,
    Harness,
    request_headers,
)


def _by_attrs(points: list[Any]) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {tuple(sorted(dict(p.attributes).items())): p for p in points}


def _decision_counts(h: Harness) -> dict[tuple[str, str, str, str], int]:
    out = {}
    for p in h.metrics()["authz.decisions"]:
        a = dict(p.attributes)
        out[(a["outcome"], a["reason"], a["plan"], a["model"])] = p.value
    return out


def test_decisions_by_outcome_reason_plan_and_model(harness: Harness) -> None:
    for decision in (ALLOWED, ALLOWED, UNAUTHENTICATED, RATE_LIMITED, BACKEND_ERROR):
        harness.check(decision)
    assert _decision_counts(harness) == {
        ("allowed", "ok", "pro", "llama-*"): 2,
        ("unauthenticated", "token_expired", "", ""): 1,
        ("rate_limited", "rate_limited", "free", "*"): 1,
        ("backend_error", "store_unavailable", "free", "*"): 1,
    }
    # Cumulative: a second collection keeps the totals and adds new checks.
    harness.check(RATE_LIMITED)
    assert _decision_counts(harness)[("rate_limited", "rate_limited", "free", "*")] == 2


def test_check_latency_histogram(harness: Harness) -> None:
    for decision in (ALLOWED, UNAUTHENTICATED, RATE_LIMITED, BACKEND_ERROR):
        harness.check(decision)
    [point] = harness.metrics()["rpc.server.call.duration"]
    assert dict(point.attributes) == dict(RPC_ATTRIBUTES)
    assert point.count == 4 == sum(point.bucket_counts)
    assert list(point.explicit_bounds) == list(LATENCY_BUCKETS)
    assert len(point.bucket_counts) == len(LATENCY_BUCKETS) + 1
    assert 0 < point.min <= point.max < 1.0
    assert 0 < point.sum < 4.0
    data = harness.reader.get_metrics_data()
    assert data is not None
    [metric] = [m for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == "rpc.server.call.duration"]
    assert metric.unit == "s"
    assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE


def test_inflight_counts_checks_in_progress(harness: Harness) -> None:
    t = harness.telemetry
    a = t.start_check(request_headers())
    b = t.start_check(request_headers())
    assert harness.metrics()["authz.checks.inflight"][0].value == 2
    t.finish_check(a, ALLOWED)
    assert harness.metrics()["authz.checks.inflight"][0].value == 1
    t.finish_check(b, ALLOWED)
    assert harness.metrics()["authz.checks.inflight"][0].value == 0


def test_store_calls_latency_and_errors_by_type(harness: Harness) -> None:
    t = harness.telemetry
    t.observe_store_call(0.0002, True)
    t.observe_store_call(0.0004, True)
    t.observe_store_call(0.05, False, "timeout")
    t.observe_store_call(0.001, False, "ConnectionError")
    t.observe_store_call(0.05, False, "timeout")
    metrics = harness.metrics()
    [duration] = metrics["authz.store.duration"]
    assert duration.count == 5
    assert duration.sum == pytest.approx(0.1016)
    # 0.0002 -> (1e-4, 2.5e-4]; 0.0004 -> (2.5e-4, 5e-4]; 0.001 -> (7.5e-4, 1e-3];
    # 0.05 -> (2.5e-2, 5e-2] twice.
    bounds = list(LATENCY_BUCKETS)
    expected = [0] * (len(bounds) + 1)
    for index in (bounds.index(0.00025), bounds.index(0.0005), bounds.index(0.001),
                  bounds.index(0.05), bounds.index(0.05)):
        expected[index] += 1
    assert list(duration.bucket_counts) == expected
    errors = {dict(p.attributes)["error.type"]: p.value for p in metrics["authz.store.errors"]}
    # The store's own error types exist from the start (at 0 until one happens).
    assert errors == {"timeout": 2, "ConnectionError": 1, "connection": 0, "error": 0}


def test_store_error_types_are_bounded(harness: Harness) -> None:
    for i in range(100):
        harness.telemetry.observe_store_call(0.001, False, f"Error{i}")
    points = harness.metrics()["authz.store.errors"]
    assert len(points) <= 33
    assert sum(p.value for p in points) == 100


def test_token_cache_counters_and_size(harness: Harness) -> None:
    state = {"hits": 0, "misses": 0, "entries": 0}
    harness.telemetry.register_token_cache(
        lambda: state["hits"], lambda: state["misses"], lambda: state["entries"]
    )
    state.update(hits=90, misses=10, entries=7)
    m = harness.metrics()
    assert m["authz.token_cache.hits"][0].value == 90
    assert m["authz.token_cache.misses"][0].value == 10
    assert m["authz.token_cache.entries"][0].value == 7
    state.update(hits=95, entries=3)
    m = harness.metrics()
    assert m["authz.token_cache.hits"][0].value == 95
    assert m["authz.token_cache.entries"][0].value == 3


def test_jwks_refreshes_by_issuer_and_result(harness: Harness) -> None:
    counts = {("https://idp.example.com/", "ok"): 3, ("https://idp.example.com/", "error"): 1}
    harness.telemetry.register_jwks(lambda: counts)
    points = _by_attrs(harness.metrics()["authz.jwks.refreshes"])
    assert points[(("issuer", "https://idp.example.com/"), ("result", "ok"))].value == 3
    assert points[(("issuer", "https://idp.example.com/"), ("result", "error"))].value == 1


def test_a_failing_callback_does_not_break_collection(harness: Harness) -> None:
    def broken() -> int:
        raise RuntimeError("cache gone")

    harness.telemetry.register_token_cache(broken, broken, broken)
    harness.telemetry.register_jwks(lambda: {("x", "ok"): "not a number"})  # type: ignore[dict-item]
    harness.check(ALLOWED)
    m = harness.metrics()
    assert m["authz.decisions"][0].value == 1
    assert m["authz.token_cache.hits"][0].value == 0


def test_config_reloads_by_result(harness: Harness) -> None:
    t = harness.telemetry
    t.config_reloaded(True)
    t.config_reloaded(True)
    t.config_reloaded(False)
    points = harness.metrics()["authz.config.reloads"]
    assert {dict(p.attributes)["result"]: p.value for p in points} == {"ok": 2, "error": 1}


def test_decision_series_are_bounded(harness: Harness) -> None:
    n = MAX_DECISION_SERIES + 50
    for i in range(n):
        decision = Decision(allowed=True, status=200, outcome=Outcome.ALLOWED, reason="ok",
                            plan="pro", model=f"raw-model-{i}")
        with harness.telemetry.start_check({}) as scope:
            scope.finish(decision)
    counts = _decision_counts(harness)
    assert len(counts) == MAX_DECISION_SERIES + 1
    assert counts[("allowed", "ok", OTHER, OTHER)] == 50
    assert sum(counts.values()) == n


def test_local_histogram_buckets_are_upper_inclusive() -> None:
    h = LocalHistogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 2.5):
        h.record(v)
    assert h.counts == [2, 2, 1]
    assert (h.min, h.max, h.sum) == (0.5, 2.5, 7.5)


def test_no_exporter_configured_still_counts_cheaply(make_harness: Any) -> None:
    """OTEL_METRICS_EXPORTER=none with an injected reader: the reader still sees everything."""
    h = make_harness(environ={"OTEL_METRICS_EXPORTER": "none"}, tracing=False)
    h.check(ALLOWED)
    assert h.metrics()["authz.decisions"][0].value == 1
