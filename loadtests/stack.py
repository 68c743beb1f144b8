"""Everything a locust run needs, started on loopback: Redis, the service, a model stand-in, Envoy.

    python -m loadtests.stack --world loadtests/results/world          # Ctrl-C stops it all

writes the world (signing key, JWKS, quota) if the directory has none, starts its own
redis-server on a free port (or the in-memory store with --memory), `authz serve` on the world's
config (both edges: gRPC, and HTTP on --check-port), the model stand-in
(authz/demo/upstream.py), and Envoy configured as an Istio sidecar with the service as CUSTOM
ext_authz provider (authz/mesh/sidecar.py; binary located by authz/mesh/envoy_binary.py; the
gRPC provider, or `--provider http`). It prints the gRPC target, the HTTP edge's URL and
Envoy's URL to give locust.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .population import World, write_world
from .procs import Proc, free_port, start_redis

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Stack:
    world: World
    grpc_target: str
    http_url: str | None  # Envoy's listener; None without Envoy
    check_url: str  # the service's HTTP edge (locust_http.py's --host)
    redis_url: str  # empty: in-memory store
    service_pid: int


def _wait_serving(proc: Proc, target: str, timeout: float = START_TIMEOUT) -> None:
    from .bench import wait_ready

    wait_ready(proc, target, b"", health=True, timeout=timeout)


@contextlib.contextmanager
def running_stack(
    world_dir: Path,
    work: Path,
    *,
    memory: bool = False,
    envoy: bool = True,
    workers: int = 1,
    grpc_port: int = 0,
    http_port: int = 0,
    check_port: int = 0,
    provider: str = "grpc",
) -> Iterator[Stack]:
    """Start the stack; stop every process on exit, also on failure."""
    world = World.load(world_dir) if (world_dir / "signing-key.pem").exists() \
        else write_world(world_dir)
    procs: list[Proc] = []
    envoy_proc = None
    upstream = None
    try:
        redis_url = ""
        if not memory:
            redis_proc, redis_port = start_redis(work, None)
            procs.append(redis_proc)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        grpc_port = grpc_port or free_port()
        check_port = check_port or free_port()
        config = world.write_config(work / "config.yaml", grpc_port=grpc_port,
                                    http_port=check_port, redis_url=redis_url)
        service = Proc("authz", [sys.executable, "-m", "authz", "serve", "--config", str(config),
                                 "--workers", str(workers)], work, None).start()
        procs.append(service)
        target = f"127.0.0.1:{grpc_port}"
        _wait_serving(service, target)
        http_url = None
        if envoy:
            from authz.demo.processes import EnvoyProcess
            from authz.demo.upstream import ModelStandIn
            from authz.mesh.envoy_binary import find_envoy
            from authz.mesh.sidecar import HTTP_PATH_PREFIX, SidecarSpec, write

            upstream = ModelStandIn().start()
            port = check_port if provider == "http" else grpc_port
            spec = SidecarSpec(listener_port=http_port, admin_port=0, app_port=upstream.port,
                               service_port=port, endpoints=(("127.0.0.1", port),),
                               protocol=provider,
                               path_prefix=HTTP_PATH_PREFIX if provider == "http" else "",
                               # 1 s, the top of the 200 ms-1 s range we recommend: a loaded
                               # 2-core machine should show slowness, not turn it into 503s.
                               timeout=1.0)
            envoy_config = work / "envoy.yaml"
            write(spec, envoy_config)
            envoy_proc = EnvoyProcess(find_envoy(), envoy_config, work).start()
            http_url = f"http://127.0.0.1:{envoy_proc.port}"
        yield Stack(world, target, http_url, f"http://127.0.0.1:{check_port}", redis_url,
                    service.pid)
    finally:
        if envoy_proc is not None:
            envoy_proc.stop()
        if upstream is not None:
            upstream.stop()
        for p in reversed(procs):
            p.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.stack", description=__doc__)
    ap.add_argument("--world", type=Path, default=Path("loadtests/results/world"))
    ap.add_argument("--memory", action="store_true", help="in-memory store instead of Redis")
    ap.add_argument("--no-envoy", dest="envoy", action="store_false")
    ap.add_argument("--workers", type=int, default=1, help="authz serve --workers")
    ap.add_argument("--grpc-port", type=int, default=9000)
    ap.add_argument("--http-port", type=int, default=15006, help="Envoy's listener port")
    ap.add_argument("--check-port", type=int, default=8000,
                    help="the service's HTTP edge (server.http_port)")
    ap.add_argument("--provider", choices=("grpc", "http"), default="grpc",
                    help="how Envoy asks the service: envoyExtAuthzGrpc or envoyExtAuthzHttp")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="authz-stack-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running_stack(args.world, work, memory=args.memory, envoy=args.envoy,
                       workers=args.workers, grpc_port=args.grpc_port,
                       http_port=args.http_port, check_port=args.check_port,
                       provider=args.provider) as st:
        print(f"world:        {st.world.root}")
        print(f"store:        {st.redis_url or 'in-memory'}")
        print(f"gRPC target:  {st.grpc_target}   (locust -f loadtests/locust_grpc.py "
              f"--world {st.world.root} --grpc-target {st.grpc_target} ...)")
        print(f"HTTP edge:    {st.check_url}   (locust -f loadtests/locust_http.py "
              f"--world {st.world.root} --host {st.check_url} ...)")
        if st.http_url:
            print(f"Envoy ({args.provider} provider): {st.http_url}   (locust -f "
                  f"loadtests/locust_envoy.py "
                  f"--world {st.world.root} --host {st.http_url} ...)")
        print(f"logs:         {work}\nCtrl-C to stop.", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
