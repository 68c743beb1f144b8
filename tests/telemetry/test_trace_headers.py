"""The caller's trace headers: the check path's own reading of a plain `traceparent` agrees with
the SDK's W3C propagator on every header, and the check span's parent is what the propagator
would make of the request, whichever of the two read it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.telemetry.propagation import w3c_parent
from tests.telemetry.conftest import ALLOWED, TRACEPARENT, MakeHarness, request_headers

_W3C = TraceContextTextMapPropagator()
_HEX = "0123456789abcdef"


def _hex(n: int) -> st.SearchStrategy[str]:
    # Mostly proper lower-case hex; now and then all zeros (invalid ids), upper case or a
    # stray character, which the format refuses.
    proper = st.text(_HEX, min_size=n, max_size=n)
    return st.one_of(
        proper, proper, proper, proper,
        st.just("0" * n),
        st.text(_HEX + "ABCDEF", min_size=n, max_size=n),
        st.text(_HEX + "g-x ", min_size=n - 1, max_size=n + 1),
    )


_FIELDS = st.tuples(st.one_of(st.just("00"), st.just("00"), st.just("ff"), _hex(2)), _hex(32),
                    _hex(16),
                    st.one_of(st.sampled_from(["00", "01", "03", "ff"]), _hex(2)))
TRACEPARENTS = st.one_of(
    _FIELDS.map("-".join),
    # What the propagator also takes or refuses around the four fields: blanks, later
    # versions' extra fields, version 00 with extra fields.
    st.tuples(_FIELDS.map("-".join), st.sampled_from(["", " ", "\t", "-extra", "-", " x"]),
              st.sampled_from(["", " "])).map(lambda t: t[2] + t[0] + t[1]),
    st.text(max_size=80),
)
TRACESTATES = st.one_of(st.none(), st.just("vendor=abc,other=1"), st.just("k=v"),
                        st.text(max_size=40))


def _sdk_parent(headers: dict[str, str]) -> SpanContext:
    return trace.get_current_span(_W3C.extract(headers)).get_span_context()


@given(TRACEPARENTS)
def test_plain_traceparents_are_read_as_the_propagator_reads_them(traceparent: str) -> None:
    expected = _sdk_parent({"traceparent": traceparent})
    found = w3c_parent(traceparent)
    if found is None:
        return  # left to the propagator
    context, sampled = found
    got = trace.get_current_span(context).get_span_context()
    assert expected.is_valid, f"read {traceparent!r}, which the propagator refuses"
    assert (got.trace_id, got.span_id, got.trace_flags, got.is_remote) == \
        (expected.trace_id, expected.span_id, expected.trace_flags, expected.is_remote)
    assert sampled == expected.trace_flags.sampled
    assert not got.trace_state


def test_the_common_forms_are_read_without_the_propagator() -> None:
    sampled = w3c_parent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    unsampled = w3c_parent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert sampled is not None and sampled[1] is True
    assert unsampled is not None and unsampled[1] is False
    assert w3c_parent(" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None


def test_a_sampled_callers_tracestate_reaches_the_check_span(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    harness = make_harness()
    harness.check(ALLOWED, {**request_headers(traceparent=TRACEPARENT),
                            "tracestate": "vendor=abc,other=1"})
    [span] = harness.finished_spans()
    assert dict(span.context.trace_state) == {"vendor": "abc", "other": "1"}


@pytest.mark.parametrize("sampler", ["always_on", "parentbased_always_on"])
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(traceparent=TRACEPARENTS, tracestate=TRACESTATES)
def test_the_check_span_has_the_parent_the_propagator_finds(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch, sampler: str,
    traceparent: str, tracestate: str | None,
) -> None:
    # The SDK reads the sampler from the process environment when the provider is built.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    harness = make_harness()
    headers = request_headers(traceparent=traceparent)
    if tracestate is not None:
        headers["tracestate"] = tracestate
    expected = _sdk_parent(headers)
    harness.check(ALLOWED, headers)
    spans = harness.finished_spans()
    if sampler != "always_on" and expected.is_valid and not expected.trace_flags.sampled:
        assert spans == []  # the caller is not sampled: no span of ours
        return
    [span] = spans
    if not expected.is_valid:
        assert span.parent is None
        return
    parent = span.parent
    assert parent is not None and parent.is_remote
    assert (parent.trace_id, parent.span_id, parent.trace_flags) == \
        (expected.trace_id, expected.span_id, expected.trace_flags)
    assert span.context.trace_id == expected.trace_id
    assert span.context.trace_state == expected.trace_state
