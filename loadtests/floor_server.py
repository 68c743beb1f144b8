"""The floor: a grpc.aio Authorization/Check server that does nothing but answer OK.

It parses the CheckRequest (grpcio does that before the handler runs) and returns one prebuilt
CheckResponse, on uvloop, exactly like the service's own server setup minus the decision. Its
checks/s on one core is the most any Python gRPC ext_authz server can do on this machine; the
benchmark divides the service's figure by it (hot-path-measurements: ~3,500/s per core).

    python -m loadtests.floor_server --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
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


class SuspendingFloorAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """The floor for a handler that waits for I/O: it suspends once on a future that the loop
    resolves on its next iteration, as a store's reply would, and does nothing else."""

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future
        return _OK


async def serve(host: str, port: int, suspend: bool = False) -> None:
    server = grpc.aio.server()
    servicer = SuspendingFloorAuthorization() if suspend else FloorAuthorization()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"floor_server: cannot bind {host}:{port}")
    await server.start()
    print(f"floor_server listening on {host}:{bound}", flush=True)
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
    ap.add_argument("--suspend", action="store_true",
                    help="await one loop iteration per check (the floor for I/O-bound handlers)")
    args = ap.parse_args(argv)
    if args.no_uvloop:
        asyncio.run(serve(args.host, args.port, args.suspend))
    else:
        import uvloop

        uvloop.run(serve(args.host, args.port, args.suspend))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
