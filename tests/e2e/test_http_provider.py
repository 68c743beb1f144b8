"""Envoy 1.40's HTTP ext_authz client, wired as istiod wires an `envoyExtAuthzHttp` provider:
what the check request carries, which answers allow, which headers go where, and how a client's
forged identity headers are defeated (or, with a careless registration, are not).

Two providers: a stub that answers what the test asks for and records what it was sent (the
facts about Envoy), and the real service over its HTTP edge (the facts about us).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from authz.demo.upstream import ModelStandIn
from authz.mesh.sidecar import RequestBody

from .harness import (
    ISSUER,
    AuthzService,
    Keys,
    Redis,
    Reply,
    ServiceOptions,
    Sidecar,
    bearer,
    new_subject,
    provider_options,
    started,
)

pytestmark = pytest.mark.envoy

PREDICT = "/v1/models/allowed-a:predict"
PREFIX = "/check"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FORGED = {"x-auth-subject": "mallory", "x-auth-issuer": "https://evil.example",
          "x-auth-plan": "unlimited", "x-authz-degraded": "store-unavailable"}


# -- a provider that answers on request ------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class StubProvider:
    """An HTTP authz server: answers the status named by the check path's `answer` query
    parameter (default 200) with a fixed set of headers and a JSON body; records each check."""

    def __init__(self) -> None:
        seen: list[Seen] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                seen.append(Seen(self.command, self.path,
                                 [(k.lower(), v) for k, v in self.headers.items()], body))
                query = parse_qs(urlsplit(self.path).query)
                status = int(query.get("answer", ["200"])[0])
                self.send_response(status)
                self.send_header("x-auth-subject", "stub-verified")
                self.send_header("ratelimit-limit", "9")
                self.send_header("retry-after", "3")
                self.send_header("x-not-listed", "n")
                extra = query.get("remove")
                if extra:
                    self.send_header("x-envoy-auth-headers-to-remove", extra[0])
                if status in (204, 304):
                    self.end_headers()
                    return
                payload = json.dumps({"stub": status}).encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self) -> StubProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()


@dataclass
class StubStack:
    stub: StubProvider
    upstream: ModelStandIn
    sidecar: Sidecar
    open_sidecar: Sidecar  # the same provider under failOpen

    def send(self, path: str, **kwargs: Any) -> tuple[Reply, str]:
        marker = uuid.uuid4().hex
        headers = {"x-e2e-id": marker, **kwargs.pop("headers", {})}
        return self.sidecar.request(path, headers=headers, **kwargs), marker

    def reached(self, marker: str) -> bool:
        return any(r.header("x-e2e-id") == [marker] for r in self.upstream.requests)


@pytest.fixture(scope="module")
def stub_stack(envoy_bin: Path, work_dir: Path) -> Iterator[StubStack]:
    stub = StubProvider()
    upstream = ModelStandIn()
    common: dict[str, Any] = {
        **provider_options("http"),
        "status_on_error": 503,
        # As a registration would list them, plus one header a test sends and one for
        # includeAdditionalHeadersInCheck.
        "include_request_headers": ("traceparent", "x-listed"),
        "include_additional_headers": (("x-added", "by-envoy"),),
        "request_body": RequestBody(4096),
    }
    sidecar = Sidecar(envoy_bin, work_dir, upstream, [("127.0.0.1", stub.port)],
                      name="envoy-stub", **common)
    open_sidecar = Sidecar(envoy_bin, work_dir, upstream, [("127.0.0.1", stub.port)],
                           name="envoy-stub-open", fail_open=True, **common)
    with started(stub, upstream, sidecar, open_sidecar):
        yield StubStack(stub, upstream, sidecar, open_sidecar)


def test_the_check_request_is_the_original_request_under_the_prefix(
        stub_stack: StubStack) -> None:
    reply, marker = stub_stack.send(
        f"{PREDICT}?x=1&m={uuid.uuid4().hex}", method="PUT", body=b"{}",
        headers={"authorization": "Bearer abc", "traceparent": TRACEPARENT,
                 "x-listed": "yes", "x-not-listed": "no", "x-added": "from-the-client"})
    assert reply.status == 200, reply
    [check] = [s for s in stub_stack.stub.seen if "m=" in s.path and s.method == "PUT"][-1:]
    # Method, path (pathPrefix + the original path and query), Host: the original request's.
    assert check.method == "PUT"
    assert check.path.startswith(f"{PREFIX}{PREDICT}?x=1&m=")
    assert check.header("host") == [f"127.0.0.1:{stub_stack.sidecar.port}"]
    # authorization is always sent; the listed headers are; others are not.
    assert check.header("authorization") == ["Bearer abc"]
    assert check.header("traceparent") == [TRACEPARENT]
    assert check.header("x-listed") == ["yes"]
    assert check.header("x-not-listed") == [] and check.header("x-e2e-id") == []
    # includeAdditionalHeadersInCheck overwrites a client's copy.
    assert check.header("x-added") == ["by-envoy"]
    # With includeRequestBodyInCheck the (small) body and its length; Envoy's own headers.
    assert check.body == b"{}" and check.header("content-length") == ["2"]
    assert check.header("x-envoy-auth-partial-body") == ["false"]
    assert check.header("x-envoy-internal") == ["true"]
    assert stub_stack.reached(marker)


def test_a_body_over_max_request_bytes_is_cut_and_marked_partial(stub_stack: StubStack) -> None:
    tag = uuid.uuid4().hex
    body = b"b" * 10_000
    reply, _ = stub_stack.send(f"{PREDICT}?t={tag}", method="POST", body=body)
    assert reply.status == 200
    [check] = [s for s in stub_stack.stub.seen if tag in s.path]
    assert check.body == body[:4096] and check.header("content-length") == ["4096"]
    assert check.header("x-envoy-auth-partial-body") == ["true"]
    # The model server still gets the whole body.
    assert stub_stack.upstream.requests_to(PREDICT)[-1].body == body


# Only 200 allows. Every other status under 500 is a denial with that status and the body;
# a 5xx is an error: statusOnError (503 here), empty, or a pass under failOpen.
DENIED = [201, 202, 204, 206, 299, 302, 400, 401, 403, 404, 429, 431, 499]
ERRORS = [500, 502, 503, 504]


def test_only_200_allows(stub_stack: StubStack) -> None:
    reply, marker = stub_stack.send(f"{PREDICT}?answer=200")
    assert reply.status == 200 and stub_stack.reached(marker)
    assert stub_stack.sidecar.ext_authz_stats().get("ok", 0) >= 1


@pytest.mark.parametrize("status", DENIED)
def test_any_other_status_under_500_is_a_denial(stub_stack: StubStack, status: int) -> None:
    reply, marker = stub_stack.send(f"{PREDICT}?answer={status}")
    assert reply.status == status, reply
    assert not stub_stack.reached(marker)
    if status not in (204, 304):
        assert reply.json() == {"stub": status}  # the provider's body, untouched
    # The same under failOpen: a denial is not a failure.
    reply = stub_stack.open_sidecar.request(f"{PREDICT}?answer={status}")
    assert reply.status == status


@pytest.mark.parametrize("status", ERRORS)
def test_a_5xx_is_an_error_not_a_denial(stub_stack: StubStack, status: int) -> None:
    errors = stub_stack.sidecar.ext_authz_stats().get("error", 0)
    reply, marker = stub_stack.send(f"{PREDICT}?answer={status}")
    assert reply.status == 503 and reply.body == b""  # statusOnError, not the provider's
    assert not stub_stack.reached(marker)
    assert stub_stack.sidecar.ext_authz_stats().get("error", 0) == errors + 1
    # Under failOpen the request passes: a 5xx from the provider lets it through.
    reply = stub_stack.open_sidecar.request(f"{PREDICT}?answer={status}",
                                            headers={"x-e2e-id": marker})
    assert reply.status == 200 and stub_stack.reached(marker)


def test_headers_go_where_the_registration_says(stub_stack: StubStack) -> None:
    reply, marker = stub_stack.send(f"{PREDICT}?answer=200", headers=FORGED)
    assert reply.status == 200
    [received] = [r for r in stub_stack.upstream.requests if r.header("x-e2e-id") == [marker]]
    # headersToUpstreamOnAllow: set, overwriting the client's copy (one value).
    assert received.header("x-auth-subject") == ["stub-verified"]
    # Not in the answer: the client's copy stays, unless removed (next test).
    assert received.header("x-auth-plan") == ["unlimited"]
    assert received.header("x-not-listed") == []
    # headersToDownstreamOnAllow ("ratelimit*") to the client; nothing else of the answer.
    assert reply.headers.get("ratelimit-limit") == "9"
    assert "x-auth-subject" not in reply.headers and "retry-after" not in reply.headers
    # On a denial headersToDownstreamOnDeny: retry-after and ratelimit*, not the others.
    denied, _ = stub_stack.send(f"{PREDICT}?answer=429")
    assert denied.headers.get("retry-after") == "3" and denied.headers["ratelimit-limit"] == "9"
    assert "x-auth-subject" not in denied.headers and "x-not-listed" not in denied.headers


def test_headers_to_remove_strips_client_headers_after_the_sets(stub_stack: StubStack) -> None:
    reply, marker = stub_stack.send(f"{PREDICT}?answer=200&remove=x-auth-plan,x-auth-subject",
                                    headers=FORGED)
    assert reply.status == 200
    [received] = [r for r in stub_stack.upstream.requests if r.header("x-e2e-id") == [marker]]
    # Removed: a client header the answer does not set (no registration list needed) ...
    assert received.header("x-auth-plan") == []
    # ... and one it does set: removal comes after the sets, so never name a header you set.
    assert received.header("x-auth-subject") == []
    assert received.header("x-auth-issuer") == ["https://evil.example"]
    # Only on a 200: a denial's removal list does nothing (there is no upstream request).
    denied, _ = stub_stack.send(f"{PREDICT}?answer=403&remove=x-auth-plan")
    assert denied.status == 403


# -- the service over its HTTP edge: spoofing, HEAD, public paths -------------------------------

@dataclass
class ServiceStack:
    keys: Keys
    upstream: ModelStandIn
    service: AuthzService
    sidecar: Sidecar  # CUSTOM rules cover /health too: public answers go through the service
    careless: Sidecar  # a registration without headersToUpstreamOnAllow

    def send(self, sidecar: Sidecar, path: str, token: str | None = None,
             **kwargs: Any) -> tuple[Reply, list[Any]]:
        marker = uuid.uuid4().hex
        headers = {"x-e2e-id": marker, **kwargs.pop("headers", {})}
        if token is not None:
            headers.update(bearer(token))
        reply = sidecar.request(path, headers=headers, **kwargs)
        return reply, [r for r in self.upstream.requests if r.header("x-e2e-id") == [marker]]


@pytest.fixture(scope="module")
def service_stack(envoy_bin: Path, work_dir: Path, keys: Keys) -> Iterator[ServiceStack]:
    redis = Redis(work_dir)
    service = AuthzService(work_dir, keys, ServiceOptions(redis_url=redis.url),
                           "authz-http-edge")
    upstream = ModelStandIn()
    options: dict[str, Any] = {**provider_options("http"), "status_on_error": 503}
    sidecar = Sidecar(envoy_bin, work_dir, upstream, [service.endpoint("http")],
                      name="envoy-http-edge",
                      paths=("/v1/models/*", "/v2/models/*", "/health"), **options)
    careless = Sidecar(envoy_bin, work_dir, upstream, [service.endpoint("http")],
                       name="envoy-http-careless", headers_to_upstream_on_allow=(), **options)
    with started(redis, service, upstream, sidecar, careless):
        yield ServiceStack(keys, upstream, service, sidecar, careless)


@pytest.mark.parametrize("case", ["lower", "mixed-case", "repeated"])
def test_forged_identity_headers_never_reach_the_model(service_stack: ServiceStack,
                                                       case: str) -> None:
    sub = new_subject("alice")
    forged = {k.upper(): v for k, v in FORGED.items()} if case == "mixed-case" else FORGED
    more = [("X-Auth-Subject", "mallory2"), ("x-auth-plan", "pro")] if case == "repeated" else []
    reply, received = service_stack.send(service_stack.sidecar, PREDICT,
                                         service_stack.keys.token(sub), headers=forged,
                                         more_headers=more)
    assert reply.status == 200, reply
    [model] = received
    # Set, not appended: exactly one value each, the verified one.
    assert model.header("x-auth-subject") == [sub]
    assert model.header("x-auth-issuer") == [ISSUER]
    assert model.header("x-auth-plan") == ["free"]
    assert model.header("x-authz-degraded") == []


def test_public_paths_strip_forged_identity_headers(service_stack: ServiceStack) -> None:
    reply, received = service_stack.send(service_stack.sidecar, "/health", headers=FORGED)
    assert reply.status == 200
    [model] = received
    for name in FORGED:
        assert model.header(name) == [], name
    assert service_stack.sidecar.checks_sent() >= 1  # the service answered it, not the gate


def test_denials_reach_the_client_whole(service_stack: ServiceStack) -> None:
    reply, received = service_stack.send(service_stack.sidecar, PREDICT)
    assert reply.status == 401 and not received
    assert reply.headers["www-authenticate"].startswith("Bearer realm=")
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.json() == {"error": "invalid_token", "reason": "missing_token"}
    token = service_stack.keys.token(new_subject("bob"))
    reply, _ = service_stack.send(service_stack.sidecar, "/v1/models/secret:predict", token)
    assert reply.status == 403 and reply.json()["reason"] == "model_not_allowed"


def test_head_requests_are_checked_and_the_connection_pool_survives(
        service_stack: ServiceStack) -> None:
    token = service_stack.keys.token(new_subject("carol"))
    for _ in range(3):  # reused provider connections: a stray body would break the next check
        denied, _ = service_stack.send(service_stack.sidecar, PREDICT, method="HEAD")
        assert denied.status == 401 and denied.body == b""
        allowed, received = service_stack.send(service_stack.sidecar, PREDICT, token,
                                               method="HEAD")
        assert allowed.status == 200 and len(received) == 1
    assert service_stack.sidecar.ext_authz_stats().get("error", 0) == 0


def test_a_registration_without_upstream_headers_lets_forged_identity_through(
        service_stack: ServiceStack) -> None:
    # The danger of an envoyExtAuthzHttp registration that omits headersToUpstreamOnAllow:
    # Envoy then copies none of the answer's headers to the request, so the verified identity
    # never arrives and a client's forged copy is left in place. Only the headers the answer
    # removes (x-envoy-auth-headers-to-remove, which needs no list) are gone. The shipped
    # registration lists every identity header; tests/deploy checks that it does.
    sub = new_subject("dave")
    reply, received = service_stack.send(service_stack.careless, PREDICT,
                                         service_stack.keys.token(sub), headers=FORGED)
    assert reply.status == 200
    [model] = received
    assert model.header("x-auth-subject") == ["mallory"]  # forged, kept
    assert model.header("x-authz-degraded") == []  # removed by the answer's removal list
