"""Checks over both edges: a real server with its gRPC and HTTP edges, real clients (grpc.aio;
raw HTTP/1.1 requests shaped like Envoy's check requests), real redis-server processes.

Every behaviour test, the hostile-input ones included, runs on each edge against both bucket
stores, and reads the answer through one shape (`Answer`): what reaches the model server, what
is removed from the request, what reaches the client, the status and the body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.config.service_file import parse_settings
from authz.config.settings import Settings
from authz.quota import parse_quota
from authz.server.app import Server
from authz.server.http_answers import REMOVE_HEADER
from tests.support.http_check import HttpCheckClient, Response
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer, free_port

QUOTA = {
    "plan_claim": "plan",
    "default_plan": "free",
    "plans": {
        "free": {
            "limits": [{"name": "per-minute", "rate": 5, "per": "1m", "burst": 5}],
            "models": {"iris": {}, "llama-*": {"cost": 2}},
        },
        "pro": {"limits": [{"name": "per-second", "rate": 1000, "per": "1s", "burst": 1000}]},
        "steady": {"limits": [{"name": "per-second", "rate": 20, "per": "1s", "burst": 5},
                              {"name": "per-hour", "rate": 10000, "per": "1h"}]},
    },
    "overrides": [
        {"issuer": "https://idp.test", "subject": "mallory", "plan": "blocked"},
        {"issuer": "https://idp.test", "subject": "svc", "plan": "unlimited"},
    ],
}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def other_issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(tmp_path_factory.mktemp("idp2"), name="https://other.test", kid="o1")


# The HTTP edge's check requests carry the provider's pathPrefix (the shipped registration's).
PREFIX = "/check"
IDENTITY = {"x-auth-subject", "x-auth-issuer", "x-auth-plan", "x-authz-degraded", "x-authz-shadow"}


def make_settings(issuers: list[TestIssuer], redis_url: str = "", **store: Any) -> Settings:
    return parse_settings({
        "server": {"grpc_port": 0, "http_port": free_port(), "http_path_prefix": PREFIX,
                   "metrics_port": 0, "drain_delay": 0, "host": "127.0.0.1"},
        "auth": {"issuers": [i.settings() for i in issuers]},
        "store": {"redis_url": redis_url, "timeout": "200ms", **store},
    }, "test")


@dataclass
class Answer:
    """One check's answer, whichever edge gave it."""

    status: int
    upstream: dict[str, str]  # allow: set on the request to the model server
    remove: list[str]  # allow: removed from that request
    client: dict[str, str]  # headers for the client (allow: RateLimit; deny: the denial's)
    body: str  # deny: the JSON body
    raw: Any  # the CheckResponse or the HTTP Response

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def grpc_answer(resp: pb.CheckResponse) -> Answer:
    if resp.status.code == 0:
        ok = resp.ok_response
        return Answer(200, {h.header.key: h.header.value for h in ok.headers},
                      list(ok.headers_to_remove),
                      {h.header.key: h.header.value for h in ok.response_headers_to_add}, "",
                      resp)
    denied = resp.denied_response
    return Answer(denied.status.code, {}, [],
                  {h.header.key: h.header.value for h in denied.headers}, denied.body, resp)


def http_answer(resp: Response) -> Answer:
    # Which of the answer's headers reach the model server is the registration's choice
    # (headersToUpstreamOnAllow): the identity headers do, the rest go to the client.
    headers = dict(resp.headers)
    remove = headers.pop(REMOVE_HEADER, "")
    headers.pop("content-length", None)
    headers.pop("connection", None)
    upstream = {k: v for k, v in headers.items() if k in IDENTITY} if resp.status == 200 else {}
    client = {k: v for k, v in headers.items() if k not in upstream}
    return Answer(resp.status, upstream, remove.split(",") if remove else [], client,
                  resp.body.decode(), resp)


class Client:
    """Checks over one edge: "grpc" (a CheckRequest as Envoy fills it) or "http" (the check
    request Envoy's HTTP client sends)."""

    def __init__(self, edge: str, channel: grpc.aio.Channel, http_port: int) -> None:
        self.edge = edge
        self.stub = pb_grpc.AuthorizationStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.http = HttpCheckClient(http_port, PREFIX)

    async def check(self, path: str = "/v1/models/iris:predict", token: str | None = None,
                    headers: dict[str, str] | None = None) -> Answer:
        h: dict[str, str] = {}
        if token is not None:
            h["authorization"] = f"Bearer {token}"
        h.update(headers or {})
        if self.edge == "http":
            return http_answer(await self.http.check(path, method="POST", headers=h))
        req = pb.CheckRequest()
        http = req.attributes.request.http
        http.path = path
        http.method = "POST"
        http.headers.update({":path": path, ":method": "POST", ":authority": "models", **h})
        return grpc_answer(await self.stub.Check(req, timeout=5))


@pytest.fixture(params=["grpc-memory", "grpc-redis", "http-memory", "http-redis"])
async def service(request: pytest.FixtureRequest, issuer: TestIssuer, other_issuer: TestIssuer,
                  redis_server: RedisServer) -> AsyncIterator[tuple[Client, Server]]:
    edge, store = request.param.split("-")
    url = redis_server.url if store == "redis" else ""
    if url:
        redis_server.client().flushall()
    server = Server(make_settings([issuer, other_issuer], url), parse_quota(QUOTA, "quota"))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        client = Client(edge, channel, server.http_port)
        yield client, server
        await client.http.close()
    await server.stop()


@pytest.fixture
async def grpc_service(service: tuple[Client, Server]) -> tuple[Client, Server]:
    """The gRPC edge only: what is about the CheckRequest message itself."""
    if service[0].edge != "grpc":
        pytest.skip("about the gRPC CheckRequest")
    return service


def status(resp: Answer) -> int:
    return resp.status


def deny_headers(resp: Answer) -> dict[str, str]:
    return resp.client


def body(resp: Answer) -> dict[str, Any]:
    return resp.json()


async def test_health_serving(service: tuple[Client, Server]) -> None:
    client, _ = service
    for name in ("", "envoy.service.auth.v3.Authorization"):
        r = await client.health.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_allowed_with_identity_and_ratelimit_headers(
        service: tuple[Client, Server], issuer: TestIssuer) -> None:
    client, _ = service
    resp = await client.check(token=issuer.mint("alice"),
                              headers={"x-auth-subject": "forged", "x-authz-degraded": "x"})
    assert status(resp) == 200
    assert resp.upstream == {"x-auth-subject": "alice", "x-auth-plan": "free",
                             "x-auth-issuer": "https://idp.test"}
    if client.edge == "grpc":
        # set with append=false: Envoy overwrites the client's forged copy (the HTTP edge's
        # headers are always set: allowed_upstream_headers overwrite)
        assert all(not h.append.value for h in resp.raw.ok_response.headers)
    # the header it does not set is removed, and only that one (Envoy removes after setting)
    assert resp.remove == ["x-authz-degraded", "x-authz-shadow"]
    assert resp.client == {"ratelimit-limit": "5", "ratelimit-remaining": "4",
                           "ratelimit-reset": "12"}


async def test_burst_then_429_with_retry_after(service: tuple[Client, Server],
                                               issuer: TestIssuer) -> None:
    client, _ = service
    token = issuer.mint("bob")
    statuses = [status(await client.check(token=token)) for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    resp = await client.check(token=token)
    h = deny_headers(resp)
    assert int(h["retry-after"]) == 12  # 1 token per 12 s, rounded up
    assert h["ratelimit-remaining"] == "0"
    assert body(resp)["error"] == "rate_limited"


async def test_cost_per_model_and_query_ignored(service: tuple[Client, Server],
                                                issuer: TestIssuer) -> None:
    client, _ = service
    token = issuer.mint("carol")
    assert status(await client.check("/v2/models/llama-7b/infer?x=1", token)) == 200  # 5 -> 3
    assert status(await client.check("/v2/models/llama-7b/versions/2/infer", token)) == 200
    resp = await client.check("/v1/models/iris:predict?other=2", token)  # 1 -> 0
    assert status(resp) == 200
    assert resp.client["ratelimit-remaining"] == "0"
    assert status(await client.check("/v1/models/iris:predict", token)) == 429


async def test_forbidden_model_and_blocked(service: tuple[Client, Server],
                                           issuer: TestIssuer) -> None:
    client, _ = service
    resp = await client.check("/v1/models/secret:predict", issuer.mint("dave"))
    assert status(resp) == 403 and body(resp)["reason"] == "model_not_allowed"
    resp = await client.check("/v1/models/iris:predict", issuer.mint("mallory", plan="pro"))
    assert status(resp) == 403 and body(resp)["reason"] == "blocked"
    assert status(await client.check("/v1/models/anything", issuer.mint("svc"))) == 200


async def test_public_and_other_paths(service: tuple[Client, Server]) -> None:
    client, _ = service
    for path in ("/health", "/ready", "/v2/health/ready"):
        resp = await client.check(path, headers={"x-auth-subject": "forged"})
        assert status(resp) == 200
        assert resp.upstream == {}
        assert set(resp.remove) == IDENTITY
    resp = await client.check("/admin")
    assert status(resp) == 403 and body(resp)["reason"] == "path_not_covered"


async def test_two_issuers_same_sub_do_not_share_buckets(
        service: tuple[Client, Server], issuer: TestIssuer, other_issuer: TestIssuer) -> None:
    client, _ = service
    for _ in range(5):
        assert status(await client.check(token=issuer.mint("erin"))) == 200
    assert status(await client.check(token=issuer.mint("erin"))) == 429
    assert status(await client.check(token=other_issuer.mint("erin"))) == 200


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def bad_inputs(issuer: TestIssuer, other: TestIssuer) -> dict[str, dict[str, Any]]:
    """name -> Check arguments; each must be a clean 401 (or 400 for paths)."""
    now = int(time.time())
    valid = issuer.mint("zed")
    h, p, s = valid.split(".")
    pem = issuer.key.public_key().public_bytes(
        encoding=__import__("cryptography.hazmat.primitives.serialization",
                            fromlist=["Encoding"]).Encoding.PEM,
        format=__import__("cryptography.hazmat.primitives.serialization",
                          fromlist=["PublicFormat"]).PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": issuer.name, "sub": "zed", "aud": "ml-inference-api", "exp": now + 600}
    hs_forged = (f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid})}."
                 f"{_b64(claims)}")
    import hashlib
    import hmac

    sig = hmac.new(pem, hs_forged.encode(), hashlib.sha256).digest()
    hs_forged += "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    attacker = TestIssuer(Path(issuer.jwks_file).parent / "attacker", name=issuer.name, kid="k1")
    return {
        "missing": {"headers": {}},
        "empty": {"headers": {"authorization": ""}},
        "duplicated": {"headers": {"authorization": f"Bearer {valid},Bearer {valid}"}},
        "basic": {"headers": {"authorization": "Basic YWxpY2U6c2VjcmV0"}},
        "64KB header": {"headers": {"authorization": "Bearer " + "a" * 65536}},
        "non-utf8 as !": {"headers": {"authorization": f"Bearer {h}.{p}!!.{s}"}},
        "alg none": {"token": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."},
        "hs256 with public key": {"token": hs_forged},
        "unknown kid": {"token": issuer.mint("zed", headers={"kid": "nope"})},
        "jku elsewhere": {"token": attacker.mint(
            "zed", headers={"jku": "https://evil.test/jwks.json", "x5u": "https://evil.test/c"})},
        "missing exp": {"token": issuer.mint("zed", exp=None)},
        "missing sub": {"token": issuer.mint(None)},  # type: ignore[arg-type]
        "nbf future": {"token": issuer.mint("zed", nbf=now + 3600)},
        "expired": {"token": issuer.mint("zed", ttl=-3600)},
        "aud wrong": {"token": issuer.mint("zed", audience="other-api")},
        "aud empty": {"token": issuer.mint("zed", audience=[])},
        "aud list without ours": {"token": issuer.mint("zed", audience=["a", "b"])},
        "issuer not configured": {"token": TestIssuer(
            Path(issuer.jwks_file).parent / "x", name="https://unknown.test").mint("zed")},
        "A signed with B's key": {"token": issuer.mint("zed", key=other.key,
                                                       headers={"kid": other.kid})},
        "truncated": {"token": valid[: len(valid) // 2]},
        "garbage base64": {"token": "@@@.###.$$$"},
        "1MB token": {"token": "a" * (1 << 20)},
    }


async def test_bad_input_is_a_clean_401(service: tuple[Client, Server], issuer: TestIssuer,
                                        other_issuer: TestIssuer) -> None:
    client, _ = service
    for name, case in bad_inputs(issuer, other_issuer).items():
        resp = await client.check(token=case.get("token"), headers=case.get("headers"))
        if client.edge == "http" and name == "1MB token":
            # Past the HTTP edge's bound on a request's head (80 KiB; Envoy itself refuses
            # more than 60 KiB of headers): refused before any token rule runs.
            assert status(resp) == 431 and body(resp)["reason"] == "request_headers_too_large"
            continue
        assert status(resp) == 401, name
        assert deny_headers(resp)["www-authenticate"].startswith("Bearer "), name
        assert "reason" in body(resp), name
        assert "zed" not in resp.body, name  # never echoes the token


@pytest.mark.parametrize("path", ["/v1/models/../../admin", "/v1//models/iris:predict",
                                  "/v1/models/%2e%2e/iris", "/health/../v1/models/iris",
                                  "/v1/models/a\r\nb"])
async def test_bad_paths_are_a_clean_400(service: tuple[Client, Server], issuer: TestIssuer,
                                         path: str) -> None:
    client, _ = service
    resp = await client.check(path, issuer.mint("zed"))
    assert status(resp) == 400
    assert body(resp)["error"] == "invalid_request"


async def test_no_http_attributes(grpc_service: tuple[Client, Server]) -> None:
    client, _ = grpc_service
    resp = grpc_answer(await client.stub.Check(pb.CheckRequest(), timeout=5))
    assert status(resp) == 400 and body(resp)["reason"] == "missing_http_attributes"


async def test_raw_header_map(grpc_service: tuple[Client, Server], issuer: TestIssuer) -> None:
    """Envoy with encode_raw_headers sends header_map with raw bytes instead of headers."""
    client, _ = grpc_service
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.path = "/v1/models/iris:predict"
    for k, v in ((":path", http.path), ("authorization", f"Bearer {issuer.mint('raw')}")):
        http.header_map.headers.add(key=k, raw_value=v.encode())
    resp = grpc_answer(await client.stub.Check(req, timeout=5))
    assert status(resp) == 200


async def test_concurrent_checks_admit_exactly_the_burst(
        service: tuple[Client, Server], issuer: TestIssuer) -> None:
    """200 concurrent checks for one user, burst 5, refill 1 per 12 s: exactly 5 pass."""
    client, _ = service
    token = issuer.mint("frank")
    results = await asyncio.gather(*(client.check(token=token) for _ in range(200)))
    assert sum(status(r) == 200 for r in results) == 5
    assert sum(status(r) == 429 for r in results) == 195


async def test_concurrent_checks_admit_exactly_burst_plus_rate_times_elapsed(
        service: tuple[Client, Server], issuer: TestIssuer) -> None:
    """Hammer one user with 32 Checks in flight for ~1.5 s (burst 5, 20/s). The buckets are
    charged between the first send and the last answer, and tokens accrue continuously while
    requests keep coming, so: burst + floor(rate x (last send - first answer))
    <= admitted <= burst + ceil(rate x (last answer - first send))."""
    client, _ = service
    token = issuer.mint("steady-user", plan="steady")
    burst, rate = 5, 20.0
    first_send = time.monotonic()
    first_answer: float | None = None
    last_send = first_send
    admitted = 0
    stop_at = first_send + 1.5

    async def one() -> None:
        nonlocal first_answer, admitted
        resp = await client.check(token=token)
        if first_answer is None:
            first_answer = time.monotonic()
        if status(resp) == 200:
            admitted += 1
        else:
            assert status(resp) == 429

    async def worker() -> None:
        nonlocal last_send
        while time.monotonic() < stop_at:
            last_send = max(last_send, time.monotonic())
            await one()

    await asyncio.gather(*(worker() for _ in range(32)))
    last_answer = time.monotonic()
    assert first_answer is not None
    low = burst + math.floor(rate * (last_send - first_answer))
    high = burst + math.ceil(rate * (last_answer - first_send))
    assert low <= admitted <= high, (low, admitted, high)


@pytest.mark.parametrize("edge", ["grpc", "http"])
async def test_internal_error_is_an_explicit_answer(issuer: TestIssuer, edge: str) -> None:
    class Broken:
        ready = True

        async def start(self) -> None: ...
        async def close(self) -> None: ...
        async def charge(self, buckets: Any, cost: float) -> Any:
            raise RuntimeError("bug")

    server = Server(make_settings([issuer]), parse_quota(QUOTA, "q"), store=Broken())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            client = Client(edge, ch, server.http_port)
            resp = await client.check(token=issuer.mint("gina"))
            await client.http.close()
        assert status(resp) == 500 and body(resp) == {"error": "internal_error"}
    finally:
        await server.stop()


@pytest.mark.parametrize("edge", ["grpc", "http"])
@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_down_policy_and_recovery(issuer: TestIssuer, policy: str,
                                              edge: str) -> None:
    redis = RedisServer().start()
    server = Server(make_settings([issuer], redis.url, on_error=policy, timeout="100ms"),
                    parse_quota(QUOTA, "q"))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            client = Client(edge, ch, server.http_port)
            token = issuer.mint("hank")
            assert status(await client.check(token=token)) == 200
            redis.stop()
            started = time.monotonic()
            resp = await client.check(token=token)
            assert time.monotonic() - started < 2.0  # bounded, no hang
            if policy == "deny":
                assert status(resp) == 503 and body(resp)["reason"] == "store_unavailable"
            else:
                assert status(resp) == 200
                assert resp.upstream["x-authz-degraded"] == "store-unavailable"
            redis.start()  # same port: the service recovers by itself
            deadline = time.monotonic() + 10
            while True:
                resp = await client.check(token=issuer.mint("ivy"))
                if status(resp) == 200 and "x-authz-degraded" not in resp.upstream:
                    break
                assert time.monotonic() < deadline, "did not recover after Redis came back"
                await asyncio.sleep(0.2)
            await client.http.close()
    finally:
        await server.stop()
        redis.stop()


def test_quota_yaml_roundtrip() -> None:
    assert parse_quota(yaml.safe_load(yaml.safe_dump(QUOTA)), "q").default_plan == "free"


def test_jwt_library_refuses_none() -> None:
    # guard against a PyJWT upgrade silently accepting alg none
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(f"{_b64({'alg': 'none'})}.{_b64({'sub': 'x'})}.", options={
            "verify_signature": True}, algorithms=["RS256"], key="x")
