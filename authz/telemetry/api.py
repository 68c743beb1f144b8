"""`Telemetry`: set up from settings + OTEL_* env, then called around every check.

See the package docstring (`authz/telemetry/__init__.py`) for how the server uses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, entry_points, version
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode

from authz.config.settings import Settings
from authz.decision import Decision, Outcome
from authz.telemetry.config import TRACES_EXPORTER_GROUP, TelemetryConfig, TelemetryConfigError
from authz.telemetry.logs import DenySampler, mask_url, parse_level
from authz.telemetry.metrics import BridgedHistogram, Counts, HistogramBridge, create_instruments
from authz.telemetry.propagation import (
    Capture,
    Extractor,
    make_deferred,
    make_extractor,
    maybe_unsampled,
)
from authz.telemetry.spans import (
    DeferredSpan,
    DeferredTracer,
    QueueProcessor,
    SpanQueue,
    limits_allow_deferred,
)

_log = logging.getLogger("authz.telemetry")
_deny_log = logging.getLogger("authz.deny")

SCOPE_NAME = "authz"
RPC_SERVICE = "envoy.service.auth.v3.Authorization"
# OpenTelemetry RPC semantic conventions: span name "{rpc.service}/{rpc.method}".
SPAN_NAME = f"{RPC_SERVICE}/Check"
RPC_ATTRIBUTES: Mapping[str, str] = {
    "rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": "Check",
}
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


def _package_version() -> str:
    try:
        return version("authz")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def _resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME win; service.name defaults to "authz"."""
    detected = Resource.create()
    attrs = dict(detected.attributes)
    if str(attrs.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attrs[SERVICE_NAME] = "authz"
    attrs.setdefault(SERVICE_VERSION, _package_version())
    return Resource(attrs, detected.schema_url)


class CheckScope:
    """One check in flight, from `Telemetry.start_check` to `Telemetry.finish_check`.

    Use it as a context manager around the awaited decision: inside `with scope:` the check's
    span is the current span, so spans the store and the JWKS fetcher start become its children.
    An exception leaving the block is recorded on the span (and propagates); the caller still
    finishes the scope, normally with its internal-error decision. `finish` may be called inside
    or after the block, exactly once (later calls are ignored).
    """

    __slots__ = ("_context", "_finished", "_start", "_telemetry", "_token", "span")

    def __init__(
        self,
        telemetry: Telemetry,
        start: float,
        span: trace.Span | None,
        ctx: otel_context.Context | None,
    ) -> None:
        self._telemetry = telemetry
        self._start = start
        self.span = span
        self._context = ctx
        self._token: object | None = None
        self._finished = False

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
        self._telemetry.finish_check(self, decision, subject, path=path)

    @property
    def finished(self) -> bool:
        return self._finished


class Telemetry:
    """Traces, metrics and deny logs for the check path. Build one per process (after any fork).

    Attributes for the server:
      tracer_provider: the SDK TracerProvider, or None when tracing is off.
      config: the effective `TelemetryConfig`.
    """

    def __init__(
        self,
        settings: Settings,
        config: TelemetryConfig,
        *,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        install_global: bool = True,
    ) -> None:
        self.settings = settings
        self.config = config
        tele = settings.telemetry
        self._counts = Counts()
        self._deny_level = parse_level(tele.deny_log_level, "telemetry.deny_log_level")
        self._deny_sampler = DenySampler(tele.deny_log_rate)
        self._hash_subjects = tele.subject_attribute == "hashed"
        salt = tele.subject_salt
        if not salt and tele.subject_attribute == "hashed":
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
        self._resource = _resource()
        self._lock = threading.Lock()
        self._http: Any = None
        self._metrics_address: tuple[str, int] | None = None
        self._stopped = False
        self._installed_global = False

        # Everything that can fail on bad configuration (unknown propagator, OTLP exporter not
        # importable) happens before anything starts a thread or touches global state.
        self.tracer_provider: TracerProvider | None = None
        self._queue: SpanQueue | None = None
        self._tracer: trace.Tracer | None = None
        self._check_tracer: DeferredTracer | None = None
        self._capture: Capture | None = None
        self._extract: Extractor | None = None
        self._parent_decides = False
        # How the check path's spans are made: "deferred" (spans.py) or "sdk".
        self.span_mode = "off"
        exporters: list[SpanExporter] = []
        if span_exporter is not None:
            exporters.append(span_exporter)
        elif config.tracing:
            exporters.extend(_span_exporters(config))
        tracing = bool(exporters) and not config.sdk_disabled
        deferred = None
        if tracing:
            # Deferred spans need the default propagators (known headers) and span limits that
            # cannot cut our spans; otherwise the SDK's tracer does it all on the check path.
            if limits_allow_deferred(SpanLimits()):
                deferred = make_deferred(config.propagators)
            if deferred is None:
                self._extract = make_extractor(config.propagators)
        self.meter_provider: MeterProvider | None = None
        self._prometheus_registry: Any = None
        readers: list[MetricReader] = []
        if config.metrics:
            readers.extend(self._metric_readers(config))
        if metric_reader is not None and not config.sdk_disabled:
            readers.append(metric_reader)

        # ---- traces
        if tracing:
            # Sampler from OTEL_TRACES_SAMPLER(_ARG); default parentbased_always_on, so Envoy's
            # sampling decision (the traceparent flags) is the one that counts.
            provider = TracerProvider(resource=self._resource, shutdown_on_exit=False)
            # One queue and one export thread for every span of this process (spans.py):
            # export never happens on the event loop.
            self._queue = SpanQueue(exporters, config.span_queue)
            provider.add_span_processor(QueueProcessor(self._queue))
            self.tracer_provider = provider
            if deferred is not None:
                self._capture, extract_carrier = deferred
                self._check_tracer = DeferredTracer(
                    provider, InstrumentationScope(SCOPE_NAME, _package_version()), self._queue,
                    extract_carrier)
                self._tracer = self._check_tracer
                self.span_mode = "deferred"
                self._parent_decides = self._check_tracer.drops_unsampled_remote
            else:
                self._tracer = provider.get_tracer(SCOPE_NAME, _package_version())
                self.span_mode = "sdk"
                # parentbased_* samplers (the default) never record a span whose remote parent
                # is not sampled: start_check can then skip the SDK for those requests.
                self._parent_decides = isinstance(provider.sampler, ParentBased)
            # Others' `trace.get_tracer(__name__)` (redis.charge, jwks.fetch) resolve through the
            # global provider. The API allows setting it once per process.
            if install_global and isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
                trace.set_tracer_provider(provider)
                self._installed_global = True

        # ---- metrics
        if readers:
            version_ = _package_version()
            self.meter_provider = MeterProvider(
                metric_readers=readers, resource=self._resource, shutdown_on_exit=False
            )
            create_instruments(self.meter_provider.get_meter(SCOPE_NAME, version_), self._counts)
            bridge = HistogramBridge(
                InstrumentationScope(SCOPE_NAME, version_),
                self._resource,
                [
                    BridgedHistogram(
                        "rpc.server.call.duration", "s",
                        "Check handling time, from the handler's start to its answer.",
                        RPC_ATTRIBUTES, self._counts.check_duration,
                    ),
                    BridgedHistogram(
                        "authz.store.duration", "s",
                        "Bucket store (Redis) charge calls, successful or not.",
                        {}, self._counts.store_duration,
                    ),
                ],
            )
            for reader in readers:
                bridge.attach(reader)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        install_global: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> Telemetry:
        """Raises `TelemetryConfigError` (a ValueError) naming the bad OTEL_* variable.

        `span_exporter` (tests, benchmarks) replaces the exporters OTEL_TRACES_EXPORTER names
        and turns tracing on by itself; `metric_reader` is added to the configured readers.
        `install_global=False` leaves the global TracerProvider alone (tests that build several
        Telemetry objects in one process).
        `environ` (tests) replaces os.environ for what this module decides (which exporters,
        propagators, the Prometheus address); the SDK and the exporters themselves still read
        their settings (sampler, endpoint, headers, batch sizes) from os.environ.
        """
        config = TelemetryConfig.from_env(settings, os.environ if environ is None else environ)
        return cls(
            settings, config, span_exporter=span_exporter, metric_reader=metric_reader,
            install_global=install_global,
        )

    def _metric_readers(self, config: TelemetryConfig) -> list[MetricReader]:
        readers: list[MetricReader] = []
        if "prometheus" in config.metrics_exporters and config.prometheus_port:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry

            # Our own registry: the scrape shows exactly these metrics, and several Telemetry
            # objects (tests) never collide in prometheus_client's global one.
            self._prometheus_registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(registry=self._prometheus_registry))
        if "otlp" in config.metrics_exporters:
            # Interval from OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter(config)))
        if "console" in config.metrics_exporters:
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        return readers

    def tracer(self, name: str) -> trace.Tracer | None:
        """The tracer for spans on the check path (the store's Redis span), named after the
        instrumentation scope; None when tracing is off."""
        provider = self.tracer_provider
        if provider is None:
            return None
        if self._check_tracer is not None:
            return DeferredTracer(provider, InstrumentationScope(name, _package_version()),
                                  self._check_tracer.queue, self._check_tracer.extract)
        return provider.get_tracer(name, _package_version())

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the Prometheus scrape endpoint (if configured). Raises OSError if the port is
        taken, with the address in the message."""
        if self._prometheus_registry is None or self._http is not None:
            return
        from prometheus_client import start_http_server

        host, port = self.config.prometheus_host, self.config.prometheus_port
        try:
            server, _thread = start_http_server(port, addr=host, registry=self._prometheus_registry)
        except OSError as e:
            raise OSError(e.errno, f"metrics endpoint {host}:{port}: {e.strerror}") from e
        self._http = server
        self._metrics_address = (host, server.server_address[1])
        _log.info("metrics endpoint listening", extra={"address": f"{host}:{port}"})

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) the scrape endpoint listens on once started, else None."""
        return self._metrics_address

    def force_flush(self, timeout_millis: int = 5_000) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(timeout_millis)
        if self.meter_provider is not None:
            self.meter_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Stop the endpoint, flush and stop exporters. Idempotent; never raises."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._http is not None:
            try:
                self._http.shutdown()
                self._http.server_close()
            except Exception:
                _log.exception("stopping the metrics endpoint failed")
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    _log.exception("telemetry shutdown failed")

    # ---- the check path -------------------------------------------------------------------

    def start_check(self, headers: Mapping[str, str]) -> CheckScope:
        """Call first thing in the handler. `headers`: the CheckRequest's HTTP headers
        (lower-case keys). Never raises."""
        self._counts.inflight += 1
        start = time.perf_counter()
        tracer = self._tracer
        if tracer is None:
            return CheckScope(self, start, None, None)
        try:
            check_tracer = self._check_tracer
            carrier = None
            parent: otel_context.Context | None = None
            if check_tracer is not None:
                # Deferred: note the trace headers; they are parsed later (spans.py), or now
                # only when they may say "not sampled" and the sampler follows the caller.
                assert self._capture is not None
                carrier = self._capture(headers)
                if carrier is not None and self._parent_decides and maybe_unsampled(carrier):
                    parent = check_tracer.extract(carrier)
            elif self._extract is not None:
                parent = self._extract(headers)
            if parent is not None and self._parent_decides:
                caller = trace.get_current_span(parent).get_span_context()
                if caller.is_valid and not caller.trace_flags.sampled:
                    # A parent-based sampler drops this trace anyway (the mesh samples ~1%):
                    # no span, but the caller's context is current so store/JWKS child spans
                    # are dropped too and the logs carry its trace id.
                    return CheckScope(self, start, None, parent)
            if check_tracer is not None:
                span: trace.Span = check_tracer.start_remote_child(
                    SPAN_NAME, carrier, SpanKind.SERVER, RPC_ATTRIBUTES)
                # On an empty context, not a copy of the current one (nothing else to keep).
                return CheckScope(self, start, span, trace.set_span_in_context(span, _EMPTY))
            span = tracer.start_span(SPAN_NAME, parent, SpanKind.SERVER, RPC_ATTRIBUTES)
            return CheckScope(self, start, span, trace.set_span_in_context(span, parent))
        except Exception:
            _log.exception("starting the check span failed")
            return CheckScope(self, start, None, None)

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
        Idempotent per scope; never raises."""
        if scope._finished:
            return
        scope._finished = True
        counts = self._counts
        counts.inflight -= 1
        try:
            counts.check_duration.record(time.perf_counter() - scope._start)
            outcome = decision.outcome
            counts.count_decision((outcome.value, decision.reason, decision.plan, decision.model))
            span = scope.span
            if span is not None:
                if span.is_recording():
                    _set_attributes(span, self._span_attributes(decision, subject))
                    if outcome in _ERROR_OUTCOMES:
                        span.set_status(Status(StatusCode.ERROR, decision.reason))
                span.end()
            if not decision.allowed and _deny_log.isEnabledFor(self._deny_level):
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
        _deny_log.log(self._deny_level, "deny", extra=fields)

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

    # ---- introspection --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The effective telemetry setup, safe to log (no header values, no passwords)."""
        env = os.environ
        out: dict[str, Any] = {
            "sdk_disabled": self.config.sdk_disabled,
            "service_name": self._resource.attributes.get(SERVICE_NAME),
            "traces": {
                "exporters": list(self.config.traces_exporters),
                "enabled": self.tracer_provider is not None,
                "check_spans": self.span_mode,
                "protocol": self.config.traces_protocol,
                "propagators": list(self.config.propagators),
                "sampler": (
                    self.tracer_provider.sampler.get_description()
                    if self.tracer_provider is not None else None
                ),
            },
            "metrics": {
                "exporters": list(self.config.metrics_exporters),
                "protocol": self.config.metrics_protocol,
                "prometheus": (
                    f"{self.config.prometheus_host}:{self.config.prometheus_port}"
                    if self._prometheus_registry is not None else None
                ),
            },
            "subject_attribute": self.settings.telemetry.subject_attribute,
            "global_tracer_provider": self._installed_global,
        }
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ):
            if env.get(name):
                out[name] = mask_url(env[name])
        for name in (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        ):
            if env.get(name):
                # Header values are typically credentials: show the names only.
                out[name] = ",".join(
                    f"{h.partition('=')[0].strip()}=***" for h in env[name].split(",") if h.strip()
                )
        return out


_EMPTY = otel_context.Context()
_SPAN_FIELDS = ("authz.decision", "authz.reason", "authz.status", "authz.plan", "authz.model",
                "authz.limit", "enduser.pseudo.id")
_LOG_FIELDS = ("outcome", "reason", "status", "plan", "model", "limit", "subject_hash")


def _set_attributes(span: trace.Span, attrs: Mapping[str, Any]) -> None:
    """`span.set_attributes`, minus the SDK's per-value validation when it cannot matter.

    The SDK re-validates every value (~0.6 us each: 11 attributes cost ~6 us, a fifth of a
    sampled span's whole cost). Ours are plain str/int/bool built here, so when the span's
    attribute store is the SDK's BoundedAttributes with no value-length limit and room left, the
    values go straight into its dict. Anything else (another SDK version, limits configured via
    OTEL_ATTRIBUTE_*_LIMIT) takes the public path. tests/telemetry check the exported span.
    """
    if type(span) is DeferredSpan:  # ours: plain values into its own dict
        span.set_trusted_attributes(attrs)
        return
    bounded = getattr(span, "_attributes", None)
    store = getattr(bounded, "_dict", None)
    if (
        type(store) is dict
        and getattr(bounded, "max_value_len", 0) is None
        and len(store) + len(attrs) <= (getattr(bounded, "maxlen", None) or 128)
    ):
        store.update(attrs)
    else:
        span.set_attributes(attrs)


_BROKEN_PROTO_HINT = (
    "the OTLP exporter cannot be imported ({error}). If the message names "
    "opentelemetry.proto: xds-protos ships an older copy of the opentelemetry/proto files and "
    "overwrote opentelemetry-proto's; reinstall it after the other dependencies: "
    "pip install --force-reinstall --no-deps opentelemetry-proto==<installed version>"
)


def _otlp_class(module: str, name: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise TelemetryConfigError(_BROKEN_PROTO_HINT.format(error=e)) from e


def _span_exporters(config: TelemetryConfig) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in config.traces_exporters:
        if name == "otlp":
            # Endpoint, headers, timeout, compression, TLS: the exporter reads OTEL_EXPORTER_OTLP_*.
            module = (
                "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
                if config.traces_protocol == "grpc"
                else "opentelemetry.exporter.otlp.proto.http.trace_exporter"
            )
            exporters.append(_otlp_class(module, "OTLPSpanExporter")())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:  # validated by TelemetryConfig: an installed entry point
            [ep] = entry_points(group=TRACES_EXPORTER_GROUP, name=name)
            exporters.append(ep.load()())
    return exporters


def _otlp_metric_exporter(config: TelemetryConfig) -> Any:
    module = (
        "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"
        if config.metrics_protocol == "grpc"
        else "opentelemetry.exporter.otlp.proto.http.metric_exporter"
    )
    return _otlp_class(module, "OTLPMetricExporter")()
