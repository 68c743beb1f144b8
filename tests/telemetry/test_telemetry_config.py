"""OTEL_* environment -> which exporters run (pure)."""

from __future__ import annotations

import pytest

from authz.config.settings import ServerSettings, Settings
from authz.errors import ConfigError
from authz.telemetry import Telemetry, TelemetryConfig, TelemetryConfigError
from authz.telemetry.config import QueueSettings

SETTINGS = Settings(server=ServerSettings(host="0.0.0.0", metrics_port=9464))


def cfg(**env: str) -> TelemetryConfig:
    return TelemetryConfig.from_env(SETTINGS, env)


def test_defaults_prometheus_only_and_no_tracing() -> None:
    c = cfg()
    assert c.traces_exporters == ()
    assert not c.tracing
    assert c.metrics_exporters == ("prometheus",)
    assert (c.prometheus_host, c.prometheus_port) == ("0.0.0.0", 9464)
    assert c.propagators == ("tracecontext", "b3multi")
    assert c.traces_protocol == c.metrics_protocol == "http/protobuf"


def test_an_otlp_endpoint_turns_on_otlp_for_both_signals() -> None:
    c = cfg(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318")
    assert c.traces_exporters == ("otlp",)
    assert c.metrics_exporters == ("prometheus", "otlp")
    assert c.tracing and c.metrics


def test_a_per_signal_endpoint_turns_on_only_that_signal() -> None:
    c = cfg(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://collector:4318/v1/traces")
    assert c.traces_exporters == ("otlp",)
    assert c.metrics_exporters == ("prometheus",)


def test_explicit_exporters_win() -> None:
    c = cfg(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318",
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="otlp, OTLP",
    )
    assert c.traces_exporters == ()
    assert c.metrics_exporters == ("otlp",)
    assert cfg(OTEL_TRACES_EXPORTER="console").traces_exporters == ("console",)
    assert cfg(OTEL_METRICS_EXPORTER="none").metrics_exporters == ()


def test_protocols_general_and_per_signal() -> None:
    c = cfg(OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="http/protobuf")
    assert c.traces_protocol == "grpc"
    assert c.metrics_protocol == "http/protobuf"


def test_sdk_disabled() -> None:
    c = cfg(OTEL_SDK_DISABLED="TRUE", OTEL_TRACES_EXPORTER="otlp")
    assert c.sdk_disabled and not c.tracing and not c.metrics
    assert not cfg(OTEL_SDK_DISABLED="false").sdk_disabled


def test_prometheus_host_and_port_env() -> None:
    c = cfg(OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1", OTEL_EXPORTER_PROMETHEUS_PORT="9999")
    assert (c.prometheus_host, c.prometheus_port) == ("127.0.0.1", 9999)


def test_propagators() -> None:
    assert cfg(OTEL_PROPAGATORS="none").propagators == ()
    assert cfg(OTEL_PROPAGATORS="tracecontext,baggage").propagators == ("tracecontext", "baggage")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER='jaeger': unknown exporter"),
        ({"OTEL_METRICS_EXPORTER": "prometheus,none"}, "'none' cannot be combined"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "expected one of grpc, http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED='yes': expected true or false"),
        ({"OTEL_EXPORTER_PROMETHEUS_PORT": "http"}, "expected a port number"),
        ({"OTEL_EXPORTER_PROMETHEUS_PORT": "70000"}, "expected a port number"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(TelemetryConfigError, match=message.replace("(", r"\(")):
        TelemetryConfig.from_env(SETTINGS, env)


def test_an_unknown_propagator_fails_at_setup() -> None:
    with pytest.raises(TelemetryConfigError, match="unknown propagator 'xray-nope'"):
        Telemetry.from_settings(
            Settings(server=ServerSettings(metrics_port=0)),
            environ={"OTEL_TRACES_EXPORTER": "console", "OTEL_PROPAGATORS": "xray-nope"},
            install_global=False,
        )


def test_bad_deny_log_level_fails_at_setup() -> None:
    from authz.config.settings import TelemetrySettings

    with pytest.raises(ConfigError, match=r"telemetry\.deny_log_level: 'LOUD'"):
        Telemetry.from_settings(
            Settings(server=ServerSettings(metrics_port=0),
                     telemetry=TelemetrySettings(deny_log_level="LOUD")),
            environ={}, install_global=False,
        )


def test_installed_exporter_entry_points_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names other packages register (here the OTLP package's own "otlp_proto_grpc")."""
    c = cfg(OTEL_TRACES_EXPORTER="otlp_proto_grpc")
    assert c.traces_exporters == ("otlp_proto_grpc",)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")  # never contacted
    telemetry = Telemetry.from_settings(
        Settings(server=ServerSettings(metrics_port=0)),
        environ={"OTEL_TRACES_EXPORTER": "otlp_proto_grpc", "OTEL_METRICS_EXPORTER": "none"},
        install_global=False,
    )
    try:
        assert telemetry.tracer_provider is not None
    finally:
        telemetry.shutdown()


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
