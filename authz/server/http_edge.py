"""The HTTP edge: Envoy's HTTP ext_authz protocol (Istio `envoyExtAuthzHttp`), on its own port.

Envoy's HTTP ext_authz client sends, for each request it checks, an HTTP/1.1 request with the
original method, the provider's `pathPrefix` followed by the original path (query included),
the original Host, `content-length` (0, or the buffered body's length with
`includeRequestBodyInCheck`), `authorization` and the headers the provider allows
(`includeRequestHeadersInCheck`). The answer's status decides: 200 allows, any other status
below 500 denies with that status, body and headers; a 5xx is an error
(`status_on_error`). authz/server/http_answers.py turns a Decision into those bytes.

This is a raw asyncio Protocol over httptools (llhttp, the parser Node.js and uvicorn use): no
framework between the socket and the request pipeline (authz/pipeline.py), which decides
exactly as it does for the gRPC edge.

Hostile input is answered, never raised, and never allowed: a parse error is a 400 and the
connection is closed; over-long heads are 431 (414 for the URL), over-long bodies 413, a
request that does not arrive whole within `read_timeout` 408; every such answer closes the
connection after the answers of the requests before it (pipelining keeps their order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httptools

from ..decision import Decision
from ..pipeline import CheckPipeline
from . import http_answers as ha
from .check_flow import CheckFlow
from .http_answers import Answer

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what one connection may send; each says where its number comes from."""

    # Envoy's own default for a downstream request (max_headers_count: 100); a check request
    # carries a subset of those headers plus the few Envoy adds.
    max_headers: int = 100
    # Request line and headers together. Envoy refuses downstream requests whose headers pass
    # 60 KiB (max_request_headers_kb); the check request is a subset of them plus the path
    # prefix and Envoy's own few headers.
    max_head_bytes: int = 80 * 1024
    # A body arrives only with includeRequestBodyInCheck; an Istio sidecar buffers at most
    # 1 MiB of it without an extra buffer filter. It is read and discarded (nothing in the
    # decision depends on it).
    max_body_bytes: int = 1024 * 1024
    # A request that has started must arrive whole within this: Envoy writes a check request
    # in one go and its check timeout is well under a second (0.5 s in the shipped
    # registration); a request still trickling in after 10 s is a slow-loris, not Envoy.
    read_timeout: float = 10.0
    # An idle keep-alive connection is closed after this. Longer than Envoy's own idle timeout
    # for upstream connections (1 h, which Istio keeps): Envoy always closes first, so it never
    # sends a check on a connection we are closing at that moment.
    idle_timeout: float = 3900.0
    # Pipelined requests queued on one connection before it stops reading (Envoy does not
    # pipeline; a client that does waits for its answers instead of filling our memory).
    max_pipelined: int = 32


# How often the timeouts above are checked: one pass over the connections a second costs
# nothing per request (no timer is armed or cancelled per check).
_SWEEP_INTERVAL = 1.0
# Reads are fed to the parser in pieces of at most this: the bytes of a head not yet complete
# are then known to within one piece (the head bound refuses nothing under 72 KiB).
_FEED_PIECE = 8 * 1024
# After an answer that closes the connection, what the client still sends is read and dropped
# for up to this long (or this many bytes) before the socket closes: closing with unread input
# makes the kernel reset the connection, and the client could lose the answer itself.
_LINGER = 2.0
_LINGER_BYTES = 1024 * 1024
# Connections waiting for Envoy's listen queue: Envoy opens as many as it has checks in flight.
_BACKLOG = 1024


class _Refused(Exception):
    """Raised from a parser callback: answer this instead, then close."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision


class _Request:
    __slots__ = ("body", "close", "headers", "http_1_0", "method", "url")
    # `method` is the client's own: Envoy checks a HEAD with a HEAD, whose answer has no body.
    # `body`: the client's body (includeRequestBodyInCheck), None when the check has none.

    def __init__(self, url: str, headers: dict[str, str], method: str, close: bool,
                 http_1_0: bool, body: bytes | None = None) -> None:
        self.body = body
        self.url = url
        self.headers = headers
        self.method = method
        self.close = close
        self.http_1_0 = http_1_0


class HttpEdge:
    """The HTTP check server: its listening socket, its connections and the answers."""

    def __init__(self, pipeline: CheckPipeline, telemetry: CheckTelemetry | None = None, *,
                 path_prefix: str = "", limits: HttpLimits | None = None) -> None:
        self.pipeline = pipeline
        self.telemetry = telemetry
        self.path_prefix = path_prefix
        self.limits = limits or HttpLimits()
        self.flow = CheckFlow(pipeline, telemetry, ha.AnswerCache(), no_path=ha.OUTSIDE_PREFIX,
                              fixed=ha.EDGE_ERRORS)
        self.connections: set[HttpConnection] = set()
        self.inflight = 0  # checks being decided
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._draining = False
        self._all_closed: asyncio.Event | None = None  # set once draining has closed them all

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; returns the port. `reuse_port`: SO_REUSEPORT, for the workers of one
        supervisor (which holds the port's claim); else the bind is exclusive. Raises OSError."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=_BACKLOG,
            reuse_port=reuse_port or None)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        self._sweeper = loop.call_later(_SWEEP_INTERVAL, self._sweep)
        return self.port

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def stop(self, grace: float) -> None:
        """Stop accepting; close idle connections; let the requests in flight (and those
        arriving whole on open connections) be answered within `grace`, each answer then
        closing its connection; abort what is left."""
        self.stop_accepting()
        self._draining = True
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        limits = self.limits
        try:
            for conn in list(self.connections):
                conn.sweep(now, limits)
        except Exception:  # the sweeper outlives anything one pass can throw
            log.exception("HTTP edge: checking connection timeouts failed")
        self._sweeper = loop.call_later(_SWEEP_INTERVAL, self._sweep)

    # -- one check -----------------------------------------------------------------------------

    def path_of(self, url: str) -> str | None:
        """The request's own path (query included) from the check request's URL, or None when
        the URL is not under the configured prefix."""
        prefix = self.path_prefix
        if not prefix:
            return url
        if url.startswith(prefix) and url[len(prefix):len(prefix) + 1] == "/":
            return url[len(prefix):]
        return None

class HttpConnection(asyncio.Protocol):
    """One connection from Envoy: requests parsed as they arrive, answered in order."""

    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge
        self.limits = edge.limits
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # The request being read.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._count = 0
        self._head_bytes = 0  # request line and the headers completed so far
        self._partial = 0  # bytes received since the last complete header (still in the head)
        self._body_bytes = 0
        self._body: list[bytes] = []
        self._in_head = False  # a request has begun and its headers are not complete
        self._reading = False  # a request has begun and is not complete
        self._started = 0.0
        self._last_active = self.loop.time()
        # Requests read and not answered yet, in order; an edge error ends the queue.
        self._queue: deque[_Request | Decision] = deque()
        self._busy = False  # a check of this connection is being decided
        self._closing = False  # nothing more is read; close once the queue is answered
        self._draining = False  # the server stops: the next answer closes the connection
        self._read_paused = False
        self._write_paused = False
        self._lingering = False  # answered and half-closed: dropping what still arrives
        self._linger_until = 0.0
        self._dropped = 0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Answers are one write each; never wait for Envoy's delayed ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.edge.connections.add(self)
        if self.edge._draining:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._queue.clear()
        edge = self.edge
        edge.connections.discard(self)
        if edge._all_closed is not None and not edge.connections:
            edge._all_closed.set()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            # After an error or a `connection: close` request nothing more is parsed.
            if self._lingering:
                self._dropped += len(data)
                if self._dropped > _LINGER_BYTES and self.transport is not None:
                    self.transport.abort()
            return
        if len(data) <= _FEED_PIECE:
            self._feed(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), _FEED_PIECE):
            if self._closing:
                return
            self._feed(view[start:start + _FEED_PIECE])

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause.decision if isinstance(cause, _Refused) else ha.MALFORMED)
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # Malformed; or an Upgrade / CONNECT (refused in on_headers_complete already: a
            # check request is neither).
            self._fail(ha.MALFORMED)
            return
        if self._in_head:
            # A header is still incomplete: httptools holds its bytes until it ends, so they
            # are counted here (an over-long header never has to end to be refused). At most
            # one piece more than it holds: feeding in pieces keeps the estimate that close.
            self._partial += len(data)
            limit = self.limits.max_head_bytes
            if self._head_bytes + self._partial > limit:
                # The URL alone filling the bound (to within a piece): it is what is too long.
                long_url = len(self._url) > limit - _FEED_PIECE
                self._fail(ha.URI_TOO_LONG if long_url else ha.HEADERS_TOO_LARGE)

    def eof_received(self) -> bool | None:
        # A client that closes its side mid-request gets nothing more; one that closes after
        # whole requests still gets their answers (half-close), then the connection closes.
        if self._lingering:
            return False
        self._closing = True
        self._reading = False
        # True keeps the write side open for the answers still owed; False closes now.
        return bool(self._busy or self._queue)

    def pause_writing(self) -> None:
        # The peer does not read its answers: stop reading its requests until it does.
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if len(self._queue) < self.limits.max_pipelined:
            self._resume_reading()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing:  # a request after `connection: close` in the same read
            raise _Refused(ha.MALFORMED)
        self._url = b""
        self._headers = {}
        self._count = self._head_bytes = self._partial = self._body_bytes = 0
        self._body = []
        self._in_head = self._reading = True
        self._started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        self._partial = 0
        if self._head_bytes > self.limits.max_head_bytes:
            raise _Refused(ha.URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        self._head_bytes += len(name) + len(value) + 4
        self._partial = 0
        limits = self.limits
        if self._count > limits.max_headers or self._head_bytes > limits.max_head_bytes:
            raise _Refused(ha.HEADERS_TOO_LARGE)
        # latin-1 maps every byte to one character and never fails: a value that is not ASCII
        # reaches the checks that refuse it (a token's charset) instead of an exception here.
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        # Repeated headers joined with ',' as Envoy's gRPC client does: two Authorization
        # headers are then one malformed value, never a choice of one of them.
        headers[key] = f"{headers[key]},{text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        # Envoy speaks HTTP/1.1 to us; 1.0 is accepted. llhttp also parses HTTP/0.9's bare
        # "GET /path" and other versions: those are no check requests. Upgrade and CONNECT
        # would turn the connection into a tunnel: neither is one either.
        if parser.get_http_version() not in ("1.1", "1.0") or parser.should_upgrade():
            raise _Refused(ha.MALFORMED)
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise _Refused(ha.BODY_TOO_LARGE)
        expect = headers.get("expect")
        if (expect is not None and expect.lower() == "100-continue"
                and parser.get_http_version() != "1.0"
                and (headers.get("transfer-encoding") or (length and length != "0"))
                and not self._busy and not self._queue and self.transport is not None):
            # Only when nothing is owed before it: a 100 between two answers would be read as
            # the start of the earlier one. A client that gets none sends its body anyway.
            self.transport.write(ha.CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            raise _Refused(ha.BODY_TOO_LARGE)
        self._body.append(body)  # bounded by max_body_bytes just above

    def on_message_complete(self) -> None:
        self._reading = False
        parser = self.parser
        close = not parser.should_keep_alive()
        request = _Request(self._url.decode("latin-1"), self._headers,
                           parser.get_method().decode("latin-1"), close,
                           parser.get_http_version() == "1.0",
                           b"".join(self._body) if self._body else None)
        self._body = []
        self._queue.append(request)
        if close:
            self._closing = True  # what follows a `connection: close` request is not read
            self._pause_reading()
        if not self._busy:
            self._next()
        elif len(self._queue) >= self.limits.max_pipelined:
            self._pause_reading()

    # -- answering ---------------------------------------------------------------------------

    def _fail(self, decision: Decision) -> None:
        """Answer `decision` after what is owed, then close; read nothing more."""
        if self._closing:
            return
        self._closing = True
        self._reading = self._in_head = False
        self._pause_reading()
        self._queue.append(decision)
        if not self._busy:
            self._next()

    def _next(self) -> None:
        queue = self._queue
        while queue:
            item = queue.popleft()
            if isinstance(item, Decision):
                self._send_edge_error(item)
                return
            self._busy = True
            self.edge.inflight += 1
            self.loop.create_task(self._check(item))
            return
        if self._closing:
            self._close()
        elif self._read_paused and not self._write_paused:
            self._resume_reading()

    async def _check(self, request: _Request) -> None:
        edge = self.edge
        try:
            answer = await edge.flow.check(edge.path_of(request.url), request.headers,
                                           request.body, request.method)
        finally:
            edge.inflight -= 1
            self._busy = False
        try:
            self._send(answer, request.close, request.http_1_0, request.method == "HEAD")
            self._next()
        except Exception as e:  # the transport failed under us: drop the connection
            edge.flow.respond_failed(repr(e), exc_info=e)
            if self.transport is not None:
                self.transport.abort()

    def _send_edge_error(self, decision: Decision) -> None:
        telemetry = self.edge.telemetry
        if telemetry is not None:
            try:
                scope = telemetry.start_check({})
                telemetry.finish_check(scope, decision)
            except Exception as e:
                self.edge.flow.telemetry_failed(repr(e), exc_info=e)
        self._send(self.edge.flow.answers.get(decision), True, False, False)
        self._close()

    def _close(self) -> None:
        """Close after the last answer: half-close, drop what still arrives, then close."""
        transport = self.transport
        if transport is None or self._lingering:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the peer is gone already
            transport.abort()
            return
        self._lingering = True
        self._linger_until = self.loop.time() + _LINGER
        if self._read_paused:
            self._read_paused = False
            with contextlib.suppress(RuntimeError):
                transport.resume_reading()

    def _send(self, answer: Answer, close: bool, http_1_0: bool, head: bool) -> None:
        transport = self.transport
        if transport is None:
            return  # the client went away while its check was decided
        close = close or self._draining or (self._closing and not self._queue)
        if close:
            end = ha.END_CLOSE
            self._closing = True
        else:
            end = ha.END_KEEP_ALIVE_1_0 if http_1_0 else ha.END_KEEP_ALIVE
        # A HEAD's answer carries the content-length its body would have, and no body.
        body = answer.body if not head else b""
        transport.write(answer.head + end + body if body else answer.head + end)
        self._last_active = self.loop.time()

    # -- flow control, timeouts, shutdown ----------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            with contextlib.suppress(RuntimeError):  # already closing
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not self._closing and self.transport is not None:
            self._read_paused = False
            # A request cut by our own pause gets its whole read_timeout from now.
            self._started = self.loop.time()
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def sweep(self, now: float, limits: HttpLimits) -> None:
        if self.transport is None:
            return
        if self._lingering:
            if now > self._linger_until:
                self.transport.close()
            return
        if self._reading:
            # While we do not read (queue full, answers unread) the client cannot be late.
            if not self._read_paused and now - self._started > limits.read_timeout:
                self._fail(ha.REQUEST_TIMEOUT)
        elif not self._busy and not self._queue and now - self._last_active > limits.idle_timeout:
            self.transport.close()

    def drain(self) -> None:
        """The server stops: an idle connection closes now, a busy one after its next answer."""
        self._draining = True
        if self.transport is not None and not self._busy and not self._queue \
                and not self._reading and not self._lingering:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
