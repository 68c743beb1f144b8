"""Check spans: joined to the caller's trace, with the decision's attributes, never the token."""

from __future__ import annotations

import hashlib

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from authz.decision import Decision, Outcome
from authz.telemetry import RPC_ATTRIBUTES, SPAN_NAME
from tests.telemetry.conftest import (
    ALLOWED,
    BACKEND_ERROR,
    PARENT_SPAN_ID,
    RATE_LIMITED,
    TOKEN,
    TRACE_ID,
    TRACEPARENT,
    Harness,
    MakeHarness,
    make_settings,
    request_headers,
)


def _only_span(h: Harness) -> trace.Span:
    spans = h.finished_spans()
    assert len(spans) == 1, spans
    return spans[0]


def test_traceparent_makes_the_check_span_a_child_of_the_callers_span(harness: Harness) -> None:
    harness.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    span = _only_span(harness)
    assert span.name == SPAN_NAME == "envoy.service.auth.v3.Authorization/Check"
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert span.context.span_id != span.parent.span_id
    attrs = dict(span.attributes)
    assert attrs == {
        **RPC_ATTRIBUTES,
        "authz.decision": "allowed",
        "authz.reason": "ok",
        "authz.status": 200,
        "authz.plan": "pro",
        "authz.model": "llama-*",
        "authz.limit": "per-second",
        "authz.token_cache.hit": True,
        "enduser.pseudo.id": hashlib.sha256(b"pepper\0user-1").hexdigest()[:16],
    }
    assert span.status.status_code is StatusCode.UNSET


def test_deny_span_carries_reason_and_limit(harness: Harness) -> None:
    harness.check(RATE_LIMITED, request_headers(traceparent=TRACEPARENT))
    attrs = dict(_only_span(harness).attributes)
    assert attrs["authz.decision"] == "rate_limited"
    assert attrs["authz.status"] == 429
    assert attrs["authz.limit"] == "per-minute"
    assert attrs["authz.plan"] == "free"


@pytest.mark.parametrize(
    "headers",
    [
        {
            "x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_SPAN_ID, "x-b3-sampled": "1",
        },
        {"b3": f"{TRACE_ID}-{PARENT_SPAN_ID}-1"},
    ],
    ids=["b3-multi", "b3-single"],
)
def test_b3_headers_join_the_trace(harness: Harness, headers: dict[str, str]) -> None:
    harness.check(ALLOWED, request_headers(**headers))
    span = _only_span(harness)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN_ID


def test_without_trace_headers_the_span_starts_a_new_trace(harness: Harness) -> None:
    harness.check(ALLOWED)
    span = _only_span(harness)
    assert span.parent is None
    assert span.context.trace_id != int(TRACE_ID, 16)


def test_malformed_traceparent_starts_a_new_trace(harness: Harness) -> None:
    harness.check(ALLOWED, request_headers(traceparent="00-zz-not-a-trace-01"))
    assert _only_span(harness).parent is None


def test_unsampled_parent_exports_no_span_but_still_counts(harness: Harness) -> None:
    harness.check(ALLOWED, request_headers(traceparent=f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"))
    assert harness.finished_spans() == []
    [point] = harness.metrics()["authz.decisions"]
    assert point.value == 1


def test_store_and_jwks_spans_nest_under_the_check_span(harness: Harness) -> None:
    provider = harness.telemetry.tracer_provider
    assert provider is not None
    # What authz.buckets.redis / authz.tokens do, with this test's provider instead of the
    # global one (tests/telemetry/test_telemetry_otlp.py covers the global installation).
    tracer = trace.get_tracer("authz.buckets.redis", tracer_provider=provider)
    with harness.telemetry.start_check(request_headers(traceparent=TRACEPARENT)) as scope:
        with tracer.start_as_current_span("redis.charge"):
            pass
        scope.finish(ALLOWED, "user-1")
    # Outside the block the caller's context is back.
    assert not trace.get_current_span().get_span_context().is_valid
    by_name = {s.name: s for s in harness.finished_spans()}
    check, child = by_name[SPAN_NAME], by_name["redis.charge"]
    assert child.parent is not None and child.parent.span_id == check.context.span_id
    assert child.context.trace_id == check.context.trace_id == int(TRACE_ID, 16)


def test_the_token_and_raw_subject_never_reach_the_span(harness: Harness) -> None:
    harness.check(ALLOWED, request_headers(traceparent=TRACEPARENT), subject="alice@example.com")
    span = _only_span(harness)
    values = [str(v) for v in span.attributes.values()]
    assert not any(TOKEN in v or "eyJ" in v or "alice" in v for v in values)


def test_subject_attribute_none_leaves_the_subject_out(make_harness: MakeHarness) -> None:
    h = make_harness(make_settings(subject_attribute="none"))
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    assert "enduser.pseudo.id" not in _only_span(h).attributes


def test_subject_hash_depends_on_the_salt(make_harness: MakeHarness) -> None:
    a = make_harness(make_settings(subject_salt="one")).telemetry
    b = make_harness(make_settings(subject_salt="two")).telemetry
    assert a.subject_hash("user-1") != b.subject_hash("user-1")
    assert a.subject_hash("user-1") == a.subject_hash("user-1")
    assert len(a.subject_hash("\ud800 lone surrogate")) == 16  # no UnicodeEncodeError


def test_backend_error_marks_the_span_as_error(harness: Harness) -> None:
    harness.check(BACKEND_ERROR, request_headers(traceparent=TRACEPARENT))
    span = _only_span(harness)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "store_unavailable"


def test_an_exception_in_the_block_is_recorded_then_the_caller_finishes(
    harness: Harness,
) -> None:
    """The server's pattern: the exception leaves the block, the handler answers 500 and
    finishes the scope with that decision."""
    scope = harness.telemetry.start_check(request_headers(traceparent=TRACEPARENT))
    with pytest.raises(RuntimeError, match="boom"), scope:
        raise RuntimeError("boom")
    assert harness.metrics()["authz.checks.inflight"][0].value == 1  # not finished yet
    internal = Decision(allowed=False, status=500, outcome=Outcome.INTERNAL_ERROR,
                        reason="internal_error")
    harness.telemetry.finish_check(scope, internal)
    span = _only_span(harness)
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes["exception.message"] == "boom"
    assert span.attributes["authz.decision"] == "internal_error"
    metrics = harness.metrics()
    [decision] = metrics["authz.decisions"]
    assert dict(decision.attributes)["outcome"] == "internal_error"
    assert metrics["authz.checks.inflight"][0].value == 0


def test_finish_after_leaving_the_block_keeps_the_decision(harness: Harness) -> None:
    scope = harness.telemetry.start_check(request_headers(traceparent=TRACEPARENT))
    with scope:
        pass
    harness.telemetry.finish_check(scope, RATE_LIMITED, "user-1")
    assert _only_span(harness).attributes["authz.decision"] == "rate_limited"
    [point] = harness.metrics()["authz.decisions"]
    assert dict(point.attributes)["outcome"] == "rate_limited"


def test_finish_twice_counts_once(harness: Harness) -> None:
    with harness.telemetry.start_check(request_headers()) as scope:
        scope.finish(ALLOWED)
        scope.finish(RATE_LIMITED)
        harness.telemetry.finish_check(scope, RATE_LIMITED)
    assert scope.finished
    [point] = harness.metrics()["authz.decisions"]
    assert point.value == 1 and dict(point.attributes)["outcome"] == "allowed"
    assert len(harness.finished_spans()) == 1


def test_tracing_off_by_default_without_an_otlp_endpoint(make_harness: MakeHarness) -> None:
    h = make_harness(tracing=False, environ={})
    assert h.telemetry.tracer_provider is None
    with h.telemetry.start_check(request_headers(traceparent=TRACEPARENT)) as scope:
        assert scope.span is None
        assert not trace.get_current_span().get_span_context().is_valid
        scope.finish(ALLOWED)
    [point] = h.metrics()["authz.decisions"]
    assert point.value == 1


def test_sdk_disabled_turns_everything_off(make_harness: MakeHarness) -> None:
    h = make_harness(environ={"OTEL_SDK_DISABLED": "true"})
    assert h.telemetry.tracer_provider is None
    assert h.telemetry.meter_provider is None
    h.check(ALLOWED)  # still works, records nothing
    assert h.spans.get_finished_spans() == ()


def test_configured_propagators_are_honoured(make_harness: MakeHarness) -> None:
    h = make_harness(environ={"OTEL_PROPAGATORS": "b3"})  # W3C no longer read
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    assert _only_span(h).parent is None
    h.spans.clear()
    h.check(ALLOWED, request_headers(b3=f"{TRACE_ID}-{PARENT_SPAN_ID}-1"))
    assert format(_only_span(h).context.trace_id, "032x") == TRACE_ID


def test_discard_exporter_counts_spans_and_keeps_none() -> None:
    from authz.telemetry import Telemetry
    from authz.telemetry.exporters import DiscardSpanExporter

    exporter = DiscardSpanExporter()
    telemetry = Telemetry.from_settings(
        make_settings(), span_exporter=exporter, environ={}, install_global=False
    )
    try:
        for _ in range(3):
            with telemetry.start_check(request_headers(traceparent=TRACEPARENT)) as scope:
                scope.finish(ALLOWED)
        telemetry.force_flush()
        assert exporter.exported == 3
    finally:
        telemetry.shutdown()


def test_unsampled_caller_drops_child_spans_too(harness: Harness) -> None:
    provider = harness.telemetry.tracer_provider
    assert provider is not None
    jwks_tracer = trace.get_tracer("authz.tokens.jwks", tracer_provider=provider)
    store_tracer = harness.telemetry.tracer("authz.buckets.redis")
    assert store_tracer is not None
    unsampled = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"
    with harness.telemetry.start_check(request_headers(traceparent=unsampled)) as scope:
        # The caller's trace is current (its id is what the logs carry), and not sampled.
        current = trace.get_current_span().get_span_context()
        assert format(current.trace_id, "032x") == TRACE_ID
        assert not current.trace_flags.sampled
        with jwks_tracer.start_as_current_span("jwks.fetch") as child:
            assert not child.is_recording()
        store_tracer.start_span("redis.charge").end()
        scope.finish(RATE_LIMITED)
    assert harness.finished_spans() == []


def test_always_on_sampler_records_even_unsampled_callers(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # read by the SDK from the process env
    h = make_harness()
    h.check(ALLOWED, request_headers(traceparent=f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"))
    span = _only_span(h)
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_without_the_b3_package_the_default_falls_back_to_w3c(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    import sys

    from authz.telemetry import TelemetryConfigError

    monkeypatch.setitem(sys.modules, "opentelemetry.propagators.b3", None)  # import fails
    h = make_harness()
    assert "B3 headers are ignored" in caplog.text
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    assert format(_only_span(h).context.trace_id, "032x") == TRACE_ID
    # Asked for explicitly, it is an error.
    with pytest.raises(TelemetryConfigError, match="opentelemetry-propagator-b3"):
        make_harness(environ={"OTEL_PROPAGATORS": "b3"})
