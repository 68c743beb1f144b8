"""Wiring and lifecycle of one server process.

Start: bind the port (health NOT_SERVING), load keys, connect the store, then SERVING.
Stop (SIGTERM / SIGINT): health NOT_SERVING at once; keep answering for `drain_delay` so
readiness probes and Envoy's outlier detection move traffic away; then stop accepting, let
in-flight checks finish within `shutdown_grace`, and exit 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from ..buckets.deny_cache import DenyCache
from ..buckets.memory import MemoryBucketStore
from ..buckets.metered import MeteredStore
from ..buckets.redis import RedisBucketStore
from ..buckets.resets import ResetFeed
from ..buckets.store import BucketStore
from ..config.settings import Settings
from ..config.yaml_reader import MAX_FILE_BYTES, decode_text, parse_yaml, read_text
from ..decision import Answers
from ..errors import EXIT_STARTUP, ConfigError, StartupError, StoreError
from ..paths import PathClassifier
from ..pipeline import CheckPipeline
from ..quota import parse_quota
from ..quota.model import Quota
from ..quota.resolve import Resolver
from ..tokens.verifier import Authenticator
from .http_edge import HttpEdge, HttpLimits
from .service import AuthorizationService

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry

log = logging.getLogger(__name__)

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
LIVENESS_SERVICE = "liveness"


def build_store(settings: Settings, telemetry: CheckTelemetry | None = None) -> BucketStore:
    """Redis (or in-memory) store, observed by telemetry, behind the local deny cache."""
    inner: BucketStore
    if settings.store.redis_url:
        tracer = telemetry.tracer("authz.buckets.redis") if telemetry is not None else None
        s = settings.store
        inner = RedisBucketStore(
            s.redis_url, key_prefix=s.key_prefix, timeout=s.timeout, max_batch=s.max_batch,
            tracer=tracer, mode=s.redis_mode, nodes=s.redis_nodes,
            sentinel_master=s.sentinel_master or None,
            sentinel_username=s.sentinel_username or None,
            sentinel_password=s.sentinel_password or None, replica_acks=s.replica_acks)
        if telemetry is not None:
            inner = MeteredStore(inner, telemetry.observe_store_call)
    else:
        inner = MemoryBucketStore(settings.store.key_prefix)
    return DenyCache(inner)


@dataclass
class Components:
    authenticator: Authenticator
    store: BucketStore
    pipeline: CheckPipeline
    service: AuthorizationService
    # The HTTP edge over the same pipeline (listening only when server.http_port is set).
    http: HttpEdge


def retained_claims(quota: Quota) -> frozenset[str]:
    """The verified claims the decision reads: cached identities keep only these (the plan
    claim, and the claims shared limits are scoped by)."""
    return quota.claims_used


def build_components(settings: Settings, quota: Quota, *,
                     static_issuers: Mapping[str, Any] | None = None,
                     store: BucketStore | None = None,
                     telemetry: CheckTelemetry | None = None,
                     http_limits: HttpLimits | None = None) -> Components:
    authenticator = Authenticator(settings.auth, static_issuers=dict(static_issuers or {}))
    authenticator.retained_claims = retained_claims(quota)
    store = store if store is not None else build_store(settings, telemetry)
    if telemetry is not None:
        telemetry.register_token_cache(lambda: authenticator.cache_hits,
                                       lambda: authenticator.cache_misses,
                                       lambda: authenticator.cache_size)
        telemetry.register_jwks(lambda: {
            (issuer, "error" if result == "failed" else result): n
            for (issuer, result), n in authenticator.jwks_refresh_counts().items()})
    pipeline = CheckPipeline(answers=Answers(settings), paths=PathClassifier(settings.paths),
                             authenticator=authenticator, resolver=Resolver(quota), store=store)
    http = HttpEdge(pipeline, telemetry, path_prefix=settings.server.http_path_prefix,
                    limits=http_limits)
    return Components(authenticator, store, pipeline, AuthorizationService(pipeline, telemetry),
                      http)


class Server:
    """One server process: gRPC Check + health on one port, the HTTP edge (if configured) on
    another; both decide with the same pipeline and stores, and drain together."""

    def __init__(self, settings: Settings, quota: Quota, *,
                 static_issuers: Mapping[str, Any] | None = None,
                 telemetry: CheckTelemetry | None = None, store: BucketStore | None = None,
                 share_port: bool = False, http_limits: HttpLimits | None = None) -> None:
        """`share_port`: bind with SO_REUSEPORT, for the workers of one `--workers N`
        supervisor (which makes sure nobody else holds the port). Otherwise the port is bound
        exclusively: a second server on it fails to start instead of silently taking half of
        the connections."""
        self.settings = settings
        self.share_port = share_port
        self.telemetry = telemetry
        self.components = build_components(settings, quota, static_issuers=static_issuers,
                                           store=store, telemetry=telemetry,
                                           http_limits=http_limits)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.http_port = 0  # 0: the HTTP edge is off
        self._grpc: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[bool]] = set()
        self._reload_lock = asyncio.Lock()
        # sha256 of the quota file's bytes as last read: a change is any change of content,
        # whatever its mtime says (cp -p, rsync -a and some ConfigMap tools keep the mtime).
        self._quota_digest: bytes | None = None
        self.reset_feed: ResetFeed | None = None

    async def start(self) -> None:
        s = self.settings.server
        server = grpc.aio.server(options=[
            # Workers of one supervisor share the port (SO_REUSEPORT; the kernel spreads
            # connections across them). A lone server binds it exclusively: gRPC's default
            # SO_REUSEPORT would let a second `authz serve` quietly take half the connections.
            ("grpc.so_reuseport", 1 if self.share_port else 0),
            # Envoy keeps long-lived HTTP/2 connections to us; answer its keepalive pings.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        pb_grpc.add_AuthorizationServicer_to_server(self.components.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {s.host}:{s.grpc_port} (server.grpc_port "
                               f"{s.grpc_port}): {e}; is another process using the port?"
                               ) from None
        if self.port == 0:
            raise StartupError(f"cannot listen on {s.host}:{s.grpc_port} (server.grpc_port "
                               f"{s.grpc_port}): the address is in use by another process")
        self._grpc = server
        if s.http_port:
            try:
                self.http_port = await self.components.http.start(
                    s.host, s.http_port, reuse_port=self.share_port)
            except OSError as e:
                await server.stop(grace=None)
                raise StartupError(f"cannot listen on {s.host}:{s.http_port} (server.http_port "
                                   f"{s.http_port}): {e.strerror or e}; is another process "
                                   "using the port?") from None
        await server.start()
        # "liveness": the process is up and answering, whatever its keys and store are doing
        # (Kubernetes startup/liveness probes; readiness uses "" or the Authorization service).
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening", extra={"grpc_port": self.port, "http_port": self.http_port})
        try:
            await self.components.authenticator.start()
        except Exception as e:
            raise StartupError(f"cannot load the issuers' keys: {e}") from None
        try:
            await self.components.store.start()
        except StoreError as e:
            raise StartupError(f"cannot use the bucket store: {e}") from None
        await self._wait_ready()
        if self.settings.quota_file:
            self._quota_digest = await asyncio.to_thread(_digest, self.settings.quota_file)
        if self.settings.quota_file and self.settings.quota_reload_interval > 0:
            self._tasks.append(asyncio.create_task(self._watch_quota()))
        store = self.components.store
        redis = _redis_store(store)
        if redis is not None and isinstance(store, DenyCache):
            # `authz quota reset` on any replica clears this replica's local refusals too.
            self.reset_feed = ResetFeed(redis, store.forget, store.clear)
            self._tasks.append(asyncio.create_task(self.reset_feed.run(), name="bucket-resets"))

    def request_reload(self) -> None:
        """SIGHUP: re-read the quota file in the background (never on the signal's stack)."""
        task = asyncio.get_running_loop().create_task(self.reload_quota(),
                                                      name="quota-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload_quota(self) -> bool:
        """Re-read the quota file; on any error keep the current quota. Returns success.

        Reading, parsing and validating run in a worker thread: a large or pathological file
        (up to the reader's 1 MiB bound) must not stall the decisions in flight. Every failure,
        whatever it is, is logged once, counted and leaves the current quota in place."""
        path = self.settings.quota_file
        if path is None:
            return False
        async with self._reload_lock:
            try:
                data = await asyncio.to_thread(_read_raw, path)
                # Remembered even when the file is refused: the same bad content is reported
                # once, not at every poll.
                self._quota_digest = hashlib.sha256(data).digest() if data is not None else None
                quota = await asyncio.to_thread(_parse_quota, data, path)
            except ConfigError as e:
                log.error("quota reload failed; keeping the current quota: %s", e)
                self._reload_done(False)
                return False
            except Exception as e:  # a bug: never let it take the watcher or the loop down
                log.error("quota reload failed; keeping the current quota: %s: %s",
                          type(e).__name__, e, exc_info=e)
                self._reload_done(False)
                return False
            # One assignment: a decision in flight keeps the resolver it started with. In the same
            # step (no await between), the token cache keeps what the new quota reads (a new
            # plan_claim empties it).
            self.components.pipeline.resolver = Resolver(quota)
            self.components.authenticator.retained_claims = retained_claims(quota)
            # Locally cached refusals were computed under the old limits.
            if isinstance(self.components.store, DenyCache):
                self.components.store.clear()
            log.info("quota reloaded", extra={"quota_file": path, "plans": len(quota.plans)})
            self._reload_done(True)
            return True

    def _reload_done(self, ok: bool) -> None:
        if self.telemetry is not None:
            try:
                self.telemetry.config_reloaded(ok)
            except Exception:
                log.exception("counting the quota reload failed")

    async def _watch_quota(self) -> None:
        path = self.settings.quota_file
        assert path is not None
        while not self._stopping.is_set():
            await asyncio.sleep(self.settings.quota_reload_interval)
            try:
                digest = await asyncio.to_thread(_digest, path)
                if digest != self._quota_digest:
                    await self.reload_quota()
            except Exception:  # the watcher outlives anything one round can throw
                log.exception("quota file watcher: checking %s failed", path)

    async def _wait_ready(self) -> None:
        """Checks are answered once the keys are loaded; health turns SERVING once the store
        has connected too.

        With on_jwks_unavailable: retry the keys may come later: until then Checks get 503
        not_ready. A store that is unreachable at start is treated like an outage later on:
        each Check gets the store.on_error answer while it reconnects in the background.
        """
        c = self.components

        def update() -> bool:
            if c.authenticator.ready and not c.pipeline.ready:
                c.pipeline.ready = True
            return c.pipeline.ready and c.store.ready

        async def watch() -> None:
            while not self._stopping.is_set():
                if update():
                    await self._serving()
                    return
                await asyncio.sleep(0.2)

        if update():
            await self._serving()
        else:
            log.warning("not ready yet; health is NOT_SERVING",
                        extra={"keys_loaded": c.authenticator.ready,
                               "store_connected": c.store.ready})
            self._tasks.append(asyncio.create_task(watch()))

    async def _serving(self) -> None:
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"grpc_port": self.port, "http_port": self.http_port})

    async def stop(self) -> None:
        """Drain and stop (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for task in (*self._tasks, *self._reloads):
            task.cancel()
        s = self.settings.server
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"drain_delay_s": s.drain_delay,
                                    "shutdown_grace_s": s.shutdown_grace})
        await asyncio.sleep(s.drain_delay)
        # Both edges stop accepting and finish what is in flight, together.
        stops = [self.components.http.stop(s.shutdown_grace)] if self.http_port else []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace=s.shutdown_grace))
        await asyncio.gather(*stops)
        for closer in (self.components.store.close, self.components.authenticator.close):
            with contextlib.suppress(Exception):
                await closer()
        log.info("stopped")

    async def stop_quietly(self) -> None:
        """Stop at once, without draining: for a process that never became ready."""
        self._stopping.set()
        if self.http_port:
            await self.components.http.stop(0)
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
        for closer in (self.components.store.close, self.components.authenticator.close):
            with contextlib.suppress(Exception):
                await closer()


async def serve(settings: Settings, quota: Quota, *,
                static_issuers: Mapping[str, Any] | None = None,
                telemetry: CheckTelemetry | None = None,
                on_serving: Callable[[Server], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting at once")
            os._exit(128 + signum)
        log.info("signal received: shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    server = Server(settings, quota, static_issuers=static_issuers, telemetry=telemetry,
                    share_port="AUTHZ_WORKER_INDEX" in os.environ)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    if "AUTHZ_WORKER_INDEX" in os.environ:
        server._tasks.append(asyncio.create_task(_exit_when_orphaned(stop)))
    try:
        start = asyncio.create_task(server.start())
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()  # raises StartupError
            # Everything loaded so far (modules, config, keys: tens of thousands of objects)
            # lives as long as the process. Freezing it keeps the collector from walking it
            # again on every full collection: the per-check garbage is all it has to scan.
            gc.collect()
            gc.freeze()
            # SIGHUP was held back while starting (cli._serve; a worker starts with it
            # blocked): a re-read asked for meanwhile happens now, with everything in place.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            if on_serving is not None:
                on_serving(server)
            await stop_wait
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await start
    except StartupError as e:
        log.error("startup failed: %s", e)
        await server.stop_quietly()
        return EXIT_STARTUP
    await server.stop()
    return 0


async def _exit_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL, which it cannot forward) drains and
    exits instead of serving on, unsupervised, forever."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            log.warning("supervisor gone: shutting down")
            stop.set()
            return


def _redis_store(store: object) -> RedisBucketStore | None:
    """The Redis store under the wrappers (deny cache, metering), if that is the store."""
    while store is not None and not isinstance(store, RedisBucketStore):
        store = getattr(store, "inner", None)
    return store


def _read_raw(path: str) -> bytes | None:
    """The file's bytes (at most MAX_FILE_BYTES + 1), None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None


def _parse_quota(data: bytes | None, path: str) -> Quota:
    text = read_text(path) if data is None else decode_text(data, path)  # None: says why
    return parse_quota(parse_yaml(text, path), path)


def _digest(path: str) -> bytes | None:
    """sha256 of the file's content, None when it cannot be read."""
    data = _read_raw(path)
    return hashlib.sha256(data).digest() if data is not None else None
