"""The Prometheus scrape endpoint, over real HTTP, with the names the alerts are written against."""

from __future__ import annotations

import errno
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.config.settings import ServerSettings, Settings
from authz.demo.processes import free_port
from authz.telemetry import LATENCY_BUCKETS, Telemetry
from tests.telemetry.conftest import (
    ALLOWED,
    BACKEND_ERROR,
    RATE_LIMITED,
    UNAUTHENTICATED,
    request_headers,
)

# The deploy side's alerts and dashboard use exactly these (family name, type).
EXPECTED_FAMILIES = {
    "authz_decisions": "counter",                 # samples authz_decisions_total
    "rpc_server_call_duration_seconds": "histogram",
    "authz_store_duration_seconds": "histogram",
    "authz_store_errors": "counter",              # authz_store_errors_total
    "authz_token_cache_hits": "counter",          # authz_token_cache_hits_total
    "authz_token_cache_misses": "counter",        # authz_token_cache_misses_total
    "authz_token_cache_entries": "gauge",
    "authz_jwks_refreshes": "counter",            # authz_jwks_refreshes_total
    "authz_config_reloads": "counter",            # authz_config_reloads_total
    "authz_checks_inflight": "gauge",
}


@pytest.fixture
def served() -> Iterator[Telemetry]:
    port = free_port()
    telemetry = Telemetry.from_settings(
        Settings(server=ServerSettings(host="127.0.0.1", metrics_port=port)),
        environ={}, install_global=False,
    )
    try:
        telemetry.start()
        yield telemetry
    finally:
        telemetry.shutdown()


def scrape(telemetry: Telemetry) -> tuple[str, dict[str, float], dict[str, str]]:
    assert telemetry.metrics_address is not None
    host, port = telemetry.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                              if not k.startswith("otel_scope"))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return text, samples, types


def test_scrape_serves_every_metric_under_its_prometheus_name(served: Telemetry) -> None:
    t = served
    for decision in (ALLOWED, ALLOWED, UNAUTHENTICATED, RATE_LIMITED, BACKEND_ERROR):
        with t.start_check(request_headers()) as scope:
            scope.finish(decision, "user-1")
    t.observe_store_call(0.0003, True)
    t.observe_store_call(0.05, False, "timeout")
    t.register_token_cache(lambda: 40, lambda: 2, lambda: 5)
    t.register_jwks(lambda: {("https://idp/", "ok"): 2, ("https://idp/", "error"): 1})
    t.config_reloaded(True)

    text, samples, types = scrape(t)
    for name, kind in EXPECTED_FAMILIES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}\n{text}"

    assert samples["authz_decisions_total{model=llama-*,outcome=allowed,plan=pro,reason=ok}"] == 2
    assert samples[
        "authz_decisions_total{model=,outcome=unauthenticated,plan=,reason=token_expired}"] == 1
    assert samples[
        "authz_decisions_total{model=*,outcome=rate_limited,plan=free,reason=rate_limited}"] == 1
    assert samples[
        "authz_decisions_total{model=*,outcome=backend_error,plan=free,reason=store_unavailable}"
    ] == 1
    rpc = "rpc_method=Check,rpc_service=envoy.service.auth.v3.Authorization,rpc_system=grpc"
    assert samples[f"rpc_server_call_duration_seconds_count{{{rpc}}}"] == 5
    assert samples[f"rpc_server_call_duration_seconds_bucket{{le=+Inf,{rpc}}}"] == 5
    # Explicit buckets from 50 us: the first `le` is 5e-05.
    les = sorted(float(k.split("le=")[1].split(",")[0])
                 for k in samples if k.startswith("rpc_server_call_duration_seconds_bucket"))
    assert les == sorted([*LATENCY_BUCKETS, float("inf")])
    assert samples["authz_store_duration_seconds_count{}"] == 2
    assert samples["authz_store_duration_seconds_bucket{le=0.0005}"] == 1
    assert samples["authz_store_errors_total{error_type=timeout}"] == 1
    assert samples["authz_token_cache_hits_total{}"] == 40
    assert samples["authz_token_cache_misses_total{}"] == 2
    assert samples["authz_token_cache_entries{}"] == 5
    assert samples["authz_jwks_refreshes_total{issuer=https://idp/,result=ok}"] == 2
    assert samples["authz_jwks_refreshes_total{issuer=https://idp/,result=error}"] == 1
    assert samples["authz_config_reloads_total{result=ok}"] == 1
    assert samples["authz_checks_inflight{}"] == 0
    assert 'service_name="authz"' in text  # target_info carries the resource

    # A later scrape sees new checks (cumulative counters, collected per scrape).
    with t.start_check({}) as scope:
        scope.finish(RATE_LIMITED)
    _, samples, _ = scrape(t)
    assert samples[
        "authz_decisions_total{model=*,outcome=rate_limited,plan=free,reason=rate_limited}"] == 2
    assert samples[f"rpc_server_call_duration_seconds_count{{{rpc}}}"] == 6


def test_a_taken_port_is_a_clear_error_and_shutdown_frees_the_port() -> None:
    port = free_port()
    settings = Settings(server=ServerSettings(host="127.0.0.1", metrics_port=port))
    first = Telemetry.from_settings(settings, environ={}, install_global=False)
    second = Telemetry.from_settings(settings, environ={}, install_global=False)
    try:
        first.start()
        with pytest.raises(OSError, match=f"metrics endpoint 127.0.0.1:{port}") as info:
            second.start()
        assert info.value.errno == errno.EADDRINUSE
    finally:
        first.shutdown()
        second.shutdown()
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))


def test_metrics_port_zero_serves_nothing() -> None:
    telemetry = Telemetry.from_settings(
        Settings(server=ServerSettings(metrics_port=0)), environ={}, install_global=False
    )
    try:
        telemetry.start()
        assert telemetry.metrics_address is None
        assert telemetry.meter_provider is None  # no reader at all: nothing to collect
    finally:
        telemetry.shutdown()


def test_prometheus_port_env_overrides_settings() -> None:
    port = free_port()
    telemetry = Telemetry.from_settings(
        Settings(server=ServerSettings(host="127.0.0.1", metrics_port=0)),
        environ={"OTEL_EXPORTER_PROMETHEUS_PORT": str(port)}, install_global=False,
    )
    try:
        telemetry.start()
        assert telemetry.metrics_address == ("127.0.0.1", port)
        _, samples, _ = scrape(telemetry)
        assert samples["authz_checks_inflight{}"] == 0
    finally:
        telemetry.shutdown()
