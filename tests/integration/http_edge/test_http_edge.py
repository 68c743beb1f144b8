"""The HTTP edge as a server: keep-alive, pipelining, bodies, limits, malformed and slow requests,
clients that go away, Expect: 100-continue, HTTP/1.0, HEAD, shutdown. Raw sockets against a real
server; every hostile case must end in an explicit answer (or a closed connection), never an
exception and never an allow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from authz.config.service_file import parse_settings
from authz.quota import parse_quota
from authz.server.app import Server
from authz.server.http_edge import HttpLimits
from tests.support.http_check import (
    Response,
    check_request,
    closed_soon,
    exchange,
    read_responses,
)
from tests.support.issuer import TestIssuer
from tests.support.redis_server import free_port

QUOTA = {"default_plan": "free", "plans": {"free": {
    "limits": [{"name": "per-day", "rate": 100, "per": "1d", "burst": 100}]}}}
PREDICT = "/v1/models/iris:predict"
LIMITS = HttpLimits(read_timeout=0.5, idle_timeout=1.5, max_pipelined=8, max_headers=100,
                    max_head_bytes=80 * 1024, max_body_bytes=64 * 1024)
# Timeouts are checked once a second: an expired one is acted on within a second of it.
SWEEP = 1.0


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(tmp_path_factory.mktemp("idp"))


class Edge:
    def __init__(self, server: Server, issuer: TestIssuer) -> None:
        self.server = server
        self.port = server.http_port
        self.token = issuer.mint("alice")
        self.issuer = issuer

    def request(self, path: str = PREDICT, *, token: str | None = "", method: str = "POST",
                headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
        h = dict(headers or {})
        if token is not None:
            h["authorization"] = f"Bearer {token or self.token}"
        return check_request(path, method=method, headers=h, body=body)

    async def one(self, data: bytes, **kw: Any) -> tuple[Response, bool]:
        answers, closed = await exchange(self.port, data, **kw)
        assert len(answers) == 1, answers
        return answers[0], closed


async def start_server(issuer: TestIssuer, store: Any = None, prefix: str = "",
                       limits: HttpLimits = LIMITS) -> Server:
    settings = parse_settings({
        "server": {"grpc_port": 0, "http_port": free_port(), "http_path_prefix": prefix,
                   "metrics_port": 0, "drain_delay": 0, "shutdown_grace": "2s",
                   "host": "127.0.0.1"},
        "auth": {"issuers": [issuer.settings()]}}, "test")
    server = Server(settings, parse_quota(QUOTA, "quota"), store=store, http_limits=limits)
    await server.start()
    return server


@pytest.fixture
async def edge(issuer: TestIssuer) -> AsyncIterator[Edge]:
    server = await start_server(issuer)
    yield Edge(server, issuer)
    await server.stop()


def remaining(r: Response) -> int:
    value = r.header("ratelimit-remaining")
    assert value is not None, r
    return int(value)


# -- keep-alive and pipelining --------------------------------------------------------------

async def test_keep_alive_serves_many_requests_on_one_connection(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        seen = []
        for _ in range(3):
            writer.write(edge.request())
            [answer], closed = await read_responses(reader, 1, 5)
            assert answer.status == 200 and not closed and answer.keep_alive
            seen.append(remaining(answer))
        assert seen == [99, 98, 97]
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(edge: Edge) -> None:
    requests = [edge.request(), edge.request("/health", token=None), edge.request(token=None),
                edge.request("/admin"), edge.request()]
    answers, closed = await exchange(edge.port, b"".join(requests), responses=5)
    assert [a.status for a in answers] == [200, 200, 401, 403, 200]
    assert remaining(answers[0]) == 99 and remaining(answers[4]) == 98
    assert not closed


async def test_more_pipelined_requests_than_the_queue_holds(edge: Edge) -> None:
    # 300 requests in one write, 8 queued at most: reading pauses and resumes, order holds.
    answers, _ = await exchange(edge.port, edge.request() * 300, responses=300, within=30)
    assert [remaining(a) for a in answers] == list(range(99, -1, -1)) + [0] * 200
    assert [a.status for a in answers] == [200] * 100 + [429] * 200


async def test_a_client_that_reads_nothing_is_not_buffered_without_bound(edge: Edge) -> None:
    # ~2 MB of pipelined requests while reading no answer: the edge stops reading when its
    # writes back up, and everything is answered, in order, once the client reads.
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    data = edge.request("/health", token=None) * 20_000
    try:
        writer.write(data)
        drain = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0.5)
        answers, _ = await read_responses(reader, 20_000, 60)
        await drain
        assert len(answers) == 20_000 and {a.status for a in answers} == {200}
    finally:
        writer.close()


# -- bodies ---------------------------------------------------------------------------------

async def test_content_length_body_is_read_and_the_connection_reused(edge: Edge) -> None:
    body = b"x" * 10_000
    answers, closed = await exchange(edge.port, edge.request(body=body) + edge.request(),
                                     responses=2)
    assert [a.status for a in answers] == [200, 200] and not closed


async def test_chunked_body_is_read_and_the_connection_reused(edge: Edge) -> None:
    head = edge.request().replace(b"content-length: 0\r\n", b"transfer-encoding: chunked\r\n")
    chunked = head + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
    answers, closed = await exchange(edge.port, [chunked[:40], chunked[40:], edge.request()],
                                     responses=2)
    assert [a.status for a in answers] == [200, 200] and not closed


async def test_declared_body_over_the_limit_is_413_before_it_is_sent(edge: Edge) -> None:
    request = edge.request().replace(b"content-length: 0", b"content-length: 70000")
    answer, closed = await edge.one(request)  # no body follows: answered from the head
    assert answer.status == 413 and answer.json()["reason"] == "request_body_too_large"
    assert closed


async def test_chunked_body_over_the_limit_is_413(edge: Edge) -> None:
    head = edge.request().replace(b"content-length: 0\r\n", b"transfer-encoding: chunked\r\n")
    chunks = [head] + [b"4000\r\n" + b"a" * 0x4000 + b"\r\n"] * 5  # 80 KiB > 64 KiB
    answer, closed = await edge.one(b"".join(chunks))
    assert answer.status == 413 and closed


# -- head limits ------------------------------------------------------------------------------

async def test_too_many_headers_is_431(edge: Edge) -> None:
    headers = {f"x-h{i}": "v" for i in range(101)}
    answer, closed = await edge.one(edge.request(headers=headers))
    assert answer.status == 431 and answer.json()["reason"] == "request_headers_too_large"
    assert closed
    ok, _ = await edge.one(edge.request(headers={f"x-h{i}": "v" for i in range(90)}))
    assert ok.status == 200


async def test_headers_too_large_is_431_even_when_they_never_end(edge: Edge) -> None:
    big, closed = await edge.one(edge.request(headers={"x-big": "a" * (81 * 1024)}))
    assert big.status == 431 and closed
    # One header that keeps growing in small pieces and never ends: refused once it is past
    # the bound (httptools would hold it all), not when (never) it completes.
    start = edge.request().split(b"\r\n\r\n")[0] + b"\r\nx-endless: "
    pieces = [start] + [b"b" * 4096] * 30  # 120 KiB, no end of line
    answers, closed = await exchange(edge.port, pieces)
    assert [a.status for a in answers] == [431] and closed


async def test_url_too_long_is_414(edge: Edge) -> None:
    answer, closed = await edge.one(edge.request("/v1/models/" + "a" * (81 * 1024)))
    assert answer.status == 414 and closed


async def test_long_but_allowed_path_is_the_pipelines_400(edge: Edge) -> None:
    answer, closed = await edge.one(edge.request("/v1/models/" + "a" * 5000))
    assert answer.status == 400 and answer.json()["reason"] == "path_too_long"
    assert not closed  # a decision, not a protocol error: the connection stays usable


# -- malformed requests ------------------------------------------------------------------------

MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n",
    "no version": b"GET /v1/models/iris:predict\r\n\r\n",
    "bad version": b"GET / HTTP/9.9\r\nhost: x\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nhost x\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nx-a: a\x00b\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nx-a: a\rb\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nx-a: a\r\n b\r\n\r\n",
    "content-length and chunked": (b"POST / HTTP/1.1\r\ncontent-length: 3\r\n"
                                   b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
    "two content-lengths": b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    "negative content-length": b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
    "bad chunk size": (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
    "unknown method": b"BREW /pot HTTP/1.1\r\nhost: x\r\n\r\n",
    "websocket upgrade": (b"GET /v1/models/iris:predict HTTP/1.1\r\nhost: x\r\n"
                          b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"),
    "CONNECT": b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_requests_are_400_and_close(edge: Edge, case: str) -> None:
    answer, closed = await edge.one(MALFORMED[case])
    assert answer.status == 400, answer
    assert answer.json() == {"error": "invalid_request", "reason": "malformed_http_request"}
    assert answer.header("connection") == "close" and closed


async def test_answers_before_a_malformed_request_are_kept_and_nothing_after(edge: Edge) -> None:
    data = edge.request() + edge.request(token=None) + MALFORMED["garbage"] + edge.request()
    answers, closed = await exchange(edge.port, data, responses=4)
    assert [a.status for a in answers] == [200, 401, 400] and closed


async def test_a_request_after_connection_close_is_not_read(edge: Edge) -> None:
    data = edge.request(headers={"connection": "close"}) + edge.request()
    answers, closed = await exchange(edge.port, data, responses=2)
    assert [a.status for a in answers] == [200] and closed
    assert answers[0].header("connection") == "close"


# -- slow and vanishing clients --------------------------------------------------------------

async def test_slow_partial_headers_time_out_with_408(edge: Edge) -> None:
    started = time.monotonic()
    partial = edge.request()[:60]
    answers, closed = await exchange(edge.port, partial, within=LIMITS.read_timeout + 5)
    assert [a.status for a in answers] == [408] and closed
    assert time.monotonic() - started < LIMITS.read_timeout + SWEEP + 1.5


async def test_slow_body_times_out_with_408(edge: Edge) -> None:
    request = edge.request().replace(b"content-length: 0", b"content-length: 100") + b"abc"
    answers, closed = await exchange(edge.port, request, within=LIMITS.read_timeout + 5)
    assert [a.status for a in answers] == [408] and closed


async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(edge.request())
        [answer], _ = await read_responses(reader, 1, 5)
        assert answer.status == 200
        assert await closed_soon(reader, LIMITS.idle_timeout + SWEEP + 1.5)
    finally:
        writer.close()


async def test_client_closing_mid_request_is_harmless(edge: Edge,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for cut in (1, 30, len(edge.request()) - 2):
        _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(edge.request()[:cut])
        await writer.drain()
        writer.close()
    await asyncio.sleep(0.2)
    answer, _ = await edge.one(edge.request())
    assert answer.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert edge.server.components.http.connections == set() or all(
        c.transport is not None for c in edge.server.components.http.connections)


async def test_client_gone_while_its_check_is_decided(issuer: TestIssuer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from authz.buckets.memory import MemoryBucketStore

    class Slow(MemoryBucketStore):
        async def charge(self, buckets: Any, cost: float) -> Any:
            await asyncio.sleep(0.3)
            return await super().charge(buckets, cost)

    caplog.set_level(logging.WARNING)
    server = await start_server(issuer, store=Slow())
    try:
        edge = Edge(server, issuer)
        _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(edge.request())
        await writer.drain()
        await asyncio.sleep(0.05)
        assert server.components.http.inflight == 1
        writer.close()
        await asyncio.sleep(0.5)
        assert server.components.http.inflight == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        answer, _ = await edge.one(edge.request())
        assert answer.status == 200
    finally:
        await server.stop()


async def test_half_closed_client_still_gets_its_answers(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(edge.request() + edge.request(token=None))
        writer.write_eof()
        answers, closed = await read_responses(reader, 2, 5)
        assert [a.status for a in answers] == [200, 401] and closed
    finally:
        writer.close()


# -- Expect, HTTP/1.0, HEAD ------------------------------------------------------------------

async def test_expect_100_continue(edge: Edge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        head = edge.request().replace(b"content-length: 0", b"content-length: 5\r\n"
                                      b"expect: 100-continue")
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        [answer], closed = await read_responses(reader, 1, 5)
        assert answer.status == 200 and not closed
    finally:
        writer.close()


async def test_expect_100_continue_with_a_body_too_large_gets_413_instead(edge: Edge) -> None:
    head = edge.request().replace(b"content-length: 0", b"content-length: 999999\r\n"
                                  b"expect: 100-continue")
    answer, closed = await edge.one(head)
    assert answer.status == 413 and closed


async def test_http_1_0_closes_unless_keep_alive_is_asked(edge: Edge) -> None:
    request = edge.request().replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    answer, closed = await edge.one(request)
    assert answer.status == 200 and closed and not answer.keep_alive
    keep = request.replace(b"\r\n\r\n", b"\r\nconnection: keep-alive\r\n\r\n")
    answers, closed = await exchange(edge.port, keep + keep, responses=2)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].header("connection") == "keep-alive" and not closed


async def test_http_1_0_gets_no_100_continue(edge: Edge) -> None:
    request = edge.request().replace(b"HTTP/1.1", b"HTTP/1.0", 1).replace(
        b"content-length: 0", b"content-length: 2\r\nexpect: 100-continue") + b"{}"
    raw = await _raw(edge.port, request)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_head_answers_carry_no_body(edge: Edge) -> None:
    # Envoy checks a HEAD with a HEAD: a body in the answer would be read as the start of the
    # next answer on that connection.
    data = edge.request(method="HEAD", token=None) + edge.request(method="HEAD")
    raw = await _raw(edge.port, data, close_after=True)
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 401 ") and b"content-length: 50" in first
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:80]


async def _raw(port: int, data: bytes, close_after: bool = False) -> bytes:
    """The answer bytes as sent, read until the server closes (or 1 s of silence)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if close_after:
            writer.write_eof()
        out = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                return out
            if not chunk:
                return out
            out += chunk
    finally:
        writer.close()


# -- request contents -----------------------------------------------------------------------

async def test_repeated_authorization_headers_are_refused_not_chosen(edge: Edge) -> None:
    data = edge.request().replace(b"\r\n\r\n", f"\r\nauthorization: Bearer {edge.token}\r\n\r\n"
                                  .encode())
    answer, _ = await edge.one(data)
    assert answer.status == 401 and answer.json()["reason"] == "malformed_token"


async def test_header_names_are_case_insensitive(edge: Edge) -> None:
    data = check_request(PREDICT, headers={"AUTHORIZATION": f"Bearer {edge.token}"})
    answer, _ = await edge.one(data)
    assert answer.status == 200


async def test_non_ascii_bytes_in_the_token_are_a_401(edge: Edge) -> None:
    data = edge.request(token="x").replace(b"Bearer x", b"Bearer \xff\xfe.\xc3\xa9.x")
    answer, _ = await edge.one(data)
    assert answer.status == 401


async def test_path_prefix_is_stripped_and_required(issuer: TestIssuer) -> None:
    server = await start_server(issuer, prefix="/check")
    try:
        edge = Edge(server, issuer)
        ok, _ = await edge.one(edge.request("/check" + PREDICT))
        assert ok.status == 200
        for url in (PREDICT, "/checkv1/models/iris:predict", "/chec" + PREDICT, "/check"):
            answer, closed = await edge.one(edge.request(url))
            assert answer.status == 400, url
            assert answer.json()["reason"] == "path_outside_check_prefix" and not closed
        public, _ = await edge.one(edge.request("/check/health", token=None))
        assert public.status == 200
    finally:
        await server.stop()


# -- lifecycle -------------------------------------------------------------------------------

async def test_not_ready_until_keys_load_is_503(issuer: TestIssuer) -> None:
    server = await start_server(issuer)
    try:
        server.components.pipeline.ready = False
        edge = Edge(server, issuer)
        answer, _ = await edge.one(edge.request())
        assert answer.status == 503 and answer.json()["reason"] == "not_ready"
        assert answer.header("retry-after") == "1"
    finally:
        await server.stop()


async def test_stop_finishes_checks_in_flight_and_closes_idle_connections(
        issuer: TestIssuer) -> None:
    from authz.buckets.memory import MemoryBucketStore

    class Slow(MemoryBucketStore):
        async def charge(self, buckets: Any, cost: float) -> Any:
            await asyncio.sleep(0.4)
            return await super().charge(buckets, cost)

    server = await start_server(issuer, store=Slow())
    edge = Edge(server, issuer)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", edge.port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        busy_writer.write(edge.request())
        await busy_writer.drain()
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop())
        [answer], closed = await read_responses(busy_reader, 1, 5)
        assert answer.status == 200 and answer.header("connection") == "close" and closed
        assert await closed_soon(idle_reader, 2)
        await stopping
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", edge.port)
    finally:
        idle_writer.close()
        busy_writer.close()


async def test_http_port_in_use_is_a_startup_error(issuer: TestIssuer) -> None:
    from authz.errors import StartupError

    first = await start_server(issuer)
    try:
        settings = parse_settings({
            "server": {"grpc_port": 0, "http_port": first.http_port, "metrics_port": 0,
                       "host": "127.0.0.1"},
            "auth": {"issuers": [issuer.settings()]}}, "test")
        second = Server(settings, parse_quota(QUOTA, "quota"))
        with pytest.raises(StartupError, match=f"server.http_port {first.http_port}"):
            await second.start()
        await second.stop_quietly()
    finally:
        await first.stop()
