"""JWKS over real HTTP: a local http.server on a free loopback port serves the issuer's keys.

Covers: keys fetched once and cached, refetch on an unknown kid, the refetch rate limit, the
last good keys kept when the server answers 500 or garbage, `fail` vs `retry` at start, and
jku/x5u never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from tokens_testkit import ISS_A, FakeClock, Keys, bearer, claims, public_jwk, sign, started

from authz.config.settings import AuthSettings, IssuerSettings
from authz.errors import KeySourceError
from authz.tokens import keys as keys_module
from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.verifier import Authenticator

JWKS_PATH = "/.well-known/jwks.json"


class JwksServer:
    """What the server answers is set by the test; every request path is recorded."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.delay = 0.0
        self.redirect_to: str | None = None
        self.paths: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                # The client may have given up (the timeout test).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._answer()

            def _answer(self) -> None:
                with server._lock:
                    server.paths.append(self.path)
                    status, body, delay = server.status, server.body, server.delay
                    redirect = server.redirect_to
                if delay:
                    time.sleep(delay)
                if redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{JWKS_PATH}"
        # A short poll interval: shutdown() waits up to one interval.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def serve(self, jwks: dict[str, Any]) -> None:
        with self._lock:
            self.status, self.body = 200, json.dumps(jwks).encode()

    def fail(self, status: int, body: bytes = b"oops") -> None:
        with self._lock:
            self.status, self.body = status, body

    def jwks_fetches(self) -> int:
        with self._lock:
            return sum(1 for p in self.paths if p == JWKS_PATH)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[JwksServer]:
    srv = JwksServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def url_settings(url: str, **overrides: Any) -> AuthSettings:
    base: dict[str, Any] = {
        "issuers": (IssuerSettings(ISS_A, jwks_url=url),),
        "jwks_timeout": 1.0,
        # No background refresh unless a test asks for one.
        "jwks_refresh_interval": 3600.0,
        "jwks_refresh_min_interval": 30.0,
    }
    base.update(overrides)
    return AuthSettings(**base)


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def failed_fetches(auth: Authenticator, at_least: int) -> None:
    await eventually(lambda: auth.key_stats()[0].refreshes_failed >= at_least)


def one_key(keys: Keys, kid: str = "a1") -> dict[str, Any]:
    return {"keys": [public_jwk(keys.rsa_a, kid)]}


async def test_fetched_once_then_refetched_on_unknown_kid_rate_limited(
    server: JwksServer, keys: Keys
) -> None:
    server.serve(one_key(keys))
    monotonic = FakeClock(1000.0)
    auth = Authenticator(url_settings(server.url), clock=FakeClock(), monotonic=monotonic)
    async with started(auth):
        assert auth.ready
        assert server.jwks_fetches() == 1
        # Keys are cached: many tokens, no more fetches.
        for sub in ("u1", "u2", "u3"):
            assert isinstance(
                await auth.authenticate(bearer(sign(keys.rsa_a, claims(sub=sub)))), Identity
            )
        assert server.jwks_fetches() == 1

        # Rotation: a new kid appears at the IdP; the first token naming it triggers a refetch.
        server.serve({"keys": [public_jwk(keys.rsa_a, "a1"), public_jwk(keys.rsa_b, "a2")]})
        rotated = sign(keys.rsa_b, claims(sub="u4"), kid="a2")
        assert isinstance(await auth.authenticate(bearer(rotated)), Identity)
        assert server.jwks_fetches() == 2

        # Unknown kids right after: no refetch inside jwks_refresh_min_interval ...
        forged = [sign(keys.attacker, claims(), kid=f"forged-{i}") for i in range(20)]
        results = await asyncio.gather(*(auth.authenticate(bearer(t)) for t in forged))
        assert set(results) == {TokenFailure.UNKNOWN_KEY}
        assert server.jwks_fetches() == 2
        # ... one refetch once it has passed, however many requests arrive together.
        monotonic.advance(30.0)
        results = await asyncio.gather(*(auth.authenticate(bearer(t)) for t in forged))
        assert set(results) == {TokenFailure.UNKNOWN_KEY}
        assert server.jwks_fetches() == 3
        stats = auth.key_stats()[0]
        assert (stats.refreshes_ok, stats.refreshes_failed, stats.kid_refetches) == (3, 0, 2)
        assert auth.jwks_refresh_counts() == {(ISS_A, "ok"): 3, (ISS_A, "failed"): 0}


async def test_last_good_keys_kept_when_the_server_breaks(server: JwksServer, keys: Keys) -> None:
    server.serve(one_key(keys))
    auth = Authenticator(url_settings(server.url, jwks_refresh_interval=0.05), clock=FakeClock())
    async with started(auth):
        [src] = auth.key_stats()
        failures_seen = 0
        for status, body in [
            (500, b"internal error"),
            (200, b"<html>not json</html>"),
            (200, b'{"keys": []}'),
            (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
            (404, b""),
        ]:
            server.fail(status, body)
            # Two more failures: the second surely fetched this answer, not the previous one.
            await failed_fetches(auth, at_least=failures_seen + 2)
            failures_seen = auth.key_stats()[0].refreshes_failed
            assert auth.ready
            token = sign(keys.rsa_a, claims(sub=f"during-{status}-{len(body)}"))
            assert isinstance(await auth.authenticate(bearer(token)), Identity)
        assert auth.key_stats()[0].last_error is not None
        ok_before = auth.key_stats()[0].refreshes_ok
        server.serve(one_key(keys))
        await eventually(lambda: auth.key_stats()[0].refreshes_ok > ok_before)
        assert auth.key_stats()[0].last_error is None
        assert src.issuer == ISS_A


async def test_refetch_failure_keeps_keys(server: JwksServer, keys: Keys) -> None:
    server.serve(one_key(keys))
    auth = Authenticator(url_settings(server.url), clock=FakeClock())
    async with started(auth):
        server.fail(500)
        unknown = sign(keys.rsa_a, claims(), kid="new")
        assert await auth.authenticate(bearer(unknown)) is TokenFailure.UNKNOWN_KEY
        assert server.jwks_fetches() == 2
        assert isinstance(await auth.authenticate(bearer(sign(keys.rsa_a, claims()))), Identity)


async def test_removed_key_drops_its_cached_tokens(server: JwksServer, keys: Keys) -> None:
    server.serve(one_key(keys))
    auth = Authenticator(url_settings(server.url, jwks_refresh_interval=0.05), clock=FakeClock())
    async with started(auth):
        header = bearer(sign(keys.rsa_a, claims()))
        assert isinstance(await auth.authenticate(header), Identity)
        assert auth.authenticate_cached(header) is not None
        server.serve({"keys": [public_jwk(keys.rsa_b, "a2")]})  # a1 revoked
        await eventually(lambda: auth.cache_size == 0)
        assert auth.authenticate_cached(header) is None
        assert await auth.authenticate(header) is TokenFailure.UNKNOWN_KEY


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, b"boom", "HTTP 500"),
        (200, b"garbage", "not JSON"),
        (200, b'{"keys": []}', "no usable"),
    ],
)
async def test_fail_mode_stops_start(
    server: JwksServer, status: int, body: bytes, reason: str
) -> None:
    server.fail(status, body)
    auth = Authenticator(url_settings(server.url), clock=FakeClock())
    with pytest.raises(KeySourceError) as err:
        await auth.start()
    message = str(err.value)
    assert ISS_A in message and server.url in message and reason in message
    assert not auth.ready
    await auth.close()


async def test_fail_mode_unreachable_and_slow(server: JwksServer, keys: Keys) -> None:
    closed_port_url = server.url.replace(str(server.httpd.server_address[1]), "1")
    auth = Authenticator(url_settings(closed_port_url), clock=FakeClock())
    with pytest.raises(KeySourceError, match="unreachable"):
        await auth.start()

    server.serve(one_key(keys))
    server.delay = 1.0
    slow = Authenticator(url_settings(server.url, jwks_timeout=0.2), clock=FakeClock())
    began = time.monotonic()
    with pytest.raises(KeySourceError, match="timeout"):
        await slow.start()
    assert time.monotonic() - began < 0.9  # bounded by jwks_timeout, not by the server


async def test_retry_mode_becomes_ready_when_keys_load(server: JwksServer, keys: Keys) -> None:
    server.fail(503)
    auth = Authenticator(
        url_settings(server.url, on_jwks_unavailable="retry", jwks_refresh_interval=0.05),
        clock=FakeClock(),
    )
    async with started(auth):
        assert not auth.ready
        token = bearer(sign(keys.rsa_a, claims()))
        assert await auth.authenticate(token) is TokenFailure.KEYS_UNAVAILABLE
        await eventually(lambda: auth.key_stats()[0].refreshes_failed >= 2)
        assert not auth.ready
        server.serve(one_key(keys))
        await eventually(lambda: auth.ready)
        assert isinstance(await auth.authenticate(token), Identity)


async def test_jku_and_x5u_are_never_fetched(server: JwksServer, keys: Keys) -> None:
    server.serve(one_key(keys))
    base = server.url.removesuffix(JWKS_PATH)
    auth = Authenticator(url_settings(server.url), clock=FakeClock())
    async with started(auth):
        headers = {"jku": f"{base}/attacker/jwks.json", "x5u": f"{base}/attacker/cert.pem"}
        evil = sign(keys.attacker, claims(), kid="evil", headers=headers)
        assert await auth.authenticate(bearer(evil)) is TokenFailure.UNKNOWN_KEY
        ours = sign(keys.rsa_a, claims(), headers=headers)
        assert isinstance(await auth.authenticate(bearer(ours)), Identity)
    assert all(p == JWKS_PATH for p in server.paths), server.paths


async def test_redirect_to_file_url_refused(server: JwksServer) -> None:
    server.redirect_to = "file:///etc/passwd"
    auth = Authenticator(url_settings(server.url), clock=FakeClock())
    with pytest.raises(KeySourceError, match="HTTP 302"):
        await auth.start()


async def test_fetch_spans(server: JwksServer, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    # A private provider: the global one belongs to authz.telemetry.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(keys_module, "_tracer", provider.get_tracer("test"))
    server.serve(one_key(keys))
    auth = Authenticator(url_settings(server.url), clock=FakeClock())
    async with started(auth):
        server.fail(500)
        await auth.authenticate(bearer(sign(keys.rsa_a, claims(), kid="new")))
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["jwks.fetch", "jwks.fetch"]
    assert all(s.attributes is not None and s.attributes["issuer"] == ISS_A for s in spans)
    assert spans[0].status.status_code is StatusCode.UNSET
    assert spans[1].status.status_code is StatusCode.ERROR
    provider.shutdown()
