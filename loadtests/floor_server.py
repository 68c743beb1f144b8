"""The floor: a grpc.aio Authorization/Check server that does nothing but answer OK.

It parses the CheckRequest (grpcio does that before the handler runs) and returns one prebuilt
CheckResponse, on uvloop, exactly like the service's own server setup minus the decision. Its
checks/s on one core is the most any Python gRPC ext_authz server can do on this machine; the
benchmark divides the service's figure by it (~3,200/s per core here: loadtests/README.md).

    python -m loadtests.floor_server --port 9100
    python -m loadtests.floor_server --port 9101 --redis-port 6380   # the I/O floor

With --redis-port it awaits one Redis PING per check first: the floor for any decision that
needs a store round trip (what one loopback round trip costs on this stack, CPU and latency).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
from collections.abc import Sequence

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

# Built once: code 0 (OK) with no headers.
_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


class FloorAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return _OK


class _RedisPing(asyncio.Protocol):
    """One raw connection; PINGs answered in order (Redis replies in order)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n")) >= 0:
            self.buffer = self.buffer[end + 2 :]
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(None)

    async def ping(self) -> None:
        assert self.transport is not None
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(b"*1\r\n$4\r\nPING\r\n")
        await future


class IoFloorAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """The floor for a decision that needs one store round trip: a Redis PING, then the
    prebuilt OK. What remains between this and the service is the decision itself."""

    def __init__(self, redis: _RedisPing) -> None:
        self.redis = redis

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        await self.redis.ping()
        return _OK


async def serve(host: str, port: int, redis_port: int | None = None) -> None:
    server = grpc.aio.server()
    servicer: external_auth_pb2_grpc.AuthorizationServicer = FloorAuthorization()
    if redis_port is not None:
        _, protocol = await asyncio.get_running_loop().create_connection(
            _RedisPing, "127.0.0.1", redis_port)
        servicer = IoFloorAuthorization(protocol)
    await serve_until_signal(server, servicer, "floor_server", host, port)


async def serve_until_signal(server: grpc.aio.Server,
                             servicer: external_auth_pb2_grpc.AuthorizationServicer,
                             name: str, host: str, port: int) -> None:
    """Serve Check on host:port until SIGTERM or SIGINT (the benchmark's comparison servers)."""
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{name}: cannot bind {host}:{port}")
    await server.start()
    print(f"{name} listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="no-op ext_authz Check server (the benchmark floor)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    ap.add_argument("--redis-port", type=int, default=None,
                    help="the I/O floor: one PING to this loopback Redis per check")
    args = ap.parse_args(argv)
    if args.no_uvloop:
        asyncio.run(serve(args.host, args.port, args.redis_port))
    else:
        import uvloop

        uvloop.run(serve(args.host, args.port, args.redis_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
