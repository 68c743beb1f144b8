"""The request edge, fuzzed: random CheckRequests into the Check handler, on both stores.

Property: whatever the request holds (random header names and values, paths, raw header
bytes, missing parts, a token that is valid, forged, truncated or garbage, a body that is
text, bytes or JSON shaped like a priced model's or an LLM route's), the handler
returns a CheckResponse with a status the README lists, never raises, never answers 500
(a 500 is a bug), and never allows a protected path without a valid token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.config.service_file import parse_settings
from authz.paths import PathClassifier, PathKind
from authz.quota import parse_quota
from authz.server.app import build_components
from authz.server.service import request_headers
from tests.support.bearer_strategies import authorization
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer

QUOTA = {"default_plan": "free", "plans": {"free": {
    "limits": [{"name": "s", "rate": 1000, "burst": 1000}],
    "models": {"iris": {}, "llama-*": {"cost": 2},
               "resnet": {"cost": {"from": "instances"}},
               "gpt-*": {"cost": {"from": "tokens", "max_tokens": 500}}}}}}
PATH_SETTINGS = {"llm_routes": ["/v1/chat/completions"]}
STATUSES = {200, 400, 401, 403, 413, 429, 503}

# Text that protobuf string fields accept (valid UTF-8: no lone surrogates).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=64)
HEADER_NAMES = st.one_of(
    st.sampled_from([":path", ":method", ":authority", "authorization", "x-auth-subject",
                     "traceparent", "b3", "content-length", "x-envoy-auth-partial-body"]),
    TEXT)
PATHS = st.one_of(
    st.sampled_from(["/v1/models/iris:predict", "/v2/models/iris/infer", "/v1/models/llama-7b",
                     "/v2/models/resnet/infer", "/v1/models/resnet:predict",
                     "/v1/chat/completions", "/v1/chat/completions?x=1",
                     "/health", "/v1//models/iris", "/v1/models/%2e%2e/x", "/v1/models/../x",
                     "/v1/models/iris?x=1", "/other", "", "v1/models/iris", "/v2/models/a b",
                     "/v1/models/" + "a" * 5000]),
    st.builds(lambda p: "/v1/models/" + p, TEXT),
    TEXT)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)
SHAPED = st.one_of(
    st.builds(lambda v: {"instances": v}, JSON),
    st.builds(lambda v: {"inputs": [{"name": "x", "shape": v}]}, JSON),
    st.builds(lambda m, t: {"model": m, "max_tokens": t, "messages": []},
              st.sampled_from(["gpt-4o", "iris", "llama-2", "../x", ""]) | TEXT, JSON),
    JSON)


@st.composite
def bodies(draw: st.DrawFn, http: Any) -> None:
    kind = draw(st.sampled_from(["none", "text", "raw", "json", "raw-json"]))
    if kind == "text":
        http.body = draw(TEXT)
    elif kind == "raw":
        http.raw_body = draw(st.binary(max_size=200))
    elif kind in ("json", "raw-json"):
        text = json.dumps(draw(SHAPED))
        if kind == "json":
            http.body = text
        else:
            http.raw_body = text.encode()


def tokens(valid: str) -> st.SearchStrategy[str | None]:
    return authorization(valid, TEXT, huge_max=70_000)


@st.composite
def requests(draw: st.DrawFn, valid: str) -> tuple[pb.CheckRequest, str | None, str]:
    req = pb.CheckRequest()
    http = req.attributes.request.http
    path = draw(PATHS)
    token = draw(tokens(valid))
    headers: dict[str, str] = dict(draw(st.dictionaries(HEADER_NAMES, TEXT, max_size=8)))
    headers.pop("authorization", None)
    if token is not None:
        headers["authorization"] = token
    where = draw(st.sampled_from(["both", "path-field", "header-only", "none"]))
    if where in ("both", "path-field"):
        http.path = path
    if where in ("both", "header-only"):
        headers[":path"] = path
    if draw(st.booleans()):
        http.headers.update(headers)
    else:  # encode_raw_headers: header_map with raw bytes, possibly invalid UTF-8
        for k, v in headers.items():
            h = http.header_map.headers.add()
            h.key = k
            h.raw_value = v.encode() if draw(st.booleans()) else draw(st.binary(max_size=32))
    if draw(st.booleans()):
        http.method = draw(st.sampled_from(["GET", "POST", "", "BREW"]))
    draw(bodies(http))
    if draw(st.booleans()):
        req.attributes.request.ClearField("http")
        path = ""
    effective = path if where != "none" else ""
    return req, token, effective


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    issuer = TestIssuer(tmp_path_factory.mktemp("idp"))
    loop = asyncio.new_event_loop()
    with RedisServer() as redis:
        services = {}
        for name, url in (("memory", ""), ("redis", redis.url)):
            settings_ = parse_settings({"auth": {"issuers": [issuer.settings()]},
                                        "store": {"redis_url": url, "timeout": "2s"},
                                        "paths": PATH_SETTINGS}, "test")
            c = build_components(settings_, parse_quota(QUOTA, "quota"))
            loop.run_until_complete(c.authenticator.start())
            loop.run_until_complete(c.store.start())
            c.pipeline.ready = True
            services[name] = c
        try:
            yield {"loop": loop, "services": services, "token": issuer.mint("fuzz"),
                   "paths": PathClassifier(parse_settings({"paths": PATH_SETTINGS}, "t").paths)}
        finally:
            for c in services.values():
                loop.run_until_complete(c.store.close())
                loop.run_until_complete(c.authenticator.close())
            loop.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_check_requests(world: dict[str, Any], data: st.DataObject) -> None:
    req, token, _path = data.draw(requests(world["token"]))
    for name, c in world["services"].items():
        resp = world["loop"].run_until_complete(c.service.Check(req, None))
        assert isinstance(resp, pb.CheckResponse)
        status = 200 if resp.status.code == 0 else resp.denied_response.status.code
        assert status in STATUSES, (name, status, resp)
        if status == 200:
            # the path the handler saw: the path field, else the :path header
            http = req.attributes.request.http
            seen = http.path or request_headers(http).get(":path", "")
            kind = world["paths"].classify(seen).kind if seen else PathKind.INVALID
            upstream = {h.header.key: h.header.value for h in resp.ok_response.headers}
            if kind is PathKind.PROTECTED:
                assert token == f"Bearer {world['token']}", (name, req)
                assert upstream["x-auth-subject"] == "fuzz"
            else:
                assert kind is PathKind.PUBLIC, (name, seen)
                assert "x-auth-subject" not in upstream
        else:
            assert resp.denied_response.body  # every deny explains itself
