"""The `authz` command: serve, check-config, schema, check, quota, demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config.settings import Settings
from .errors import EXIT_STARTUP, AuthzError, ConfigError

log = logging.getLogger("authz")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authz", description=__doc__)
    parser.add_argument("--version", action="version", version=f"authz {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Envoy ext_authz gRPC service")
    serve.add_argument("--config", default=os.environ.get("AUTHZ_CONFIG"),
                       help="config file (default: $AUTHZ_CONFIG, else the embedded defaults)")
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes sharing the port (default: server.workers; "
                            "0 = one per CPU)")
    serve.add_argument("--grpc-port", type=int, default=None, help="override server.grpc_port")
    serve.add_argument("--http-port", type=int, default=None,
                       help="override server.http_port (the HTTP ext_authz edge; 0 disables)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="override server.metrics_port (0 disables)")
    serve.add_argument("--dev", action="store_true",
                       help="DEVELOPMENT ONLY: trust an ephemeral in-memory signing key and "
                            "print tokens signed with it")

    check_config = sub.add_parser("check-config", help="validate a config or quota file")
    check_config.add_argument("file")

    schema = sub.add_parser("schema", help="print the JSON Schema of the config or quota file "
                                           "(for editors), or --write both")
    schema.add_argument("file", nargs="?", choices=("config", "quota"))
    schema.add_argument("--write", metavar="DIR", nargs="?", const="schemas", default=None,
                        help="write authz-config.schema.json and authz-quota.schema.json into "
                             "DIR (default: schemas)")

    check_text = ("send one Check to a running service, as an Envoy sidecar would, and print "
                  "the answer: ALLOW with the headers set for the model server and the client, "
                  "or DENY with its status, headers and body")
    check = sub.add_parser("check", help="send one Check to a running service and print the "
                                         "answer", description=check_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    check.add_argument("--target", default="127.0.0.1:9000",
                       help="the service's gRPC address, HOST:PORT")
    check.add_argument("--token", default=os.environ.get("TOKEN"),
                       help="the bearer token, sent as 'authorization: Bearer TOKEN' "
                            "(default: $TOKEN; none: the request has no token)")
    check.add_argument("--path", default="/v1/models/example:predict",
                       help="the request path, query included")
    check.add_argument("--method", default="POST", help="the request method")
    check.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                       help="one more request header (repeatable)")
    check.add_argument("--body-file", default=None, metavar="FILE",
                       help="send FILE's bytes as the request body (raw_body, as the "
                            "rate-limiter-body provider does), for costs read from the body")
    check.add_argument("--repeat", type=int, default=1,
                       help="send it N times in a row, one status line each")

    quota = sub.add_parser("quota", help="inspect or reset one identity's buckets in Redis")
    quota_sub = quota.add_subparsers(dest="quota_command", required=True)
    for name, text in (("show", "every bucket of an identity: level now (Redis's clock), "
                                "capacity, rate, time to full"),
                       ("reset", "refill an identity's buckets, on every replica within ~1 s")):
        q = quota_sub.add_parser(name, help=text, description=text)
        q.add_argument("--config", default=os.environ.get("AUTHZ_CONFIG"),
                       help="the service's config file (default: $AUTHZ_CONFIG)")
        q.add_argument("--issuer", required=True, help="the token's iss")
        q.add_argument("--subject", required=True, help="the token's sub")
        q.add_argument("--plan", default=None, help="only this plan (default: every plan)")
        q.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE",
                       help="a claim of the caller's token, e.g. org=acme for plans with "
                            "shared limits (repeatable)")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "reset":
            q.add_argument("--shared", action="store_true",
                           help="also refill the buckets shared through --claim (the whole "
                                "organisation's, not only this caller's)")

    demo = sub.add_parser("demo", help="service + a real Envoy + a model stand-in, ready for curl")
    demo.add_argument("--redis-url", default=None, help="use this Redis (default: in-memory)")
    demo.add_argument("--http-port", type=int, default=8080, help="Envoy's listener port")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "schema":
            return _schema(parser, args.file, args.write)
        if args.command == "check":
            return _check(args)
        if args.command == "quota":
            return _quota(args)
        from .demo.run import run_demo

        return int(run_demo(redis_url=args.redis_url, http_port=args.http_port))
    except AuthzError as e:
        # The one place errors raised on purpose become a message and an exit status; anything
        # else is a bug and keeps its traceback.
        prefix = "configuration error: " if isinstance(e, ConfigError) and \
            args.command == "serve" else ""
        for line in str(e).splitlines():
            print(f"authz: {prefix}{line}", file=sys.stderr)
        return 1 if args.command == "check-config" else EXIT_STARTUP


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("authz")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _configure_logging(settings: Settings) -> None:
    from .telemetry import configure_logging

    configure_logging(settings)


def _serve(args: argparse.Namespace) -> int:
    from .service_config import load_service_config

    # SIGHUP ("re-read the quota file") would kill the process by its default action until a
    # handler is in place: held back (pending, not lost) until then, and in every thread this
    # process starts. The server (app.serve) and the supervisor (workers.supervise) let it
    # through once they can act on it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    changes: dict[str, Any] = {}
    if args.grpc_port is not None:
        changes["grpc_port"] = args.grpc_port
    if args.http_port is not None:
        changes["http_port"] = args.http_port
    if args.metrics_port is not None:
        changes["metrics_port"] = args.metrics_port
    if args.workers is not None:
        changes["workers"] = args.workers
    loaded = load_service_config(args.config, env=os.environ, dev=args.dev, server=changes)
    settings, quota = loaded.settings, loaded.quota
    if args.dev:
        # A terminal, not a log pipeline: no warning about the subject-hash salt (a random one
        # is exactly right for a throwaway process) and, on the embedded defaults (`make run`),
        # human-readable lines; a config file's telemetry.log_format is kept.
        settings = dataclasses.replace(settings, telemetry=dataclasses.replace(
            settings.telemetry,
            log_format=settings.telemetry.log_format if args.config else "text",
            subject_salt=settings.telemetry.subject_salt or os.urandom(16).hex()))
    server = settings.server
    _configure_logging(settings)

    workers = server.workers or os.cpu_count() or 1
    if not settings.store.redis_url:
        # In-memory buckets live in one process: N workers would each grant the whole limit
        # (load_service_config refuses workers > 1; 0 = "one per CPU" means one here).
        workers = 1
    if args.dev:
        workers = 1  # the dev key lives in one process's memory; tokens must verify anywhere
        # Development mode trusts a throwaway key: never listen beyond this machine.
        settings = dataclasses.replace(
            settings, server=dataclasses.replace(settings.server, host="127.0.0.1"))
    if workers > 1 and "AUTHZ_WORKER_INDEX" not in os.environ:
        worker_argv = ["serve", "--workers", "1"]
        if args.config:
            worker_argv += ["--config", args.config]
        if args.grpc_port is not None:
            worker_argv += ["--grpc-port", str(args.grpc_port)]
        if args.http_port is not None:
            worker_argv += ["--http-port", str(args.http_port)]
        if args.metrics_port is not None:
            worker_argv += ["--metrics-port", str(args.metrics_port)]
        return _supervise(worker_argv, workers, settings)
    return _run_one(settings, quota, dev=args.dev, quiet=args.dev and not args.config)


def _supervise(worker_argv: list[str], workers: int, settings: Settings) -> int:
    """Run the workers; the supervisor serves their merged metrics on the one metrics port
    (each worker serves its own on loopback, metrics_port + 1 + i)."""
    from .server.workers import reserve_port, supervise
    from .telemetry.aggregate import MetricsAggregator, worker_environment, worker_targets

    server = settings.server
    port, claim = reserve_port(server.host, server.grpc_port)  # StartupError: port taken
    if port != server.grpc_port:  # 0: one free port, the same for every worker
        worker_argv = [*worker_argv, "--grpc-port", str(port)]
    claims = [claim]
    if server.http_port:  # 0: the HTTP edge is off
        claims.append(reserve_port(server.host, server.http_port, "server.http_port")[1])
    aggregator = None
    env_for = None
    if server.metrics_port:
        aggregator = MetricsAggregator(server.host, server.metrics_port,
                                       worker_targets(server.metrics_port, workers))
        try:
            aggregator.start()
        except OSError as e:
            print(f"authz: cannot serve metrics: {e}", file=sys.stderr)
            return EXIT_STARTUP

        def env_for(i: int) -> dict[str, str]:
            return worker_environment(server.metrics_port, i)

    log.info("starting workers", extra={"workers": workers})
    try:
        return supervise(worker_argv, workers, grace_s=server.drain_delay + server.shutdown_grace,
                         env_for=env_for)
    finally:
        if aggregator is not None:
            aggregator.shutdown()
        for held in claims:
            if held is not None:
                held.close()


def _run_one(settings: Settings, quota: Any, *, dev: bool, quiet: bool = False) -> int:
    """`quiet`: `serve --dev` on the embedded defaults (`make run`): the banner says what
    matters, the effective configuration is a DEBUG line."""
    from .server.app import serve

    static_issuers: dict[str, Any] = {}
    on_serving = None
    if dev:
        from .tokens.devsigner import DEV_ISSUER, DevelopmentOnlySigner

        signer = DevelopmentOnlySigner()
        static_issuers[DEV_ISSUER] = signer.jwks

        def on_serving(server: Any) -> None:
            _print_dev_banner(signer, server.port)

    from .telemetry import Telemetry, TelemetryConfigError, log_effective_config

    try:
        telemetry = Telemetry.from_settings(settings)
        log_effective_config(settings, telemetry,
                             level=logging.DEBUG if quiet else logging.INFO)
        telemetry.start()
    except (TelemetryConfigError, OSError) as e:
        print(f"authz: telemetry: {e}", file=sys.stderr)
        return EXIT_STARTUP
    try:
        runner: Any = asyncio.run
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            pass
        return int(runner(serve(settings, quota, static_issuers=static_issuers,
                                telemetry=telemetry, on_serving=on_serving)))
    finally:
        telemetry.shutdown()


def _print_dev_banner(signer: Any, port: int) -> None:
    # The command as the user can type it (e.g. .venv/bin/authz when not activated).
    me = sys.argv[0] if os.path.basename(sys.argv[0]) == "authz" else "authz"
    if os.path.isabs(me):
        me = os.path.relpath(me) if me.startswith(os.getcwd()) else me
    alice = signer.mint("alice", plan="free")
    bob = signer.mint("bob", plan="pro")
    target = f"127.0.0.1:{port}"
    print(
        "\n"
        "  DEVELOPMENT MODE: these tokens are signed by an ephemeral key that exists only in\n"
        "  this process. Never use --dev in production.\n\n"
        f"  Check service listening on {target}. In another terminal:\n\n"
        f"    export ALICE={alice}   # plan free\n"
        f"    export BOB={bob}   # plan pro\n\n"
        f"    {me} check --target {target} --token \"$ALICE\"              # 200\n"
        f"    {me} check --target {target}                               # 401\n"
        f"    {me} check --target {target} --token \"$ALICE\" --repeat 15  # 429 after the burst\n"
        f"    {me} check --target {target} --token \"$BOB\" --repeat 15    # pro: all 200\n",
        file=sys.stderr, flush=True,
    )


def _check_config(file: str) -> int:
    """Validate a config file exactly as `serve` does (same function, same environment), or a
    quota file by itself. Prints every problem, one per line."""
    from .config.yaml_reader import load_yaml
    from .quota import parse_quota
    from .quota.model import BUILTIN_PLANS
    from .service_config import load_service_config

    data = load_yaml(file)
    quota_keys = {"plans", "plan_claim", "default_plan", "overrides"}
    if isinstance(data, dict) and quota_keys & set(data):
        quota = parse_quota(data, file)
        print(f"{file}: OK (quota: {_plan_count(quota, BUILTIN_PLANS)}, "
              f"{len(quota.overrides)} overrides, default plan {quota.default_plan!r})")
        return 0
    loaded = load_service_config(file, env=os.environ)
    settings, quota = loaded.settings, loaded.quota
    store = "redis" if settings.store.redis_url else "in-memory"
    print(f"{file}: OK (config: {len(settings.auth.issuers)} issuers, store {store}, "
          f"quota {settings.quota_file or '<embedded default>'}: "
          f"{_plan_count(quota, BUILTIN_PLANS)})")
    return 0


def _schema(parser: argparse.ArgumentParser, file: str | None, write: str | None) -> int:
    """The schemas are recorded from the loaders themselves (authz/config/schema.py)."""
    from pathlib import Path

    from .config.schema import CONFIG_FILE, QUOTA_FILE, config_schema, dumps
    from .quota.schema import quota_schema

    if (file is None) == (write is None):
        parser.error("schema: name one file (config or quota) to print, or --write DIR")
    if file is not None:
        print(dumps(config_schema() if file == "config" else quota_schema()), end="")
        return 0
    assert write is not None
    out = Path(write)
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in ((CONFIG_FILE, config_schema()), (QUOTA_FILE, quota_schema())):
        (out / name).write_text(dumps(schema), encoding="utf-8")
        print(out / name)
    return 0


def _plan_count(quota: Any, builtin: tuple[str, ...]) -> str:
    defined = len([p for p in quota.plans if p not in builtin])
    return f"{defined} plan{'s' if defined != 1 else ''} (+ built-in {', '.join(builtin)})"


def _quota(args: argparse.Namespace) -> int:
    import json

    from .buckets.redis import RedisBucketStore
    from .quota_tool import Selection, parse_claims, render_reset, render_show, reset, show
    from .service_config import load_service_config

    loaded = load_service_config(args.config, env=os.environ)
    settings, quota = loaded.settings, loaded.quota
    s = settings.store
    if not s.redis_url:
        raise ConfigError(args.config or "<defaults>", "store.redis_url",
                          "is empty: the in-memory store lives inside the serving process, "
                          "where no other process can read or reset it")
    sel = Selection(args.issuer, args.subject, args.plan, parse_claims(args.claim))

    async def run() -> dict[str, Any]:
        store = RedisBucketStore(
            s.redis_url, key_prefix=s.key_prefix, timeout=max(s.timeout, 1.0),
            mode=s.redis_mode, nodes=s.redis_nodes, sentinel_master=s.sentinel_master or None,
            sentinel_username=s.sentinel_username or None,
            sentinel_password=s.sentinel_password or None)
        await store.start(wait=True)
        try:
            if args.quota_command == "show":
                return await show(store, quota, sel)
            return await reset(store, quota, sel, shared=args.shared)
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except KeyError as e:  # an unknown --plan
        print(f"authz: {e.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_show(report) if args.quota_command == "show" else render_reset(report))
    return 0


def _check(args: argparse.Namespace) -> int:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    headers = {":path": args.path, ":method": args.method, ":authority": "models.local"}
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    for item in args.header:
        name, _, value = item.partition("=")
        headers[name.lower()] = value
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.path, http.method, http.host = args.path, args.method, "models.local"
    if args.body_file:
        try:
            http.raw_body = Path(args.body_file).read_bytes()
        except OSError as e:
            print(f"authz: --body-file: cannot read {args.body_file}: {e.strerror}",
                  file=sys.stderr)
            return 2
        headers["content-length"] = str(len(http.raw_body))
        headers["x-envoy-auth-partial-body"] = "false"
    http.headers.update(headers)
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.AuthorizationStub(channel)
        for i in range(max(1, args.repeat)):
            try:
                resp = stub.Check(req, timeout=5)
            except grpc.RpcError as e:
                print(f"authz: Check failed: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            if args.repeat > 1:
                _print_short(i + 1, resp)
    if args.repeat > 1:
        return 0
    if resp.status.code == 0:
        print("ALLOW 200")
        for h in resp.ok_response.headers:
            print(f"  upstream  {h.header.key}: {h.header.value}")
        for h in resp.ok_response.response_headers_to_add:
            print(f"  client    {h.header.key}: {h.header.value}")
        return 0
    d = resp.denied_response
    print(f"DENY {d.status.code}")
    for h in d.headers:
        print(f"  client    {h.header.key}: {h.header.value}")
    print(f"  body      {d.body}")
    return 0


def _print_short(n: int, resp: Any) -> None:
    if resp.status.code == 0:
        headers = {h.header.key: h.header.value for h in resp.ok_response.response_headers_to_add}
        print(f"{n:3d} ALLOW 200  remaining={headers.get('ratelimit-remaining', '-')}")
    else:
        d = resp.denied_response
        headers = {h.header.key: h.header.value for h in d.headers}
        extra = f"  retry-after={headers['retry-after']}" if "retry-after" in headers else ""
        print(f"{n:3d} DENY {d.status.code}{extra}  {d.body}")
