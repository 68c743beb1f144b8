"""The server feeds telemetry: decisions by outcome, token cache, Redis calls and errors, as
Prometheus scrapes them over HTTP from a real server with a real Redis."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from authz.config.service_file import parse_settings
from authz.quota import parse_quota
from authz.server.app import Server
from authz.telemetry import Telemetry
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer, free_port

QUOTA = {"default_plan": "free",
         "plans": {"free": {"limits": [{"name": "per-minute", "rate": 2, "per": "1m"}]}}}


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset((k, v) for k, v in s.labels.items()
                               if not k.startswith("otel_scope"))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def total(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= lab)


async def test_metrics_reflect_decisions_cache_and_store(tmp_path: Path) -> None:
    issuer = TestIssuer(tmp_path)
    redis = RedisServer().start()
    metrics_port = free_port()
    settings = parse_settings({
        "server": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": metrics_port,
                   "drain_delay": 0},
        "auth": {"issuers": [issuer.settings()]},
        "store": {"redis_url": redis.url, "timeout": "100ms"},
    }, "test")
    telemetry = Telemetry.from_settings(settings, install_global=False, environ={})
    telemetry.start()
    server = Server(settings, parse_quota(QUOTA, "q"), telemetry=telemetry)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.AuthorizationStub(ch)

            async def check(token: str | None) -> int:
                req = pb.CheckRequest()
                req.attributes.request.http.path = "/v1/models/m:predict"
                if token:
                    req.attributes.request.http.headers["authorization"] = f"Bearer {token}"
                r = await stub.Check(req, timeout=5)
                return 200 if r.status.code == 0 else int(r.denied_response.status.code)

            token = issuer.mint("metric-user")
            assert [await check(token) for _ in range(3)] == [200, 200, 429]
            assert await check(None) == 401
            redis.stop()
            assert await check(issuer.mint("other-user")) == 503
        m = scrape(metrics_port)
    finally:
        await server.stop()
        telemetry.shutdown()
        redis.stop()

    decisions = "authz_decisions_total"
    assert total(m, decisions, outcome="allowed", plan="free") == 2
    assert total(m, decisions, outcome="rate_limited", reason="rate_limited") == 1
    assert total(m, decisions, outcome="unauthenticated", reason="missing_token") == 1
    assert total(m, decisions, outcome="backend_error", reason="store_unavailable") == 1
    assert total(m, "authz_token_cache_hits_total") == 2  # the 2nd and 3rd use of one token
    assert total(m, "authz_token_cache_misses_total") == 2  # two distinct tokens verified
    assert total(m, "authz_token_cache_entries") == 2
    assert total(m, "authz_store_duration_seconds_count") == 4  # 3 + the failed one
    assert total(m, "authz_store_errors_total") == 1
    assert total(m, "rpc_server_call_duration_seconds_count", rpc_method="Check") == 5
