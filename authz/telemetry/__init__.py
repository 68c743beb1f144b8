"""Traces, metrics and logs for the check path (OpenTelemetry SDK, Prometheus scrape endpoint).

How the server uses it
----------------------
At startup, once per process (after forking workers: SDK threads do not survive a fork)::

    configure_logging(settings)                        # JSON lines on stderr
    telemetry = Telemetry.from_settings(settings)      # reads OTEL_*; TelemetryConfigError if bad
                                                       # (a ValueError naming the variable)
    log_effective_config(settings, telemetry)          # secrets masked
    telemetry.start()                                  # Prometheus endpoint (metrics_port 0: off);
                                                       # OSError naming the address if taken
    telemetry.register_token_cache(cache.hits, cache.misses, cache.__len__)
    telemetry.register_jwks(keys.refresh_counts)       # () -> {(issuer, "ok"|"error"): n}
    ...
    telemetry.shutdown()                               # at exit: flushes exporters

In the Check handler::

    scope = telemetry.start_check(headers)             # headers: the request's HTTP headers
    try:
        with scope:                                    # redis.charge / jwks.fetch spans nest here
            decision, subject = await decide(...)
    except Exception:
        decision, subject = internal_error_decision, None
    telemetry.finish_check(scope, decision, subject, path=path)   # exactly once, always
    return to_response(decision)

- `start_check` must be called with the CheckRequest's `attributes.request.http.headers` (a
  mapping with lower-case keys; with `encode_raw_headers` build one from `header_map`). It reads
  `traceparent` or B3 headers, so the check span joins the request's trace.
- The `with` block makes the check span the current span while the decision is awaited; spans
  that other modules start with `opentelemetry.trace.get_tracer(__name__)` become its children
  (from_settings installs its TracerProvider as the global one, unless one is already set).
  An exception leaving the block is recorded on the span and propagates.
- `finish_check` (or `scope.finish(...)`) ends the span, counts the decision and the latency,
  writes the sampled deny line, and decrements in-flight: call it exactly once per scope, inside
  or after the block (a second call is ignored). Until it is called the check stays in flight.
- `subject` is only ever exported as a salted hash (telemetry.subject_attribute: hashed) or not
  at all (none); never pass the token.
- Store calls: `telemetry.observe_store_call(seconds, ok, error_type="timeout")` per charge.
  Config reloads: `telemetry.config_reloaded(ok)`.
- All hot-path methods are for the event-loop thread and never raise. Spans are the SDK's:
  its tracer starts them, a BatchSpanProcessor exports them on its own thread.
  `telemetry.tracer(name)` gives check-path code (the Redis store) a tracer of the same
  provider. With a parent-based sampler (the default) a caller whose trace headers say "not
  sampled" gets no span at all, only its context made current. CPU per check: see
  loadtests/telemetry_overhead.py and README "Observability"; exporting a span over OTLP adds
  ~70-90 us in the export thread, so sample (the default parent-based sampler follows Envoy's
  decision).
- The server is typed against `authz.telemetry.protocol.CheckTelemetry`, the calls above.

Modules: `config` (OTEL_* -> TelemetryConfig), `setup` (Telemetry: providers, readers,
exporters), `check` (the per-check scope: span, decision counts, deny line), `metrics`
(instruments), `propagation` (trace headers -> the caller's context), `logs` (JSON lines, the
effective configuration), `endpoint` (the scrape endpoint: GET/HEAD /metrics only, with the
process metrics), `aggregate` (one scrape endpoint for several workers), `exporters`
(authz_discard), `protocol` (CheckTelemetry).

Several worker processes (`--workers N`): the supervisor serves `server.metrics_port` with
`authz.telemetry.aggregate.MetricsAggregator(host, metrics_port, worker_targets(metrics_port,
N)).start()`, and starts worker i with `worker_environment(metrics_port, i)` in its environment
(its own endpoint then listens on 127.0.0.1:metrics_port+1+i). Every series gets a `worker`
label (the supervisor's own process metrics `worker="supervisor"`); `authz_worker_up{worker}`
shows which workers answered.

Environment (standard OpenTelemetry variables; see README "Observability"):
OTEL_SDK_DISABLED, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_EXPORTER,
OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT / _PROTOCOL / _HEADERS (and the per-signal
_TRACES_ / _METRICS_ forms), OTEL_TRACES_SAMPLER(_ARG), OTEL_PROPAGATORS, OTEL_BSP_*,
OTEL_METRIC_EXPORT_INTERVAL, OTEL_EXPORTER_PROMETHEUS_HOST / _PORT.
"""

from authz.telemetry.check import HTTP_ATTRIBUTES, RPC_ATTRIBUTES, SPAN_NAME, CheckScope
from authz.telemetry.config import TelemetryConfig, TelemetryConfigError
from authz.telemetry.logs import JsonFormatter, configure_logging, log_effective_config
from authz.telemetry.metrics import LATENCY_BUCKETS
from authz.telemetry.protocol import CheckTelemetry
from authz.telemetry.setup import Telemetry

__all__ = [
    "HTTP_ATTRIBUTES",
    "LATENCY_BUCKETS",
    "RPC_ATTRIBUTES",
    "SPAN_NAME",
    "CheckScope",
    "CheckTelemetry",
    "JsonFormatter",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "configure_logging",
    "log_effective_config",
]
