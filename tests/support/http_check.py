"""A small HTTP/1.1 client for the HTTP edge's tests: check requests shaped like Envoy's, raw
bytes for the hostile ones, and a parser for what comes back (httptools' response parser, so
the tests read answers with the same llhttp the edge reads requests with, not with the code
under test)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools

# Headers Envoy's HTTP client adds to every check request (seen on Envoy 1.40).
ENVOY_HEADERS = {"x-envoy-internal": "true", "x-envoy-expected-rq-timeout-ms": "500"}


def check_request(path: str, *, method: str = "POST", host: str = "models",
                  headers: Mapping[str, str] | None = None, body: bytes = b"",
                  prefix: str = "") -> bytes:
    """The check request Envoy sends for a client's `method path` (prefix = pathPrefix)."""
    lines = [f"{method} {prefix}{path} HTTP/1.1", f"host: {host}",
             f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in {**ENVOY_HEADERS, **(headers or {})}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)  # lower-case names, in order
    body: bytes = b""
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class ResponseReader:
    """Feeds bytes, collects whole responses (several, when requests were pipelined)."""

    def __init__(self) -> None:
        self.done: list[Response] = []
        self._current = Response()
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_begin(self) -> None:
        self._current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self._current.keep_alive = self._parser.should_keep_alive()
        if self._current.status >= 200:  # a 100 Continue is not the answer
            self.done.append(self._current)


async def exchange(port: int, data: bytes | Sequence[bytes], *, responses: int = 1,
                   within: float = 5.0, host: str = "127.0.0.1", settle: float = 0.3,
                   partial: bool = False) -> tuple[list[Response], bool]:
    """Send `data` (one write, or each item as its own write) on a fresh connection; read
    until `responses` answers arrived or the server closed. Returns (answers, closed): closed
    means the server closed within `settle` seconds after the last answer. `partial`: fewer
    answers than asked within `within` are returned instead of raising TimeoutError."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for chunk in [data] if isinstance(data, bytes) else data:
            writer.write(chunk)
            await writer.drain()
        return await read_responses(reader, responses, within, settle=settle, partial=partial)
    finally:
        writer.close()


async def read_responses(reader: asyncio.StreamReader, responses: int, within: float, *,
                         settle: float = 0.3, partial: bool = False
                         ) -> tuple[list[Response], bool]:
    parsed = ResponseReader()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while len(parsed.done) < responses:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            if partial:
                return parsed.done, False
            raise TimeoutError(f"{len(parsed.done)}/{responses} answers within {within} s"
                               ) from None
        if not chunk:
            return parsed.done, True
        parsed.feed(chunk)
    return parsed.done, (await closed_soon(reader, settle)) if settle else False


async def closed_soon(reader: asyncio.StreamReader, wait: float = 0.3) -> bool:
    """True when the server closes the connection within `wait` seconds (no more bytes)."""
    try:
        extra = await asyncio.wait_for(reader.read(1), wait)
    except TimeoutError:
        return False
    assert not extra, f"unexpected bytes after the answers: {extra!r}"
    return True


class HttpCheckClient:
    """Keep-alive connections to the HTTP edge, one check in flight on each (as Envoy's
    connection pool does); more concurrent checks open more connections."""

    def __init__(self, port: int, prefix: str = "") -> None:
        self.port = port
        self.prefix = prefix
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self, raw: bytes) -> Response:
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        parsed = ResponseReader()
        while not parsed.done:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                writer.close()
                raise ConnectionError("the edge closed the connection before answering")
            parsed.feed(chunk)
        answer = parsed.done[0]
        if answer.keep_alive:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return answer

    async def check(self, path: str, *, method: str = "POST",
                    headers: Mapping[str, str] | None = None) -> Response:
        return await self.send(check_request(path, method=method, headers=headers,
                                             prefix=self.prefix))

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def blocking_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Everything the server sends back on a fresh connection until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out
