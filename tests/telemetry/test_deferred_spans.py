"""Deferred check-path spans (authz/telemetry/spans.py): same exported spans as the SDK makes,
context worked out once and lazily, the export queue's batching, flushing and limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from authz.telemetry.api import SPAN_NAME
from authz.telemetry.config import QueueSettings, TelemetryConfigError
from authz.telemetry.propagation import maybe_unsampled
from authz.telemetry.spans import (
    DeferredSpan,
    SpanQueue,
    _static_decisions,
    limits_allow_deferred,
)
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


class Recording(SpanExporter):
    """Keeps every batch it is given (thread-safe), optionally failing the first export."""

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[list[ReadableSpan]] = []
        self.lock = threading.Lock()
        self.fail_first = fail_first
        self.shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock:
            if self.fail_first:
                self.fail_first = False
                raise RuntimeError("collector unreachable")
            self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True

    @property
    def spans(self) -> list[ReadableSpan]:
        with self.lock:
            return [s for b in self.batches for s in b]


def test_the_default_setup_uses_deferred_spans(harness: Harness) -> None:
    assert harness.telemetry.span_mode == "deferred"
    assert harness.telemetry.describe()["traces"]["check_spans"] == "deferred"


def test_exported_check_and_store_spans_are_the_sdks_readable_spans(harness: Harness) -> None:
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
        assert type(s) is ReadableSpan
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


def test_the_check_path_does_not_parse_the_trace_headers(harness: Harness) -> None:
    """The caller's context is read on the export thread, not when the check starts."""
    with harness.telemetry.start_check(request_headers(traceparent=TRACEPARENT)) as scope:
        span = scope.span
        assert type(span) is DeferredSpan
        assert span._context is None  # nothing resolved yet
        scope.finish(ALLOWED, "user-1")
    assert span._context is None
    [exported] = harness.finished_spans()
    assert span._context is not None
    assert exported.context == span.get_span_context()


def test_asking_for_the_context_early_gives_the_ids_that_are_exported(
    harness: Harness,
) -> None:
    with harness.telemetry.start_check(request_headers()) as scope:  # no trace headers: a root
        early = trace.get_current_span().get_span_context()
        assert early.is_valid and early.trace_flags.sampled
        assert trace.get_current_span().get_span_context() is early  # worked out once
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


def test_the_span_api_behaves_like_the_sdks(harness: Harness) -> None:
    tracer = harness.telemetry.tracer("t")
    assert tracer is not None
    span = tracer.start_span("x", attributes={"a": 1})
    assert span.is_recording()
    span.set_attribute("list", ["a", "b"])
    span.set_attributes({"bad": {"nested": "dict"}, "": "no key", "ok": 2.5})  # dropped, kept
    span.set_status(StatusCode.OK)
    span.set_status(StatusCode.ERROR, "ignored: OK is final")
    span.update_name("y")
    span.add_event("e", {"k": "v"})
    span.add_link(SpanContext(1, 2, False))
    span.add_link(SpanContext(0, 0, False))  # invalid: ignored
    span.end()
    span.set_attribute("late", True)  # after end: ignored
    span.end()  # twice: once exported
    assert not span.is_recording()
    [exported] = harness.finished_spans()
    assert exported.name == "y"
    assert dict(exported.attributes or {}) == {"a": 1, "list": ("a", "b"), "ok": 2.5}
    assert exported.status.status_code is StatusCode.OK
    assert [e.name for e in exported.events] == ["e"]
    assert [link.context.span_id for link in exported.links] == [2]


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


@pytest.mark.parametrize("sampler", [
    ALWAYS_ON, ALWAYS_OFF, DEFAULT_ON, DEFAULT_OFF, ParentBasedTraceIdRatio(0.5),
])
def test_static_decisions_agree_with_the_samplers_own(sampler: object) -> None:
    table = _static_decisions(sampler)  # type: ignore[arg-type]
    assert table is not None
    for remote in (False, True):
        for sampled in (False, True):
            parent = SpanContext(int(TRACE_ID, 16), 7, remote,
                                 TraceFlags(TraceFlags.SAMPLED if sampled else 0))
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
            result = sampler.should_sample(ctx, parent.trace_id, "x")  # type: ignore[attr-defined]
            assert table[remote, sampled] is result.decision


def test_ratio_samplers_are_asked_every_time() -> None:
    assert _static_decisions(TraceIdRatioBased(0.5)) is None


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


def test_span_limits_switch_to_the_sdks_spans(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "3")
    assert not limits_allow_deferred(SpanLimits())
    h = make_harness()
    assert h.telemetry.span_mode == "sdk"
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    [span] = h.finished_spans()
    assert span.attributes is not None
    assert span.attributes["authz.decision"] == "all"  # the SDK cut it to 3 characters
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_configured_propagators_switch_to_the_sdks_spans(make_harness: MakeHarness) -> None:
    h = make_harness(environ={"OTEL_PROPAGATORS": "tracecontext"})
    assert h.telemetry.span_mode == "sdk"
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    [span] = h.finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID


# ---- the queue ------------------------------------------------------------------------------


def _readable(name: str) -> ReadableSpan:
    return ReadableSpan(name, SpanContext(1, 2, False, TraceFlags(TraceFlags.SAMPLED)))


def test_a_full_batch_is_exported_without_waiting_for_the_delay() -> None:
    exporter = Recording()
    queue = SpanQueue([exporter], QueueSettings(max_queue_size=100, schedule_delay_s=60,
                                                max_export_batch_size=4))
    try:
        for i in range(4):
            queue.put(_readable(f"s{i}"))
        deadline = time.monotonic() + 5
        while not exporter.batches and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s.name for s in exporter.spans] == ["s0", "s1", "s2", "s3"]
    finally:
        queue.shutdown()


def test_flush_exports_in_order_in_batches_and_a_full_queue_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = Recording(fail_first=True)
    # A batch larger than the queue: the thread is never woken by size, only by flushes.
    queue = SpanQueue([exporter], QueueSettings(max_queue_size=5, schedule_delay_s=60,
                                                max_export_batch_size=100))
    try:
        queue.put(_readable("lost"))  # its export fails: logged, the thread goes on
        assert queue.force_flush(5_000)
        with caplog.at_level("WARNING", logger="authz.telemetry.spans"):
            for i in range(7):
                queue.put(_readable(f"s{i}"))
        assert queue.dropped == 2
        assert "span queue full" in caplog.text
        assert queue.force_flush(5_000)
        assert [s.name for s in exporter.spans] == ["s0", "s1", "s2", "s3", "s4"]
    finally:
        queue.shutdown()
    assert exporter.shut


def test_shutdown_exports_what_is_left() -> None:
    exporter = Recording()
    queue = SpanQueue([exporter], QueueSettings(schedule_delay_s=60))
    queue.put(_readable("last"))
    queue.shutdown()
    assert [s.name for s in exporter.spans] == ["last"]
    assert queue.force_flush(100)  # after shutdown: nothing to do


def test_provider_spans_share_the_queue(harness: Harness) -> None:
    provider = harness.telemetry.tracer_provider
    assert isinstance(provider, TracerProvider)
    with trace.get_tracer("jwks", tracer_provider=provider).start_as_current_span("jwks.fetch"):
        pass
    [span] = harness.finished_spans()
    assert span.name == "jwks.fetch"


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE='0'"),
    ({"OTEL_BSP_SCHEDULE_DELAY": "soon"}, "OTEL_BSP_SCHEDULE_DELAY='soon'"),
    ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "600", "OTEL_BSP_MAX_QUEUE_SIZE": "500"},
     "OTEL_BSP_MAX_EXPORT_BATCH_SIZE=600 is larger than OTEL_BSP_MAX_QUEUE_SIZE=500"),
])
def test_bad_batch_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(TelemetryConfigError, match=message):
        QueueSettings.from_env(env)


def test_batch_settings_from_the_environment() -> None:
    settings = QueueSettings.from_env({
        "OTEL_BSP_MAX_QUEUE_SIZE": "4096", "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "128", "OTEL_BSP_EXPORT_TIMEOUT": "1000",
    })
    assert settings == QueueSettings(4096, 0.25, 128, 1.0)
    assert QueueSettings.from_env({}) == QueueSettings()


def test_a_span_that_cannot_be_built_is_dropped_and_the_thread_goes_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(carrier: object) -> object:
        raise RuntimeError("propagator bug")

    check_tracer = harness.telemetry._check_tracer
    assert check_tracer is not None
    monkeypatch.setattr(check_tracer, "extract", broken)
    with caplog.at_level("ERROR", logger="authz.telemetry.spans"):
        harness.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
        assert harness.finished_spans() == []
    assert "building a span for export failed" in caplog.text
    monkeypatch.undo()
    harness.check(ALLOWED, request_headers(traceparent=TRACEPARENT))
    assert len(harness.finished_spans()) == 1


def test_an_unsampled_caller_gets_no_span_at_all(harness: Harness) -> None:
    """Parent-based sampling (the default) and a caller that says "not sampled" (~99% of a
    mesh's requests): the headers are read on the check path and nothing is queued."""
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
    queue = harness.telemetry._queue
    assert queue is not None and not queue._queue
    assert harness.finished_spans() == []


@pytest.mark.parametrize(("headers", "hint"), [
    ({"traceparent": TRACEPARENT}, False),
    ({"traceparent": TRACEPARENT[:-2] + "00"}, True),
    ({"traceparent": TRACEPARENT[:-2] + "02"}, True),  # random-trace-id flag, not sampled
    ({"traceparent": TRACEPARENT[:-2] + "03"}, False),
    ({"b3": "0"}, True),
    ({"b3": f"{TRACE_ID}-{PARENT_SPAN_ID}-0"}, True),
    ({"b3": f"{TRACE_ID}-{PARENT_SPAN_ID}-1"}, False),
    ({"b3": f"{TRACE_ID}-{PARENT_SPAN_ID}"}, False),  # deferred: the sampler decides
    ({"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_SPAN_ID, "x-b3-sampled": "0"}, True),
    ({"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_SPAN_ID, "x-b3-sampled": "1"}, False),
])
def test_the_unsampled_hint(headers: dict[str, str], hint: bool) -> None:
    assert maybe_unsampled(headers) is hint


def test_a_malformed_traceparent_that_looks_unsampled_still_gets_a_root_span(
    harness: Harness,
) -> None:
    harness.check(ALLOWED, request_headers(traceparent="00-not-a-trace-00"))
    [span] = harness.finished_spans()
    assert span.parent is None and format(span.context.trace_id, "032x") != TRACE_ID
