"""Deferred spans: the check path records a span's facts; a thread makes the SDK spans.

Why. Every check makes two spans (the Check span and the Redis call's). Measured side by side
in the full server (`loadtests/bench.py`, full-otel against full-notel), the SDK's tracer cost
~20 us of CPU per span there, against ~5 us for the same span in a tight loop: one span per
check runs its code cold, between two gRPC calls, and pays for every cache miss on the way
(an extra identical span in the same check costs ~1.5 us). Issue 5 allows telemetry 10% of a
~450 us check. So the check path now does as little as it can, and the rest happens in batches
on the export thread, where the same code runs warm:

- on the check path: note the caller's trace headers (not parsed), the parent span object,
  the start and end times, the attributes; append the ended span to a queue;
- on the export thread, per batch: extract the caller's context with the SDK's propagators,
  apply the provider's sampler (OTEL_TRACES_SAMPLER) and id generator, build the SDK's own
  `ReadableSpan` and hand the batch to the standard exporters.

A span is resolved earlier only when something asks for its context on the check path: a JWKS
fetch starting an SDK child span, a deny log line with its trace id, a Redis write shared by
several checks (links). `get_span_context()` then does the same work once, under a lock, and
every later reader (the export thread included) gets the same answer.

`SpanQueue` replaces the SDK's BatchSpanProcessor for these spans and for the SDK provider's
own (through `QueueProcessor`), so one thread calls the exporters; it honours OTEL_BSP_*.

Used when the span limits are the defaults and the propagators are the default ones
(`Telemetry.deferred_spans`); otherwise the SDK's tracer makes the check spans, which enforces
limits and keeps whatever else a custom propagator extracts (baggage).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    StaticSampler,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

from authz.telemetry.config import QueueSettings

if TYPE_CHECKING:
    from opentelemetry.util._decorator import _AgnosticContextManager

_log = logging.getLogger(__name__)

_UNSET = Status(StatusCode.UNSET)
# Trace flags by (sampled, random trace id), built once.
_FLAGS = {
    (sampled, random_id): TraceFlags((TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
                                     | (TraceFlags.RANDOM_TRACE_ID if random_id else 0))
    for sampled in (False, True) for random_id in (False, True)
}
# A check span carries up to 12 attributes, the Redis span 3, and a batch links to at most
# store.max_batch checks: limits at least this large never cut anything of ours.
_NEEDED_ATTRIBUTES = 32
_NEEDED_LINKS = 128
_NEEDED_EVENTS = 8
_PRIMITIVES = (str, bool, int, float)
# Resolution happens once per span, on whichever thread asks first. One lock for all spans
# (a child resolves its parent while holding it, hence re-entrant); uncontended almost always.
_RESOLVE_LOCK = threading.RLock()
# A full queue drops spans; say so at most this often.
_DROP_WARNING_INTERVAL = 60.0

Carrier = Mapping[str, str]
Extract = Callable[[Carrier], otel_context.Context]


def limits_allow_deferred(limits: SpanLimits) -> bool:
    """True when the SDK's span limits (from OTEL_*_LIMIT) can never cut one of our spans, so
    not enforcing them changes nothing."""
    def at_least(value: int | None, needed: int) -> bool:
        return value is None or value >= needed

    return (
        limits.max_span_attribute_length is None
        and limits.max_attribute_length is None
        and at_least(limits.max_span_attributes, _NEEDED_ATTRIBUTES)
        and at_least(limits.max_links, _NEEDED_LINKS)
        and at_least(limits.max_events, _NEEDED_EVENTS)
        and at_least(limits.max_event_attributes, _NEEDED_ATTRIBUTES)
        and at_least(limits.max_link_attributes, _NEEDED_ATTRIBUTES)
    )


def _clean(value: Any) -> types.AnyValue | None:
    """An attribute value as the OpenTelemetry API allows it, or None to drop it."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = tuple(value)
        kinds = {type(v) for v in items if v is not None}
        if len(kinds) <= 1 and all(isinstance(v, _PRIMITIVES) or v is None for v in items):
            return items
    return None


def _static_decisions(sampler: Sampler) -> dict[tuple[bool, bool], Decision] | None:
    """The sampler's decision for a span with a valid parent, by (parent is remote, parent is
    sampled), when that decision depends on nothing else; None when it may (a ratio sampler).

    Covers the SDK's AlwaysOn/AlwaysOff and ParentBased with the default (static) delegates:
    OTEL_TRACES_SAMPLER=always_on, always_off and every parentbased_* value. The result is the
    one the SDK computes: the static decision, the given attributes, the parent's trace state.
    Anything not recognised takes `should_sample`.
    """
    def decision_of(static: object) -> Decision | None:
        if type(static) is not StaticSampler:
            return None
        return static.should_sample(None, 1, "").decision

    if type(sampler) is StaticSampler:
        fixed = decision_of(sampler)
        assert fixed is not None
        return {(remote, sampled): fixed for remote in (False, True) for sampled in (False, True)}
    if type(sampler) in (ParentBased, ParentBasedTraceIdRatio):
        delegates = {
            (True, True): getattr(sampler, "_remote_parent_sampled", None),
            (True, False): getattr(sampler, "_remote_parent_not_sampled", None),
            (False, True): getattr(sampler, "_local_parent_sampled", None),
            (False, False): getattr(sampler, "_local_parent_not_sampled", None),
        }
        decisions: dict[tuple[bool, bool], Decision] = {}
        for key, delegate in delegates.items():
            decision = decision_of(delegate)
            if decision is None:
                return None
            decisions[key] = decision
        return decisions
    return None


# ---- the queue and its export thread -------------------------------------------------------


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class SpanQueue:
    """Ended spans wait here; a daemon thread exports them in batches.

    Items are `DeferredSpan`s (resolved and turned into ReadableSpans on the thread) or the SDK
    provider's finished `ReadableSpan`s (exported as they are). The thread exports when a batch
    is full or `schedule_delay_s` has passed, whichever comes first; a full queue refuses new
    spans (counted in `dropped`) and logs a warning at most once a minute.
    """

    def __init__(self, exporters: Sequence[SpanExporter], settings: QueueSettings) -> None:
        self._exporters = tuple(exporters)
        self._settings = settings
        self._queue: deque[Any] = deque()
        self._max = settings.max_queue_size
        self._batch = settings.max_export_batch_size
        self._wake = threading.Event()
        self._stopping = False
        self._stopped = False
        self._export_lock = threading.Lock()
        self.dropped = 0
        self.exported = 0
        self._last_drop_warning = 0.0
        self.failed = 0
        self._last_failure_log = 0.0
        self._thread = threading.Thread(target=self._run, name="authz-span-export", daemon=True)
        self._thread.start()

    # -- the check path: append and go --------------------------------------------------------
    def put(self, item: Any) -> None:
        queue = self._queue
        if len(queue) >= self._max:
            self._drop()
            return
        queue.append(item)
        if len(queue) >= self._batch:
            self._wake.set()

    def _drop(self) -> None:
        if self._stopping:
            return
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_warning >= _DROP_WARNING_INTERVAL:
            self._last_drop_warning = now
            _log.warning("span queue full (OTEL_BSP_MAX_QUEUE_SIZE=%d): dropping spans, "
                         "%d so far; the exporter is not keeping up", self._max, self.dropped)

    def _failed(self) -> None:
        self.failed += 1
        now = time.monotonic()
        if now - self._last_failure_log >= _DROP_WARNING_INTERVAL:
            self._last_failure_log = now
            _log.exception("building a span for export failed (%d so far); span dropped",
                           self.failed)

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._settings.schedule_delay_s)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        """Export everything queued now, in batches of at most max_export_batch_size."""
        with self._export_lock:
            queue = self._queue
            while queue:
                batch: list[ReadableSpan] = []
                flushes: list[_Flush] = []
                while queue and len(batch) < self._batch:
                    item = queue.popleft()
                    kind = type(item)
                    if kind is _Flush:
                        flushes.append(item)
                        break  # everything queued before it goes out first
                    try:
                        readable = item.readable() if kind is DeferredSpan else item
                    except Exception:  # a bug, or a propagator/sampler failing: skip the span
                        self._failed()
                        continue
                    if readable is not None:
                        batch.append(readable)
                if batch:
                    self._export(batch)
                for flush in flushes:
                    flush.done.set()

    def _export(self, batch: list[ReadableSpan]) -> None:
        # Spans the exporters themselves cause (an instrumented HTTP client) are not traced.
        token = otel_context.attach(otel_context.set_value(
            otel_context._SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            for exporter in self._exporters:
                try:
                    exporter.export(batch)
                except Exception:
                    _log.exception("span export failed")
            self.exported += len(batch)
        finally:
            otel_context.detach(token)

    # -- lifecycle --------------------------------------------------------------------------
    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything queued so far; True if that finished within the timeout."""
        if self._stopped:
            return True
        marker = _Flush()
        self._queue.append(marker)  # past the size limit on purpose: it is not a span
        self._wake.set()
        return marker.done.wait(timeout_millis / 1000)

    def shutdown(self, timeout_millis: int = 30_000) -> None:
        if self._stopped:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_millis / 1000)
        self._stopped = True
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:
                _log.exception("span exporter shutdown failed")


class QueueProcessor(SpanProcessor):
    """The SDK provider's processor: its sampled spans (JWKS fetches, libraries) join the queue,
    so one thread calls the exporters."""

    def __init__(self, queue: SpanQueue) -> None:
        self._queue = queue

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self._queue.put(span)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._queue.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._queue.shutdown()


# ---- spans ---------------------------------------------------------------------------------


class DeferredSpan(trace.Span):
    """A span whose context (ids, sampling) is worked out when first needed, not when started.

    Mutable until `end()`, which queues it; later calls are ignored, as the SDK's spans ignore
    them. Only the thread that started it changes it; the export thread reads it once ended.
    """

    # Fields most spans never set, as class-level defaults: fewer stores per span started.
    _events: list[Event] | None = None
    _end: int | None = None
    _status = _UNSET
    _context: SpanContext | None = None
    _parent_context: SpanContext | None = None
    _sampler_attributes: types.Attributes = None

    def __init__(
        self,
        tracer: DeferredTracer,
        name: str,
        kind: SpanKind,
        parent: trace.Span | Carrier | None,
        attributes: dict[str, types.AnyValue],
        links: Sequence[Link],
        start_time: int,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._kind = kind
        # The caller's trace headers (a check span), the parent span object, or None (root).
        self._parent = parent
        self._attributes = attributes
        self._links = links
        self._start = start_time

    # -- the check path's own calls -----------------------------------------------------------
    def set_trusted_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Attributes built by this package (plain str/int/bool): no validation needed."""
        if self._end is None:
            self._attributes.update(attributes)

    # -- opentelemetry.trace.Span -------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._tracer.resolve(self)
        return context

    def is_recording(self) -> bool:
        return self._end is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        self.set_attributes({key: value})

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end is not None:
            return
        for key, value in attributes.items():
            cleaned = _clean(value)
            if not key or cleaned is None:
                _log.warning("invalid span attribute %r dropped", key)
                continue
            self._attributes[key] = cleaned

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end is not None:
            return
        if self._events is None:
            self._events = []
        if len(self._events) < _NEEDED_EVENTS:
            self._events.append(Event(name, attributes, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end is None and context.is_valid and len(self._links) < _NEEDED_LINKS:
            self._links = (*self._links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET never overrides.
        if self._end is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        import traceback

        kind = type(exception)
        module = kind.__module__
        event: dict[str, types.AnyValue] = {
            "exception.type": (f"{module}.{kind.__qualname__}"
                               if module and module != "builtins" else kind.__qualname__),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else time_ns()
        self._tracer.queue.put(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self._end is None:
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    # -- the export thread ----------------------------------------------------------------------
    def readable(self) -> ReadableSpan | None:
        """The SDK's span for the exporters, or None if the sampler dropped this one."""
        context = self._context or self._tracer.resolve(self)
        if not context.trace_flags & TraceFlags.SAMPLED:
            return None
        # Ended: nothing changes these attributes any more, so the span can have them as they are.
        attributes = self._attributes
        if self._sampler_attributes:
            attributes = {**self._sampler_attributes, **attributes}
        tracer = self._tracer
        return ReadableSpan(
            self._name, context, self._parent_context, tracer.resource, attributes,
            tuple(self._events or ()), tuple(self._links), self._kind, None, self._status,
            self._start, self._end, tracer.scope,
        )

    def __repr__(self) -> str:
        return f'DeferredSpan(name="{self._name}", context={self._context})'


class DeferredTracer(trace.Tracer):
    """Starts `DeferredSpan`s: see the module docstring.

    `extract`: turns captured trace headers into the caller's context (the SDK propagators);
    `queue`: where ended spans go.
    """

    def __init__(
        self,
        provider: TracerProvider,
        scope: InstrumentationScope,
        queue: SpanQueue,
        extract: Extract,
    ) -> None:
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self._random_ids = self._ids.is_trace_id_random()
        self._by_parent = _static_decisions(self._sampler)
        self.extract = extract
        self.resource = provider.resource
        self.scope = scope
        self.queue = queue

    def _decision_for(self, parent: SpanContext) -> Decision | None:
        """The sampler's decision for a child of this valid parent, if it depends on nothing
        else (see _static_decisions); None: ask the sampler."""
        if self._by_parent is None:
            return None
        return self._by_parent[parent.is_remote, bool(parent.trace_flags & TraceFlags.SAMPLED)]

    @property
    def drops_unsampled_remote(self) -> bool:
        """The sampler drops every span whose remote parent is not sampled (parentbased_*)."""
        return self._by_parent is not None and self._by_parent[True, False] is Decision.DROP

    def start_remote_child(
        self,
        name: str,
        carrier: Carrier | None,
        kind: SpanKind,
        attributes: Mapping[str, types.AnyValue],
    ) -> DeferredSpan:
        """A span whose parent is in the caller's trace headers (`carrier`: just those headers,
        None if there were none), read only when the span is resolved."""
        return DeferredSpan(self, name, kind, carrier, dict(attributes), (), time_ns())

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        current = trace.get_current_span(context)
        parent: trace.Span | None = current
        if type(current) is not DeferredSpan:  # a deferred parent is kept unresolved
            parent_context = current.get_span_context()
            if not parent_context.is_valid:
                parent = None
            elif self._decision_for(parent_context) is Decision.DROP:
                # Known now (an unsampled caller, parent-based sampling): no span to record,
                # just a context for any children, as the SDK's tracer returns.
                return trace.NonRecordingSpan(SpanContext(
                    parent_context.trace_id, self._ids.generate_span_id(), False,
                    _FLAGS[False, bool(parent_context.trace_flags & TraceFlags.RANDOM_TRACE_ID)],
                    parent_context.trace_state))
        return DeferredSpan(
            self, name, kind, parent, dict(attributes) if attributes else {},
            tuple(link for link in links if link.context.is_valid) if links else (),
            start_time if start_time is not None else time_ns(),
        )

    def start_as_current_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _AgnosticContextManager[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return trace.use_span(span, end_on_exit=end_on_exit,
                              record_exception=record_exception,
                              set_status_on_exception=set_status_on_exception)

    def resolve(self, span: DeferredSpan) -> SpanContext:
        """Work out the span's context once: parent, trace id, sampling decision, span id."""
        with _RESOLVE_LOCK:
            if span._context is not None:
                return span._context
            parent = span._parent
            parent_context: SpanContext | None = None
            if type(parent) is dict:  # the caller's trace headers (start_remote_child)
                parent_context = trace.get_current_span(self.extract(parent)).get_span_context()
            elif parent is not None:
                parent_context = parent.get_span_context()  # type: ignore[union-attr]
            if parent_context is not None and not parent_context.is_valid:
                parent_context = None

            decision: Decision | None = None
            trace_state = None
            attributes: types.Attributes = span._attributes
            if parent_context is not None:
                trace_id = parent_context.trace_id
                random_id = parent_context.trace_flags & TraceFlags.RANDOM_TRACE_ID
                decision = self._decision_for(parent_context)
                trace_state = parent_context.trace_state
            else:
                trace_id = self._ids.generate_trace_id()
                random_id = self._random_ids
            if decision is None:
                # The parent as the sampler must see it; never "the current context", which
                # may hold this very span.
                sampler_parent = (trace.set_span_in_context(trace.NonRecordingSpan(parent_context))
                                  if parent_context is not None else otel_context.Context())
                result = self._sampler.should_sample(
                    sampler_parent, trace_id, span._name, span._kind, span._attributes,
                    span._links)
                decision = result.decision
                trace_state = result.trace_state
                attributes = result.attributes
            context = SpanContext(
                trace_id, self._ids.generate_span_id(), False,
                _FLAGS[decision is Decision.RECORD_AND_SAMPLE, bool(random_id)], trace_state,
            )
            span._parent_context = parent_context
            if attributes is not span._attributes:
                span._sampler_attributes = attributes
            span._context = context
            return context
