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
from opentelemetry.propagators.textmap import TextMapPropagator
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


def _tracecontext_only(tracecontext: TextMapPropagator) -> Extractor:
    def extract(headers: Mapping[str, str]) -> Context | None:
        if "traceparent" in headers:
            ctx: Context = tracecontext.extract(headers)
            return ctx
        return None

    return extract


def make_extractor(names: Sequence[str]) -> Extractor | None:
    """The function that turns request headers into a parent context, or None to not read any."""
    if not names:
        return None
    if tuple(names) == DEFAULT_PROPAGATORS:
        tracecontext = _load("tracecontext")
        try:
            b3 = _load("b3multi")
        except TelemetryConfigError:
            # Not asked for explicitly: W3C alone is still useful. A missing dependency is
            # worth a warning, not a service that refuses to start.
            _log.warning("opentelemetry-propagator-b3 is not installed: B3 headers are ignored")
            return _tracecontext_only(tracecontext)

        def extract_default(headers: Mapping[str, str]) -> Context | None:
            if "traceparent" in headers:
                ctx: Context = tracecontext.extract(headers)
                return ctx
            if "b3" in headers or "x-b3-traceid" in headers:
                ctx = b3.extract(headers)
                return ctx
            return None

        return extract_default

    composite = CompositePropagator([_load(n) for n in names])

    def extract_configured(headers: Mapping[str, str]) -> Context | None:
        ctx: Context = composite.extract(headers)
        return ctx

    return extract_configured
