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

from ..buckets.base import BucketStore, StoreError
from ..buckets.deny_cache import DenyCache
from ..buckets.memory import MemoryBucketStore
from ..buckets.observed import ObservedStore
from ..config.errors import ConfigError
from ..config.settings import Settings
from ..decision import DecisionMaker
from ..paths import PathClassifier
from ..quota import load_quota
from ..quota.model import Quota
from ..quota.resolve import Resolver
from ..tokens.verifier import Authenticator
from .service import AuthorizationService, Decider, Readiness

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry

log = logging.getLogger(__name__)

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
LIVENESS_SERVICE = "liveness"
# Exit status for "could not start" (bad config, keys or store): distinct from a crash, so a
# supervisor does not restart a worker that will only fail again.
EXIT_STARTUP = 2


class StartupError(Exception):
    """The process cannot serve with this configuration; the message says why."""


def build_store(settings: Settings, telemetry: CheckTelemetry | None = None) -> BucketStore:
    """Redis (or in-memory) store, observed by telemetry, behind the local deny cache."""
    inner: BucketStore
    if settings.store.redis_url:
        from ..buckets.redis import RedisBucketStore

        tracer = telemetry.tracer("authz.buckets.redis") if telemetry is not None else None
        inner = RedisBucketStore(settings.store, tracer=tracer)
        if telemetry is not None:
            inner = ObservedStore(inner, telemetry.observe_store_call)
    else:
        inner = MemoryBucketStore(settings.store)
    return DenyCache(inner)


@dataclass
class Components:
    authenticator: Authenticator
    store: BucketStore
    service: AuthorizationService
    readiness: Readiness
    decider: Decider


def build_components(settings: Settings, quota: Quota, *,
                     static_issuers: Mapping[str, Any] | None = None,
                     store: BucketStore | None = None,
                     telemetry: CheckTelemetry | None = None) -> Components:
    authenticator = Authenticator(settings.auth, static_issuers=dict(static_issuers or {}))
    store = store if store is not None else build_store(settings, telemetry)
    if telemetry is not None:
        telemetry.register_token_cache(lambda: authenticator.cache_hits,
                                       lambda: authenticator.cache_misses,
                                       lambda: authenticator.cache_size)
        telemetry.register_jwks(lambda: {
            (issuer, "error" if result == "failed" else result): n
            for (issuer, result), n in authenticator.jwks_refresh_counts().items()})
    readiness = Readiness()
    decider = Decider(maker=DecisionMaker(settings), paths=PathClassifier(settings.paths),
                      authenticator=authenticator, resolver=Resolver(quota), store=store,
                      readiness=readiness)
    return Components(authenticator, store, AuthorizationService(decider, telemetry), readiness,
                      decider)


class Server:
    """One gRPC server process: Check + health on one port."""

    def __init__(self, settings: Settings, quota: Quota, *,
                 static_issuers: Mapping[str, Any] | None = None,
                 telemetry: CheckTelemetry | None = None, store: BucketStore | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.components = build_components(settings, quota, static_issuers=static_issuers,
                                           store=store, telemetry=telemetry)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self._grpc: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._quota_mtime = _mtime(settings.quota_file)

    async def start(self) -> None:
        s = self.settings.server
        server = grpc.aio.server(options=[
            # Several worker processes share the port (SO_REUSEPORT); the kernel spreads
            # connections across them.
            ("grpc.so_reuseport", 1),
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
            raise StartupError(f"cannot listen on {s.host}:{s.grpc_port}: {e}") from None
        if self.port == 0:
            raise StartupError(f"cannot listen on {s.host}:{s.grpc_port} (address in use?)")
        self._grpc = server
        await server.start()
        # "liveness": the process is up and answering, whatever its keys and store are doing
        # (Kubernetes startup/liveness probes; readiness uses "" or the Authorization service).
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening", extra={"grpc_port": self.port})
        try:
            await self.components.authenticator.start()
        except Exception as e:
            raise StartupError(f"cannot load the issuers' keys: {e}") from None
        try:
            await self.components.store.start()
        except StoreError as e:
            raise StartupError(f"cannot use the bucket store: {e}") from None
        await self._wait_ready()
        if self.settings.quota_file and self.settings.quota_reload_interval > 0:
            self._tasks.append(asyncio.create_task(self._watch_quota()))

    def reload_quota(self) -> bool:
        """Re-read the quota file; on any error keep the current quota. Returns success."""
        path = self.settings.quota_file
        if path is None:
            return False
        self._quota_mtime = _mtime(path)
        try:
            quota = load_quota(path)
        except ConfigError as e:
            log.error("quota reload failed; keeping the current quota: %s", e)
            if self.telemetry is not None:
                self.telemetry.config_reloaded(False)
            return False
        # One assignment: a decision in flight keeps the resolver it started with.
        self.components.decider.resolver = Resolver(quota)
        # Locally cached refusals were computed under the old limits.
        if isinstance(self.components.store, DenyCache):
            self.components.store.clear()
        log.info("quota reloaded", extra={"quota_file": path, "plans": len(quota.plans)})
        if self.telemetry is not None:
            self.telemetry.config_reloaded(True)
        return True

    async def _watch_quota(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.settings.quota_reload_interval)
            if _mtime(self.settings.quota_file) != self._quota_mtime:
                self.reload_quota()

    async def _wait_ready(self) -> None:
        """Checks are answered once the keys are loaded; health turns SERVING once the store
        has connected too.

        With on_jwks_unavailable: retry the keys may come later: until then Checks get 503
        not_ready. A store that is unreachable at start is treated like an outage later on:
        each Check gets the store.on_error answer while it reconnects in the background.
        """
        c = self.components

        def update() -> bool:
            if c.authenticator.ready and not c.readiness.ready:
                c.readiness.ready = True
            return c.readiness.ready and c.store.ready

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
        log.info("serving", extra={"grpc_port": self.port})

    async def stop(self) -> None:
        """Drain and stop (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        s = self.settings.server
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"drain_delay_s": s.drain_delay,
                                    "shutdown_grace_s": s.shutdown_grace})
        await asyncio.sleep(s.drain_delay)
        if self._grpc is not None:
            await self._grpc.stop(grace=s.shutdown_grace)
        for closer in (self.components.store.close, self.components.authenticator.close):
            with contextlib.suppress(Exception):
                await closer()
        log.info("stopped")

    async def stop_quietly(self) -> None:
        """Stop at once, without draining: for a process that never became ready."""
        self._stopping.set()
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
    server = Server(settings, quota, static_issuers=static_issuers, telemetry=telemetry)
    loop.add_signal_handler(signal.SIGHUP, server.reload_quota)
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


def _mtime(path: str | None) -> float | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
