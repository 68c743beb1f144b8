"""The HTTP floor: a bare HTTP/1.1 responder, the most any Python HTTP ext_authz server can do.

An asyncio Protocol on uvloop, each request parsed by httptools (llhttp) and answered with one
prebuilt 200 carrying four headers (three identity headers and content-length), keep-alive:
what the service's HTTP edge (authz/server/http_edge.py) does minus the decision and minus
reading the headers into a mapping. The benchmark's http rows are divided by the gRPC floor's
checks/s (loadtests/floor_server.py) and by this one's.

    python -m loadtests.http_floor_server --port 9200
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import Any

import httptools

_OK = (b"HTTP/1.1 200 OK\r\nx-auth-subject: bench-user-0001\r\n"
       b"x-auth-issuer: https://issuer.loadtest.example/\r\nx-auth-plan: bench\r\n"
       b"content-length: 0\r\n\r\n")


class _Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(_OK)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Responder, host, port, backlog=1024)
    print(f"http_floor_server listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bare HTTP/1.1 200 responder (the HTTP floor)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
