"""`authz demo`: the service, a real Envoy configured as an Istio sidecar, and a model stand-in.

    client (curl) --> Envoy :8080 (RBAC shadow + ext_authz) --gRPC--> authz service (this process)
                         \\--> model stand-in (echoes what reached it)

Everything listens on 127.0.0.1 only. The service runs in this process with the DEVELOPMENT-ONLY
signer (`authz.tokens.devsigner`): its key lives in memory here, so the printed token works only
against this demo. Production configs cannot enable that signer (the loader refuses its issuer).
Ctrl-C stops the service, then Envoy and the stand-in; Envoy also dies with this process if it
is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import sys
from importlib import resources
from typing import Any, TextIO

from ..config.settings import Settings
from ..errors import ConfigError, ProcessError
from .processes import EnvoyProcess, WorkDir, free_port
from .upstream import ModelStandIn

DEMO_MODEL = "demo-model"
OTHER_MODEL = "gpt-huge"
DEMO_SUBJECT = "alice"
# The demo quota's burst (authz/demo/quota.yaml): the 429 loop sends a few more than this.
DEMO_BURST = 5
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def demo_settings(redis_url: str | None, grpc_port: int) -> Settings:
    base = Settings()
    return dataclasses.replace(
        base,
        server=dataclasses.replace(
            base.server,
            host="127.0.0.1",
            grpc_port=grpc_port,
            metrics_port=0,
            workers=1,  # the dev key lives in this process only
            drain_delay=0.0,  # nobody load-balances away from a demo: stop at once
            shutdown_grace=2.0,
        ),
        store=dataclasses.replace(base.store, redis_url=redis_url or ""),
        telemetry=dataclasses.replace(base.telemetry, log_format="text", log_level="WARNING"),
    )


def demo_quota() -> Any:
    from ..config.yaml_reader import parse_yaml
    from ..quota import parse_quota

    name = "<authz/demo/quota.yaml>"
    text = resources.files("authz.demo").joinpath("quota.yaml").read_text("utf-8")
    return parse_quota(parse_yaml(text, name), name)


def instructions(token: str, http_port: int) -> str:
    """The ready-to-paste lines the demo prints once everything is up."""
    url = f"http://127.0.0.1:{http_port}/v1/models/{DEMO_MODEL}:predict"
    other = f"http://127.0.0.1:{http_port}/v1/models/{OTHER_MODEL}:predict"
    loop = " ".join(str(i) for i in range(1, DEMO_BURST + 3))
    auth = '-H "Authorization: Bearer $TOKEN"'
    return f"""
  DEVELOPMENT ONLY: this token is signed by a throwaway key that exists only in this demo
  process (issuer urn:authz:dev). Production configs cannot trust it.

export TOKEN={token}

# 200: allowed; the stand-in echoes what reached it, incl. x-auth-subject set by the service
curl -i {auth} -H 'content-type: application/json' -d '{{"instances": [[1, 2, 3]]}}' {url}

# 401: no token (see WWW-Authenticate)
curl -i {url}

# 403: a model the demo plan does not include
curl -i {auth} {other}

# 429: {DEMO_BURST} at once, then one every 2 s (see Retry-After)
for i in {loop}; do curl -s -o /dev/null -w '%{{http_code}} ' {auth} {url}; done; echo
curl -i {auth} {url}

  Press Ctrl-C to stop.
"""


def run_demo(
    redis_url: str | None = None,
    http_port: int = 8080,
    *,
    grpc_port: int = 0,
    out: TextIO | None = None,
) -> int:
    """Run the demo until Ctrl-C / SIGTERM; returns the exit status.

    redis_url: keep buckets in this Redis (default: the embedded in-memory store).
    http_port: Envoy's listener, where curl goes. grpc_port: the service (0 = any free port).
    """
    stream = out if out is not None else sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    try:
        from ..errors import EnvoyNotFound
        from ..mesh.envoy_binary import find_envoy
        from ..mesh.sidecar import SidecarSpec, write
    except ImportError as exc:
        say(f"authz demo: {exc}. Install the demo's extras: pip install -e '.[demo]'")
        return EXIT_FAILED
    try:
        envoy_bin = find_envoy()
    except EnvoyNotFound as exc:
        say(f"authz demo: {exc}")
        return EXIT_FAILED
    if not _port_free("127.0.0.1", http_port):
        say(f"authz demo: port {http_port} is in use; pick another: authz demo --http-port N")
        return EXIT_FAILED

    grpc_port = grpc_port or free_port()
    try:
        settings = demo_settings(redis_url, grpc_port)
        quota = demo_quota()
    except ConfigError as exc:
        say(f"authz demo: {exc}")
        return EXIT_FAILED
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    work = WorkDir(prefix="authz-demo-")
    upstream: ModelStandIn | None = None
    envoy: EnvoyProcess | None = None
    try:
        # Bound now, served later: Envoy is forked while this process has no other threads.
        upstream = ModelStandIn()
        spec = SidecarSpec(
            listener_port=http_port,
            admin_port=0,
            app_port=upstream.port,
            endpoints=(("127.0.0.1", grpc_port),),
        )
        config = work.path / "envoy.yaml"
        write(spec, config)
        envoy = EnvoyProcess(envoy_bin, config, work.path, die_with_parent=True)
        envoy.start()
        upstream.start()
        say(
            "authz demo: Envoy configured as an Istio sidecar, with this service as its "
            "ext_authz provider\n"
            f"  Envoy            http://127.0.0.1:{envoy.port}   (admin {envoy.admin}; "
            f"config {config})\n"
            f"  authz service    127.0.0.1:{grpc_port} (gRPC; buckets: "
            f"{redis_url or 'in-memory'})\n"
            f"  model stand-in   127.0.0.1:{upstream.port} (echoes what reaches it)"
        )
        return _serve(settings, quota, envoy.port, say)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ProcessError as exc:
        say(f"authz demo: could not start: {exc}")
        return EXIT_FAILED
    finally:
        if envoy is not None:
            envoy.stop()
        if upstream is not None:
            upstream.stop()
        work.cleanup()
        say("authz demo: stopped.")


def _serve(settings: Settings, quota: Any, http_port: int, say: Any) -> int:
    from ..server.app import serve
    from ..tokens.devsigner import DEV_ISSUER, DevelopmentOnlySigner

    signer = DevelopmentOnlySigner()

    def on_serving(server: Any) -> None:
        say(instructions(signer.mint(DEMO_SUBJECT, plan="free"), http_port))

    # serve() handles SIGINT/SIGTERM itself: NOT_SERVING, drain, stop; then we stop the rest.
    status = asyncio.run(
        serve(settings, quota, static_issuers={DEV_ISSUER: signer.jwks}, on_serving=on_serving)
    )
    return int(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.demo.run", description=__doc__)
    parser.add_argument("--redis-url", default=None, help="use this Redis (default: in-memory)")
    parser.add_argument("--http-port", type=int, default=8080, help="Envoy's listener port")
    args = parser.parse_args(argv)
    return run_demo(redis_url=args.redis_url, http_port=args.http_port)


if __name__ == "__main__":
    raise SystemExit(main())
