"""Reading the caller's trace context from the CheckRequest's HTTP headers.

Envoy copies every request header into the CheckRequest (lower-case keys), so the W3C
`traceparent` or the B3 headers its tracer added arrive there. Each SDK extractor costs ~4 us
even when its header is absent, so the default path looks for the headers first and runs only
the extractor that has something to read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points

from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.telemetry.config import DEFAULT_PROPAGATORS, TelemetryConfigError

_log = logging.getLogger(__name__)

Extractor = Callable[[Mapping[str, str]], "Context | None"]


def _load(name: str) -> TextMapPropagator:
    if name == "tracecontext":
        return TraceContextTextMapPropagator()
    if name in ("b3", "b3multi"):
        try:
            from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
        except ImportError as e:  # a packaging error
            raise TelemetryConfigError(
                f"OTEL_PROPAGATORS names {name!r} but opentelemetry-propagator-b3 is not installed"
            ) from e
        # Both classes extract both the single `b3` header and the x-b3-* headers.
        return B3SingleFormat() if name == "b3" else B3MultiFormat()
    found = entry_points(group="opentelemetry_propagator", name=name)
    if not found:
        raise TelemetryConfigError(
            f"OTEL_PROPAGATORS: unknown propagator {name!r} "
            "(expected tracecontext, b3, b3multi, baggage or an installed propagator's name)"
        )
    propagator: TextMapPropagator = next(iter(found)).load()()
    return propagator


class _HeaderGetter(Getter[Mapping[str, str]]):
    """The CheckRequest's headers hold one string per name (Envoy joins repeated headers):
    the SDK's default getter would test each value for being an iterable first."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


# Every header the B3 propagator reads (single and multi-header forms).
_B3_HEADERS = ("b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags",
               "x-b3-parentspanid")
Capture = Callable[[Mapping[str, str]], "dict[str, str] | None"]
CarrierExtract = Callable[[Mapping[str, str]], Context]


def maybe_unsampled(carrier: Mapping[str, str]) -> bool:
    """A cheap look at captured trace headers: True if they may say "not sampled".

    Only a hint, to decide whether to run the SDK's propagator on the check path (the mesh
    samples ~1%, so most requests say "not sampled" and need no span at all): a W3C
    traceparent whose flags end the header as 00 (or any even value), B3's sampling state 0.
    The propagator's answer is what counts; a wrong hint costs time, never correctness.
    """
    traceparent = carrier.get("traceparent")
    if traceparent is not None:
        return traceparent[-1:] in _EVEN_HEX
    b3 = carrier.get("b3")
    if b3 is not None:
        return b3 == "0" or b3.split("-")[2:3] == ["0"]
    return carrier.get("x-b3-sampled") in ("0", "false") and carrier.get("x-b3-flags") != "1"


_EVEN_HEX = frozenset("02468aceACE")


def make_deferred(names: Sequence[str]) -> tuple[Capture, CarrierExtract] | None:
    """For the default propagators: (capture, extract), to read the caller's context later.

    `capture(headers)` copies just the trace headers on the check path (no parsing: two map
    lookups when a traceparent is there); `extract(carrier)` runs the SDK propagator on that
    copy when the span is resolved (spans.py). None for configured propagators, whose headers
    we cannot know in advance: they extract on the check path.
    """
    if tuple(names) != DEFAULT_PROPAGATORS:
        return None
    tracecontext, b3 = _default_propagators()

    def capture(headers: Mapping[str, str]) -> dict[str, str] | None:
        traceparent = headers.get("traceparent")
        if traceparent is not None:
            tracestate = headers.get("tracestate")
            if tracestate is None:
                return {"traceparent": traceparent}
            return {"traceparent": traceparent, "tracestate": tracestate}
        if b3 is not None and ("b3" in headers or "x-b3-traceid" in headers):
            return {name: headers[name] for name in _B3_HEADERS if name in headers}
        return None

    def extract(carrier: Mapping[str, str]) -> Context:
        propagator = tracecontext if "traceparent" in carrier or b3 is None else b3
        ctx: Context = propagator.extract(carrier, getter=_GETTER)
        return ctx

    return capture, extract


def _default_propagators() -> tuple[TextMapPropagator, TextMapPropagator | None]:
    tracecontext = _load("tracecontext")
    try:
        return tracecontext, _load("b3multi")
    except TelemetryConfigError:
        # Not asked for explicitly: W3C alone is still useful. A missing dependency is
        # worth a warning, not a service that refuses to start.
        _log.warning("opentelemetry-propagator-b3 is not installed: B3 headers are ignored")
        return tracecontext, None


def make_extractor(names: Sequence[str]) -> Extractor | None:
    """The function that turns request headers into a parent context, or None to not read any."""
    if not names:
        return None
    deferred = make_deferred(names)
    if deferred is not None:
        # The default propagators: the same header choice as the deferred path, now.
        capture, extract = deferred

        def extract_default(headers: Mapping[str, str]) -> Context | None:
            carrier = capture(headers)
            return extract(carrier) if carrier is not None else None

        return extract_default

    composite = CompositePropagator([_load(n) for n in names])

    def extract_configured(headers: Mapping[str, str]) -> Context | None:
        ctx: Context = composite.extract(headers, getter=_GETTER)
        return ctx

    return extract_configured
