"""The per-check scope: a check's span, its decision in the metrics, its deny line.

`CheckRecorder` holds everything the event loop calls around a check (`start_check`,
`finish_check`) and the other events the server reports (store calls, config reloads, the
token cache's and the JWKS fetcher's counts). It builds nothing: it counts into
`metrics.Counts`, which the instruments `setup.Telemetry` creates read, and makes spans once
`setup.Telemetry` hands it a tracer (`enable_tracing`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from authz.config.settings import Settings
from authz.decision import Decision, Outcome
from authz.telemetry.logs import DenySampler, parse_level
from authz.telemetry.metrics import Counts
from authz.telemetry.propagation import Extractor, w3c_parent

_log = logging.getLogger("authz.telemetry")
_deny_log = logging.getLogger("authz.deny")

RPC_SERVICE = "envoy.service.auth.v3.Authorization"
# OpenTelemetry RPC semantic conventions: span name "{rpc.service}/{rpc.method}".
SPAN_NAME = f"{RPC_SERVICE}/Check"
RPC_ATTRIBUTES: Mapping[str, str] = {
    "rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": "Check",
}
# The HTTP edge's checks (Envoy's HTTP ext_authz protocol): HTTP server spans by the semantic
# conventions, "{method}" with no route (every path is a check), the method normalized so the
# caller cannot mint span names.
HTTP_ATTRIBUTES: Mapping[str, str] = {"network.protocol.name": "http", "url.scheme": "http"}
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                           "TRACE", "PATCH"})
# Outcomes that mean the service (not the caller) failed: the span gets status ERROR.
_ERROR_OUTCOMES = frozenset({Outcome.BACKEND_ERROR, Outcome.INTERNAL_ERROR})
# Distinct error.type values kept for authz.store.errors before folding into "_other".
_MAX_ERROR_TYPES = 32
# Subjects whose hash is remembered (~150 bytes each): active users repeat, and a hit costs
# 0.1 us against ~1 us for SHA-256.
_SUBJECT_HASH_CACHE = 10_000
# Distinct decision shapes whose span attributes are kept (bounded like the metric labels:
# outcomes x reasons x plans x model rules x limits).
_ATTRIBUTE_CACHE = 4_096
# A deny line shows at most this much of the path (never the query string).
_MAX_LOGGED_PATH = 256

_EMPTY = otel_context.Context()
_SPAN_FIELDS = ("authz.decision", "authz.reason", "authz.status", "authz.plan", "authz.model",
                "authz.limit", "enduser.pseudo.id")
_LOG_FIELDS = ("outcome", "reason", "status", "plan", "model", "limit", "subject_hash")


class CheckScope:
    """One check in flight, from `start_check` to `finish_check`.

    Use it as a context manager around the awaited decision: inside `with scope:` the check's
    span (or, for a caller that is not sampled, the caller's context) is current, so spans the
    store and the JWKS fetcher start become its children. An exception leaving the block is
    recorded on the span (and propagates); the caller still finishes the scope, normally with
    its internal-error decision. `finish` may be called inside or after the block, exactly once
    (later calls are ignored).
    """

    __slots__ = ("_context", "_finished", "_http", "_recorder", "_start", "_token", "span")

    def __init__(
        self,
        recorder: CheckRecorder,
        start: float,
        span: trace.Span | None,
        ctx: otel_context.Context | None,
        http: bool = False,
    ) -> None:
        self._recorder = recorder
        self._start = start
        self.span = span
        self._context = ctx
        self._token: object | None = None
        self._finished = False
        self._http = http  # a check of the HTTP edge: its duration goes to the HTTP histogram

    def __enter__(self) -> CheckScope:
        if self._context is not None:
            self._token = otel_context.attach(self._context)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.span is not None and not self._finished:
            try:
                if self.span.is_recording():
                    self.span.record_exception(exc)
            except Exception:
                _log.exception("recording the exception on the check span failed")
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def finish(self, decision: Decision, subject: str | None = None, *, path: str = "") -> None:
        self._recorder.finish_check(self, decision, subject, path=path)

    @property
    def finished(self) -> bool:
        return self._finished


class CheckRecorder:
    """Spans, metrics and deny lines of the check path (implements `protocol.CheckTelemetry`
    with `setup.Telemetry`, which adds `tracer`). All methods are for the event-loop thread
    and never raise."""

    def __init__(self, settings: Settings, counts: Counts) -> None:
        tele = settings.telemetry
        self._counts = counts
        self._deny_level = parse_level(tele.deny_log_level, "telemetry.deny_log_level")
        self._deny_sampler = DenySampler(tele.deny_log_rate)
        self._hash_subjects = tele.subject_attribute == "hashed"
        salt = tele.subject_salt
        if not salt and self._hash_subjects:
            # An unsalted SHA-256 of a subject is reversible by guessing likely subjects.
            # Without a configured salt, use a random one: hashes still correlate within this
            # process, never across processes, and can never be looked up.
            salt = os.urandom(16).hex()
            _log.warning("telemetry.subject_salt is empty: subject hashes use a random "
                         "per-process salt (set it, e.g. via AUTHZ_SUBJECT_SALT, to correlate "
                         "a subject across replicas)")
        self._salt = salt.encode("utf-8", "surrogatepass")
        self._subject_hashes: dict[str, str] = {}
        self._attribute_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        # Tracing off until enable_tracing.
        self._tracer: trace.Tracer | None = None
        self._extract: Extractor | None = None
        self._skip_unsampled = False
        self._w3c_first = False

    def enable_tracing(self, tracer: trace.Tracer, extract: Extractor | None,
                       skip_unsampled: bool, w3c_first: bool = False) -> None:
        """Check spans from `tracer`, children of the caller's context that `extract` reads
        from the headers. `skip_unsampled`: the sampler drops every span whose remote parent is
        not sampled (parentbased_*), so such checks need no span at all."""
        self._tracer = tracer
        self._extract = extract
        self._skip_unsampled = skip_unsampled
        # The default propagators read `traceparent` first: a plain one is read without the
        # propagator's machinery (propagation.w3c_parent).
        self._w3c_first = w3c_first

    # ---- the check path -------------------------------------------------------------------

    def start_check(self, headers: Mapping[str, str], *,
                    http_method: str | None = None) -> CheckScope:
        """Call first thing in the handler. `headers`: the CheckRequest's HTTP headers
        (lower-case keys). `http_method`: a check of the HTTP edge, with its request's method
        (an HTTP server span instead of the gRPC one)."""
        self._counts.inflight += 1
        start = time.perf_counter()
        tracer = self._tracer
        http = http_method is not None
        if tracer is None:
            return CheckScope(self, start, None, None, http)
        try:
            parent, dropped = self._caller(headers)
            if dropped:
                # The sampler would drop this span (the mesh samples ~1%): make none, but make
                # the caller's context current, so store/JWKS child spans are dropped too and
                # the logs carry its trace id.
                return CheckScope(self, start, None, parent, http)
            if http_method is None:
                span = tracer.start_span(SPAN_NAME, parent, SpanKind.SERVER, RPC_ATTRIBUTES)
            else:
                method = http_method if http_method in _HTTP_METHODS else "_OTHER"
                span = tracer.start_span("HTTP" if method == "_OTHER" else method, parent,
                                         SpanKind.SERVER,
                                         {**HTTP_ATTRIBUTES, "http.request.method": method})
            return CheckScope(self, start, span, trace.set_span_in_context(span, parent), http)
        except Exception:
            _log.exception("starting the check span failed")
            return CheckScope(self, start, None, None, http)

    def _caller(self, headers: Mapping[str, str]) -> tuple[otel_context.Context, bool]:
        """The caller's context from the trace headers (empty without any, or when they cannot
        be read: the check span is then a root, never the child of whatever context happens to
        be current), and whether the sampler is sure to drop the check's span (a parent-based
        sampler and a caller that is not sampled)."""
        if self._w3c_first:
            traceparent = headers.get("traceparent")
            if traceparent is not None:
                found = w3c_parent(traceparent)
                if found is not None:
                    caller, sampled = found
                    if not sampled and self._skip_unsampled:
                        return caller, True
                    # Otherwise the span is ours to make, and it carries the caller's
                    # tracestate: only the propagator reads that header.
                    if "tracestate" not in headers:
                        return caller, False
        if self._extract is None:
            return _EMPTY, False
        parent = self._extract(headers) or _EMPTY
        if self._skip_unsampled:
            context = trace.get_current_span(parent).get_span_context()
            if context.is_valid and not context.trace_flags.sampled:
                return parent, True
        return parent, False

    def finish_check(
        self,
        scope: CheckScope,
        decision: Decision,
        subject: str | None = None,
        *,
        path: str = "",
    ) -> None:
        """Call once the decision is made (inside `with scope:` so the deny line carries the
        trace id either way). `subject` is hashed or dropped per telemetry.subject_attribute,
        never logged raw; `path` (optional) is logged on denies without its query string.
        Idempotent per scope."""
        if scope._finished:
            return
        scope._finished = True
        counts = self._counts
        counts.inflight -= 1
        try:
            histogram = counts.http_check_duration if scope._http else counts.check_duration
            histogram.record(time.perf_counter() - scope._start)
            outcome = decision.outcome
            counts.count_decision((outcome.value, decision.reason, decision.plan, decision.model))
            span = scope.span
            if span is not None:
                if span.is_recording():
                    span.set_attributes(self._span_attributes(decision, subject))
                    if scope._http:
                        span.set_attribute("http.response.status_code", decision.status)
                    if outcome in _ERROR_OUTCOMES:
                        span.set_status(Status(StatusCode.ERROR, decision.reason))
                span.end()
            # Denials, and what shadow mode let through (what enforcement would deny), share
            # the one sampled line.
            if (not decision.allowed or outcome is Outcome.SHADOW) and \
                    _deny_log.isEnabledFor(self._deny_level):
                sampler = self._deny_sampler
                if sampler.allow(time.monotonic()):
                    self._log_deny(scope, decision, subject, path)
        except Exception:
            _log.exception("recording the check's telemetry failed")

    def _decision_fields(
        self, decision: Decision, subject: str | None, names: tuple[str, ...]
    ) -> dict[str, Any]:
        """The decision as named fields, shared by span attributes and the deny line.

        `names`: the field names for (outcome, reason, status, plan, model, limit, subject)."""
        out: dict[str, Any] = {
            names[0]: decision.outcome.value,
            names[1]: decision.reason,
            names[2]: decision.status,
        }
        for name, value in ((names[3], decision.plan), (names[4], decision.model),
                            (names[5], decision.limit)):
            if value:
                out[name] = value
        if subject and self._hash_subjects:
            out[names[6]] = self.subject_hash(subject)
        return out

    def _span_attributes(self, decision: Decision, subject: str | None) -> dict[str, Any]:
        # A handful of distinct decisions repeat (plans x models x outcomes): their attribute
        # dicts are built once. The span copies the values, so the cached dict is never changed.
        key = (decision.outcome, decision.reason, decision.status, decision.plan,
               decision.model, decision.limit, decision.token_cache_hit)
        base = self._attribute_cache.get(key)
        if base is None:
            base = self._decision_fields(decision, None, _SPAN_FIELDS)
            if decision.token_cache_hit is not None:
                base["authz.token_cache.hit"] = decision.token_cache_hit
            if len(self._attribute_cache) >= _ATTRIBUTE_CACHE:
                self._attribute_cache.clear()
            self._attribute_cache[key] = base
        if subject and self._hash_subjects:
            return {**base, _SPAN_FIELDS[6]: self.subject_hash(subject)}
        return base

    def _log_deny(
        self, scope: CheckScope, decision: Decision, subject: str | None, path: str
    ) -> None:
        fields = self._decision_fields(decision, subject, _LOG_FIELDS)
        if path:
            fields["path"] = path.partition("?")[0][:_MAX_LOGGED_PATH]
        suppressed = self._deny_sampler.suppressed
        if suppressed:
            fields["suppressed"] = suppressed  # deny lines dropped by the rate limit since
            self._deny_sampler.suppressed = 0
        if scope.span is not None:
            ctx = scope.span.get_span_context()
            if ctx.is_valid:
                fields["trace_id"] = format(ctx.trace_id, "032x")
                if ctx.trace_flags.sampled:  # an unsampled span is never exported
                    fields["span_id"] = format(ctx.span_id, "016x")
        elif scope._context is not None:
            # An unsampled caller: no span of ours, but the trace id still joins the logs of
            # the caller and of the upstream.
            ctx = trace.get_current_span(scope._context).get_span_context()
            if ctx.is_valid:
                fields["trace_id"] = format(ctx.trace_id, "032x")
        _deny_log.log(self._deny_level, "deny" if not decision.allowed else "shadow",
                      extra=fields)

    def subject_hash(self, subject: str) -> str:
        """Salted SHA-256 of the subject, first 16 hex chars (64 bits: collisions are
        irrelevant at any realistic user count, and it stays short in logs)."""
        cache = self._subject_hashes
        hashed = cache.get(subject)
        if hashed is None:
            digest = hashlib.sha256(self._salt + b"\0" + subject.encode("utf-8", "surrogatepass"))
            hashed = digest.hexdigest()[:16]
            if len(cache) >= _SUBJECT_HASH_CACHE:
                cache.clear()  # crude but bounded; refills with whoever is active
            cache[subject] = hashed
        return hashed

    # ---- other events ---------------------------------------------------------------------

    def observe_store_call(self, duration_s: float, ok: bool, error_type: str = "error") -> None:
        """One bucket-store call: its duration, and its failure if not ok. `error_type`: a
        bounded name such as "timeout" or "connection" (the exception's class name is fine)."""
        counts = self._counts
        counts.store_duration.record(duration_s)
        if not ok:
            errors = counts.store_errors
            if error_type not in errors and len(errors) >= _MAX_ERROR_TYPES:
                error_type = "_other"
            errors[error_type] = errors.get(error_type, 0) + 1

    def register_token_cache(
        self,
        hits: Callable[[], int],
        misses: Callable[[], int],
        entries: Callable[[], int],
    ) -> None:
        """Cumulative hit/miss counts and the current size, read at each collection (from an
        exporter thread: the callables must only read)."""
        self._counts.token_cache = (hits, misses, entries)

    def register_jwks(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Cumulative JWKS fetch counts keyed by (issuer, result), result "ok" or "error"."""
        self._counts.jwks = counts

    def config_reloaded(self, ok: bool) -> None:
        self._counts.config_reloads["ok" if ok else "error"] += 1
