"""Check-path spans as they reach the exporter: ids, parents, kinds, scopes, attributes,
status and events; the sampler, span limits, propagators and batch settings from OTEL_*; the
unsampled-caller skip."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from authz.telemetry import SPAN_NAME
from tests.telemetry.conftest import (
    ALLOWED,
    BACKEND_ERROR,
    PARENT_SPAN_ID,
    RATE_LIMITED,
    TRACE_ID,
    TRACEPARENT,
    Harness,
    MakeHarness,
    request_headers,
)


def test_exported_check_and_store_spans(harness: Harness) -> None:
    store_tracer = harness.telemetry.tracer("authz.buckets.redis")
    assert store_tracer is not None
    with harness.telemetry.start_check(request_headers(traceparent=TRACEPARENT)) as scope:
        span = store_tracer.start_span("redis.charge", kind=SpanKind.CLIENT,
                                       attributes={"db.system": "redis"})
        span.end()
        scope.finish(ALLOWED, "user-1")
    spans = {s.name: s for s in harness.finished_spans()}
    check, store = spans[SPAN_NAME], spans["redis.charge"]
    for s in (check, store):
        assert isinstance(s, ReadableSpan)
        assert s.start_time is not None and s.end_time is not None
        assert s.start_time <= s.end_time
        assert s.resource.attributes["service.name"] == "authz"
    assert format(check.context.trace_id, "032x") == TRACE_ID
    assert check.parent is not None and format(check.parent.span_id, "016x") == PARENT_SPAN_ID
    assert check.parent.is_remote and not check.context.is_remote
    assert check.kind is SpanKind.SERVER and store.kind is SpanKind.CLIENT
    assert store.parent is not None and store.parent.span_id == check.context.span_id
    assert store.context.trace_id == check.context.trace_id
    assert check.instrumentation_scope is not None
    assert check.instrumentation_scope.name == "authz"
    assert store.instrumentation_scope is not None
    assert store.instrumentation_scope.name == "authz.buckets.redis"
    assert check.attributes is not None
    assert check.attributes["rpc.system"] == "grpc"
    assert check.attributes["authz.decision"] == "allowed"
    assert check.attributes["authz.plan"] == "pro"
    assert store.attributes == {"db.system": "redis"}
    # The OTLP exporters' encoder takes them as they are.
    encoded = encode_spans([check, store])
    [scope_spans] = encoded.resource_spans[0].scope_spans[:1]
    assert scope_spans.spans


def test_asking_for_the_context_early_gives_the_ids_that_are_exported(
    harness: Harness,
) -> None:
    with harness.telemetry.start_check(request_headers()) as scope:  # no trace headers: a root
        early = trace.get_current_span().get_span_context()
        assert early.is_valid and early.trace_flags.sampled
        assert trace.get_current_span().get_span_context() is early  # the same every time
        scope.finish(ALLOWED, "user-1")
    [exported] = harness.finished_spans()
    assert exported.context == early
    assert exported.parent is None


def test_deny_log_ids_match_the_exported_span(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="authz.deny"):
        harness.check(RATE_LIMITED, request_headers(traceparent=TRACEPARENT))
    [record] = [r for r in caplog.records if r.name == "authz.deny"]
    [exported] = harness.finished_spans()
    assert record.trace_id == TRACE_ID  # type: ignore[attr-defined]
    assert record.span_id == format(exported.context.span_id, "016x")  # type: ignore[attr-defined]


def test_error_status_and_recorded_exception_reach_the_export(harness: Harness) -> None:
    with harness.telemetry.start_check(request_headers()) as scope:
        scope.finish(BACKEND_ERROR, "user-1")
    with pytest.raises(ValueError), harness.telemetry.start_check(request_headers()) as scope:
        raise ValueError("boom")
    scope.finish(ALLOWED, "user-1")
    first, second = harness.finished_spans()
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "store_unavailable"
    [event] = second.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "boom"


def test_start_as_current_span_makes_children(harness: Harness) -> None:
    tracer = harness.telemetry.tracer("t")
    assert tracer is not None
    with tracer.start_as_current_span("outer") as outer:
        inner = tracer.start_span("inner")
        inner.end()
    by_name = {s.name: s for s in harness.finished_spans()}
    outer_span, inner_span = by_name["outer"], by_name["inner"]
    assert inner_span.parent is not None
    assert inner_span.parent.span_id == outer.get_span_context().span_id == \
        outer_span.context.span_id


@pytest.mark.parametrize(("sampler", "exported"), [
    ("always_off", 0), ("traceidratio", 0), ("parentbased_always_off", 1), ("always_on", 1),
])
def test_configured_samplers_decide(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch, sampler: str, exported: int,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")  # traceidratio: keep none
    h = make_harness()
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))  # a sampled remote parent
    assert len(h.finished_spans()) == exported


def test_span_limits_are_honoured(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "3")
    h = make_harness()
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    [span] = h.finished_spans()
    assert span.attributes is not None
    assert span.attributes["authz.decision"] == "all"  # the SDK cut it to 3 characters
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_configured_propagators_are_read(make_harness: MakeHarness) -> None:
    h = make_harness(environ={"OTEL_PROPAGATORS": "tracecontext"})
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    [span] = h.finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_provider_spans_are_exported(harness: Harness) -> None:
    provider = harness.telemetry.tracer_provider
    assert isinstance(provider, TracerProvider)
    with trace.get_tracer("jwks", tracer_provider=provider).start_as_current_span("jwks.fetch"):
        pass
    [span] = harness.finished_spans()
    assert span.name == "jwks.fetch"


def test_an_unsampled_caller_gets_no_span_at_all(harness: Harness) -> None:
    """Parent-based sampling (the default) and a caller that says "not sampled" (~99% of a
    mesh's requests): no check span, and the store's child span does not record."""
    store_tracer = harness.telemetry.tracer("authz.buckets.redis")
    assert store_tracer is not None
    unsampled = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"
    with harness.telemetry.start_check(request_headers(traceparent=unsampled)) as scope:
        assert scope.span is None
        child = store_tracer.start_span("redis.charge")
        assert not child.is_recording()
        assert format(child.get_span_context().trace_id, "032x") == TRACE_ID
        child.end()
        scope.finish(ALLOWED, "user-1")
    assert harness.finished_spans() == []


def test_a_malformed_traceparent_that_looks_unsampled_still_gets_a_root_span(
    harness: Harness,
) -> None:
    harness.check(ALLOWED, request_headers(traceparent="00-not-a-trace-00"))
    [span] = harness.finished_spans()
    assert span.parent is None and format(span.context.trace_id, "032x") != TRACE_ID


def test_batch_settings_reach_the_span_processor(make_harness: MakeHarness) -> None:
    """OTEL_BSP_MAX_EXPORT_BATCH_SIZE: a full batch is exported at once, long before
    OTEL_BSP_SCHEDULE_DELAY."""
    h = make_harness(environ={"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
                              "OTEL_BSP_SCHEDULE_DELAY": "60000"})
    for _ in range(2):
        h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    deadline = time.monotonic() + 10
    while len(h.spans.get_finished_spans()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(h.spans.get_finished_spans()) == 2
