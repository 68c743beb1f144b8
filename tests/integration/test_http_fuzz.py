"""The HTTP edge, fuzzed: random check requests, mutated request bytes and plain garbage into a
real server's HTTP port, on both stores.

Properties, whatever arrives:
- every answer has a status the README lists (never a 500: that would be a bug), and a deny
  always explains itself in its body;
- nothing is answered after a protocol error (400, 408, 413, 414, 431), which closes the
  connection;
- an allow is either the valid token's identity (and the bytes sent held that token) or a
  public answer that sets no identity header and removes every client-sent one;
- the server keeps serving: a clean request afterwards is allowed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.config.service_file import parse_settings
from authz.quota import parse_quota
from authz.server.app import Server
from authz.server.http_answers import REMOVE_HEADER
from tests.support.bearer_strategies import authorization
from tests.support.http_check import Response, check_request, exchange
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer, free_port

QUOTA = {"default_plan": "free", "plans": {"free": {
    "limits": [{"name": "s", "rate": 100000, "burst": 100000}],
    "models": {"iris": {}, "llama-*": {"cost": 2}}}}}
PREFIX = "/check"
STATUSES = {200, 400, 401, 403, 408, 413, 414, 429, 431, 503}
PROTOCOL_ERRORS = {400, 408, 413, 414, 431}
IDENTITY = {"x-auth-subject", "x-auth-issuer", "x-auth-plan", "x-authz-degraded", "x-authz-shadow"}
SUBJECT = "fuzz"

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HEADER_NAMES = st.one_of(
    st.sampled_from(["authorization", "x-auth-subject", "x-auth-plan", "traceparent", "b3",
                     "expect", "connection", "x-envoy-auth-headers-to-remove", "host",
                     "transfer-encoding", "content-type"]),
    st.text(TOKEN_CHARS, min_size=1, max_size=20))
# What llhttp accepts in a value: visible characters, spaces and tabs inside, and obs-text.
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                      blacklist_characters="\x7f"), max_size=64).map(str.strip)
PATHS = st.one_of(
    st.sampled_from(["/v1/models/iris:predict", "/v2/models/iris/infer", "/v1/models/llama-7b",
                     "/health", "/v1//models/iris", "/v1/models/%2e%2e/x", "/v1/models/../x",
                     "/v1/models/iris?x=1", "/other", "/", "*", "/v2/models/a%20b",
                     "/v1/models/" + "a" * 5000]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
        lambda p: "/v1/models/" + p))
# Not HEAD: its answer has a content-length and no body, which this test's reader cannot tell
# (tests/integration/http_edge covers HEAD).
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])


def tokens(valid: str) -> st.SearchStrategy[str | None]:
    return authorization(valid, HEADER_VALUES, huge_max=90_000)


@st.composite
def requests(draw: st.DrawFn, valid: str) -> bytes:
    headers = dict(draw(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=8)))
    for reserved in ("authorization", "transfer-encoding", "content-length", "expect"):
        headers.pop(reserved, None)
    token = draw(tokens(valid))
    if token is not None:
        headers["authorization"] = token
    body = draw(st.binary(max_size=64)) if draw(st.booleans()) else b""
    prefix = PREFIX if draw(st.integers(0, 9)) else draw(st.sampled_from(["", "/chec", "/x"]))
    return check_request(draw(PATHS), method=draw(METHODS), headers=headers, body=body,
                         prefix=prefix)


@st.composite
def mutated(draw: st.DrawFn, valid: str) -> bytes:
    data = bytearray(draw(requests(valid)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "repeat"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "replace":
            data[i:i + 1] = draw(st.sampled_from([b"\r", b"\n", b"\x00", b":", b" ", b"\xff",
                                                  b"\r\n", b"\r\n\r\n", b";", b","]))
        elif op == "truncate":
            del data[i:]
        else:
            data += data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    issuer = TestIssuer(tmp_path_factory.mktemp("idp"))
    loop = asyncio.new_event_loop()
    with RedisServer() as redis:
        servers = {}
        for name, url in (("memory", ""), ("redis", redis.url)):
            s = parse_settings({
                "server": {"grpc_port": 0, "http_port": free_port(), "http_path_prefix": PREFIX,
                           "metrics_port": 0, "drain_delay": 0, "host": "127.0.0.1"},
                "auth": {"issuers": [issuer.settings()]},
                "store": {"redis_url": url, "timeout": "2s"}}, "test")
            server = Server(s, parse_quota(QUOTA, "quota"))
            loop.run_until_complete(server.start())
            servers[name] = server
        try:
            yield {"loop": loop, "servers": servers, "token": issuer.mint(SUBJECT)}
        finally:
            for server in servers.values():
                loop.run_until_complete(server.stop())
            loop.close()


def check_answers(data: bytes, answers: list[Response], closed: bool, token: str) -> None:
    for i, a in enumerate(answers):
        assert a.status in STATUSES, (a, data[:300])
        if a.status in PROTOCOL_ERRORS and a.header("connection") == "close":
            assert i == len(answers) - 1, ("answered after a protocol error", answers)
        if a.status != 200:
            assert a.body, a  # every deny explains itself
            continue
        headers = dict(a.headers)
        if "x-auth-subject" in headers:
            assert headers["x-auth-subject"] == SUBJECT, (a, data[:300])
            assert token.encode() in data, "an allowed identity without its token"
        else:
            assert not IDENTITY & set(headers), a
            assert set(headers.get(REMOVE_HEADER, "").split(",")) == IDENTITY, a


def run(world: dict[str, Any], data: bytes, responses: int) -> None:
    loop = world["loop"]
    for name, server in world["servers"].items():
        try:
            # A request cut short waits for the rest of itself: what was answered until then
            # is checked, and the server's health after.
            answers, closed = loop.run_until_complete(
                exchange(server.http_port, data, responses=responses, within=0.5, settle=0,
                         partial=True))
        except (ConnectionResetError, BrokenPipeError):
            answers, closed = [], True
        check_answers(data, answers, closed, world["token"])
        ok, _ = loop.run_until_complete(exchange(server.http_port, check_request(
            "/v1/models/iris:predict", prefix=PREFIX,
            headers={"authorization": f"Bearer {world['token']}"}), settle=0))
        assert [a.status for a in ok] == [200], (name, "the server stopped serving")


FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_random_check_requests(world: dict[str, Any], data: st.DataObject) -> None:
    pipelined = data.draw(st.lists(requests(world["token"]), min_size=1, max_size=3))
    run(world, b"".join(pipelined), len(pipelined))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_mutated_request_bytes(world: dict[str, Any], data: st.DataObject) -> None:
    first = data.draw(mutated(world["token"]))
    second = check_request("/v1/models/iris:predict", prefix=PREFIX,
                           headers={"authorization": f"Bearer {world['token']}"})
    run(world, first + second, 2)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=512))
def test_garbage_bytes(world: dict[str, Any], garbage: bytes) -> None:
    run(world, garbage + b"\r\n\r\n", 1)
