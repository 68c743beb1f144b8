"""Which telemetry is on, read from the standard `OTEL_*` environment variables.

Pure: `TelemetryConfig.from_env(settings, environ)` turns a settings object and an environment
mapping into plain values, and names the variable and the accepted values when one is wrong.

Where we depart from the OpenTelemetry SDK's own defaults, and why:
- `OTEL_TRACES_EXPORTER` unset means "otlp" only when an OTLP endpoint is configured, else
  "none": an authz sidecar without a collector must not spend CPU building spans nobody receives,
  nor log export errors every few seconds (the SDK default would export to localhost:4317).
- `OTEL_METRICS_EXPORTER` unset means "prometheus" (the scrape endpoint on
  `server.metrics_port`), plus "otlp" when an OTLP endpoint is configured.
- `OTEL_PROPAGATORS` unset means W3C tracecontext and B3 (single and multi header): Istio's Envoy
  forwards one or the other depending on the mesh's tracer. Baggage is not read: nothing here
  uses it.
Everything the SDK and exporters read themselves (OTEL_TRACES_SAMPLER(_ARG), OTEL_*_LIMIT,
OTEL_METRIC_EXPORT_INTERVAL, OTEL_EXPORTER_OTLP_HEADERS/TIMEOUT/COMPRESSION/CERTIFICATE,
OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME) keeps its standard meaning, and so do OTEL_BSP_*,
which are checked here and handed to the SDK's BatchSpanProcessor (`QueueSettings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Literal

from authz.config.settings import Settings
from authz.errors import TelemetryConfigError

__all__ = ["TelemetryConfig", "TelemetryConfigError"]

Protocol = Literal["grpc", "http/protobuf"]

TRACES_EXPORTERS = ("otlp", "console", "none")
# Other names for OTEL_TRACES_EXPORTER are looked up here, as the SDK's autoconfiguration does
# (e.g. "otlp_proto_grpc", "zipkin_json", or "authz_discard" for benchmarks).
TRACES_EXPORTER_GROUP = "opentelemetry_traces_exporter"
METRICS_EXPORTERS = ("prometheus", "otlp", "console", "none")
# Names as registered under the `opentelemetry_propagator` entry point group.
DEFAULT_PROPAGATORS = ("tracecontext", "b3multi")
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http/protobuf")
# The OTLP spec's default protocol for SDKs; the collector listens on 4318 for it.
DEFAULT_PROTOCOL: Protocol = "http/protobuf"



@dataclass(frozen=True)
class QueueSettings:
    """The BatchSpanProcessor's export queue, from OTEL_BSP_* (the SDK's meanings and defaults).

    Read here rather than by the SDK so that a bad value stops startup with the variable's
    name; the SDK would log it and carry on with its default."""

    max_queue_size: int = 2048  # OTEL_BSP_MAX_QUEUE_SIZE
    schedule_delay_s: float = 5.0  # OTEL_BSP_SCHEDULE_DELAY (milliseconds in the variable)
    max_export_batch_size: int = 512  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    export_timeout_s: float = 30.0  # OTEL_BSP_EXPORT_TIMEOUT (milliseconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> QueueSettings:
        d = cls()
        size = _positive_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", d.max_queue_size)
        batch = _positive_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", d.max_export_batch_size)
        if batch > size:
            raise TelemetryConfigError(
                f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch} is larger than "
                f"OTEL_BSP_MAX_QUEUE_SIZE={size}")
        delay = _positive_int(environ, "OTEL_BSP_SCHEDULE_DELAY", int(d.schedule_delay_s * 1000))
        timeout = _positive_int(environ, "OTEL_BSP_EXPORT_TIMEOUT", int(d.export_timeout_s * 1000))
        return cls(size, delay / 1000, batch, timeout / 1000)


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    return _int(environ, name, default, 1, None, "a whole number above 0")


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    # OTEL_SDK_DISABLED=true: no spans, no metrics, no scrape endpoint. Logs still work.
    sdk_disabled: bool
    # "otlp", "console" or an installed exporter's entry-point name; empty = tracing off
    traces_exporters: tuple[str, ...]
    metrics_exporters: tuple[str, ...]  # subset of ("prometheus", "otlp", "console")
    traces_protocol: Protocol
    metrics_protocol: Protocol
    propagators: tuple[str, ...]  # empty = never read trace headers
    # Scrape endpoint; port 0 = off.
    prometheus_host: str
    prometheus_port: int
    span_queue: QueueSettings = QueueSettings()

    @property
    def tracing(self) -> bool:
        return not self.sdk_disabled and bool(self.traces_exporters)

    @property
    def metrics(self) -> bool:
        return not self.sdk_disabled and bool(self.metrics_exporters)

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str]) -> TelemetryConfig:
        disabled = _bool(environ, "OTEL_SDK_DISABLED")
        otlp_traces = _has_otlp_endpoint(environ, "TRACES")
        otlp_metrics = _has_otlp_endpoint(environ, "METRICS")
        traces = _exporters(
            environ, "OTEL_TRACES_EXPORTER", TRACES_EXPORTERS, ("otlp",) if otlp_traces else (),
            TRACES_EXPORTER_GROUP,
        )
        metrics = _exporters(
            environ,
            "OTEL_METRICS_EXPORTER",
            METRICS_EXPORTERS,
            ("prometheus", "otlp") if otlp_metrics else ("prometheus",),
        )
        general = _protocol(environ, "OTEL_EXPORTER_OTLP_PROTOCOL", DEFAULT_PROTOCOL)
        propagators = _list(environ, "OTEL_PROPAGATORS")
        if propagators is None:
            propagators = DEFAULT_PROPAGATORS
        elif "none" in propagators:
            propagators = ()
        host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or settings.server.host
        port = _port(environ, "OTEL_EXPORTER_PROMETHEUS_PORT", settings.server.metrics_port)
        return cls(
            sdk_disabled=disabled,
            traces_exporters=traces,
            metrics_exporters=metrics,
            traces_protocol=_protocol(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", general),
            metrics_protocol=_protocol(environ, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", general),
            propagators=propagators,
            prometheus_host=host,
            prometheus_port=port,
            span_queue=QueueSettings.from_env(environ),
        )


def _has_otlp_endpoint(environ: Mapping[str, str], signal: str) -> bool:
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    )


def _list(environ: Mapping[str, str], name: str) -> tuple[str, ...] | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    return tuple(part.strip().lower() for part in raw.split(",") if part.strip())


def installed_exporters(group: str) -> tuple[str, ...]:
    """Exporter names other packages register (the SDK's own extension mechanism)."""
    return tuple(sorted(ep.name for ep in entry_points(group=group)))


def _exporters(
    environ: Mapping[str, str],
    name: str,
    allowed: tuple[str, ...],
    default: tuple[str, ...],
    group: str | None = None,
) -> tuple[str, ...]:
    values = _list(environ, name)
    if values is None:
        return default
    extra = installed_exporters(group) if group else ()
    for value in values:
        if value not in allowed and value not in extra:
            raise TelemetryConfigError(
                f"{name}={environ[name]!r}: unknown exporter {value!r}; "
                f"expected a comma-separated list of {', '.join(allowed + extra)}"
            )
    if "none" in values:
        if len(values) > 1:
            raise TelemetryConfigError(f"{name}={environ[name]!r}: 'none' cannot be combined")
        return ()
    return tuple(dict.fromkeys(values))  # de-duplicated, order kept


def _protocol(environ: Mapping[str, str], name: str, default: Protocol) -> Protocol:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    for protocol in PROTOCOLS:
        if raw == protocol:
            return protocol
    raise TelemetryConfigError(
        f"{name}={environ[name]!r}: expected one of {', '.join(PROTOCOLS)} "
        "(http/json is not implemented by the Python OTLP exporters)"
    )


def _bool(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "false"):
        return False
    if raw == "true":
        return True
    raise TelemetryConfigError(f"{name}={environ[name]!r}: expected true or false")


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    return _int(environ, name, default, 0, 65535, "a port number 0-65535 (0 = off)")


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int | None,
         expected: str) -> int:
    """An integer variable within [low, high]; unset or blank: `default`."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        raise TelemetryConfigError(f"{name}={raw!r}: expected {expected}")
    return value
