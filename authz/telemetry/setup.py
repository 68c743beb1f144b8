"""`Telemetry`: the process's providers, readers and exporters, built from settings + OTEL_*.

Traces: the SDK's TracerProvider (sampler from OTEL_TRACES_SAMPLER, span limits from
OTEL_*_LIMIT) with one BatchSpanProcessor per exporter (OTEL_BSP_*, validated at startup).
Metrics: a MeterProvider with the Prometheus reader (our own registry, with the process metrics,
served by `endpoint`) and/or a periodic OTLP reader. The per-check work is
`check.CheckRecorder`, which `Telemetry` extends; see the package docstring
(`authz/telemetry/__init__.py`) for how the server uses it.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import ProxyTracerProvider

from authz.config.settings import Settings
from authz.telemetry.check import HTTP_ATTRIBUTES, RPC_ATTRIBUTES, CheckRecorder
from authz.telemetry.config import (
    DEFAULT_PROPAGATORS,
    TRACES_EXPORTER_GROUP,
    TelemetryConfig,
    TelemetryConfigError,
)
from authz.telemetry.endpoint import register_process_collectors, serve_metrics
from authz.telemetry.logs import mask_url
from authz.telemetry.metrics import BridgedHistogram, Counts, HistogramBridge, create_instruments
from authz.telemetry.propagation import make_extractor

_log = logging.getLogger("authz.telemetry")

# The instrumentation scope of the check spans and of every metric.
SCOPE_NAME = "authz"


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


class Telemetry(CheckRecorder):
    """Traces, metrics and deny logs for the check path. Build one per process (after any fork:
    the SDK's export threads do not survive one).

    Attributes for the server:
      tracer_provider: the SDK TracerProvider, or None when tracing is off.
      meter_provider: the SDK MeterProvider, or None when no reader is configured.
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
        super().__init__(settings, Counts())  # checks the telemetry.* settings
        self.settings = settings
        self.config = config
        self._version = _package_version()
        self._resource = _resource()
        self._lock = threading.Lock()
        self._http: Any = None
        self._metrics_address: tuple[str, int] | None = None
        self._stopped = False
        self._installed_global = False
        self._prometheus_registry: Any = None

        # Everything that can fail on bad configuration (unknown propagator, OTLP exporter not
        # importable) happens before a provider starts a thread or global state is touched.
        exporters: list[SpanExporter] = []
        if span_exporter is not None:
            exporters.append(span_exporter)
        elif config.tracing:
            exporters.extend(_span_exporters(config))
        tracing = bool(exporters) and not config.sdk_disabled
        extract = make_extractor(config.propagators) if tracing else None
        readers: list[MetricReader] = []
        if config.metrics:
            readers.extend(self._metric_readers(config))
        if metric_reader is not None and not config.sdk_disabled:
            readers.append(metric_reader)

        # ---- traces
        self.tracer_provider: TracerProvider | None = None
        if tracing:
            # Sampler from OTEL_TRACES_SAMPLER(_ARG); default parentbased_always_on, so Envoy's
            # sampling decision (the traceparent flags) is the one that counts.
            provider = TracerProvider(resource=self._resource, shutdown_on_exit=False)
            queue = config.span_queue
            for exporter in exporters:
                # Export happens on the processor's thread, never on the event loop.
                provider.add_span_processor(BatchSpanProcessor(
                    exporter,
                    max_queue_size=queue.max_queue_size,
                    schedule_delay_millis=queue.schedule_delay_s * 1000,
                    max_export_batch_size=queue.max_export_batch_size,
                    export_timeout_millis=queue.export_timeout_s * 1000,
                ))
            self.tracer_provider = provider
            # Every parentbased_* sampler drops a span whose remote parent is not sampled, so
            # for such a caller start_check skips the span altogether.
            self.enable_tracing(provider.get_tracer(SCOPE_NAME, self._version), extract,
                                skip_unsampled=isinstance(provider.sampler, ParentBased),
                                w3c_first=tuple(config.propagators) == DEFAULT_PROPAGATORS)
            # Others' `trace.get_tracer(__name__)` (jwks.fetch) resolve through the global
            # provider. The API allows setting it once per process.
            if install_global and isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
                trace.set_tracer_provider(provider)
                self._installed_global = True

        # ---- metrics
        self.meter_provider: MeterProvider | None = None
        if readers:
            self.meter_provider = MeterProvider(
                metric_readers=readers, resource=self._resource, shutdown_on_exit=False
            )
            counts = self._counts
            create_instruments(self.meter_provider.get_meter(SCOPE_NAME, self._version), counts)
            # The latency histograms are aggregated in Counts and added to what each reader
            # collects (metrics.py says why).
            bridge = HistogramBridge(
                InstrumentationScope(SCOPE_NAME, self._version),
                self._resource,
                [
                    BridgedHistogram(
                        "rpc.server.call.duration", "s",
                        "Check handling time, from the handler's start to its answer.",
                        RPC_ATTRIBUTES, counts.check_duration,
                    ),
                    BridgedHistogram(
                        "http.server.request.duration", "s",
                        "HTTP edge check handling time, from the whole request read to its "
                        "answer.",
                        HTTP_ATTRIBUTES, counts.http_check_duration,
                    ),
                    BridgedHistogram(
                        "authz.store.duration", "s",
                        "Bucket store (Redis) charge calls, successful or not.",
                        {}, counts.store_duration,
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
        propagators, batch sizes, the Prometheus address); the SDK and the exporters themselves
        still read their settings (sampler, span limits, endpoint, headers) from os.environ.
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
            register_process_collectors(self._prometheus_registry)
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
        return provider.get_tracer(name, self._version)

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the Prometheus scrape endpoint (if configured). Raises OSError if the port is
        taken, with the address in the message."""
        if self._prometheus_registry is None or self._http is not None:
            return
        host, port = self.config.prometheus_host, self.config.prometheus_port
        try:
            server = serve_metrics(host, port, self._prometheus_registry)
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


_BROKEN_PROTO_HINT = (
    "the OTLP exporter cannot be imported ({error}). If the message names "
    "opentelemetry.proto: xds-protos ships an older copy of the opentelemetry/proto files and "
    "overwrote opentelemetry-proto's; reinstall it after the other dependencies: "
    "pip install --force-reinstall --no-deps opentelemetry-proto==<installed version>"
)


def _otlp_class(module: str, name: str) -> Any:
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
