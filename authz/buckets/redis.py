"""Token buckets in Redis: one EVALSHA per decision, concurrent decisions pipelined together.

Why not a plain redis.asyncio client call per decision: on a 2-vCPU VM a redis.asyncio
EVALSHA costs ~90-140 us of client CPU per decision, this store ~11-14 us with 64 decisions in
flight (of which ~8-10 us is what the in-memory store also spends: argument checks, result
objects, the await) and ~40-55 us one at a time (tests/buckets/measure_client_cpu.py). So:

- `charge()` packs its EVALSHA (RESP bytes, built directly), queues it and schedules one flush
  for the end of the current loop tick; the flush writes up to `max_batch` queued calls in one
  `transport.write`.
- One connection carries everything. Redis answers in order, so replies are matched to calls
  by position (a FIFO of calls in flight), parsed by hiredis in `data_received`.
- A single timer watches the oldest call. If it passes its deadline (`StoreSettings.timeout`
  after `charge()` was called) the connection is aborted: its later replies would belong to
  calls that already failed, so it is never reused. Every call in flight fails with
  StoreError, a background task reconnects (backoff 50 ms .. 1 s), and charges made while the
  store is known to be down fail at once instead of waiting out the timeout.
- The script is loaded when connecting (SCRIPT LOAD). A NOSCRIPT reply (SCRIPT FLUSH, a
  failover to a replica without it) queues one SCRIPT LOAD ahead of the calls retried after
  it, on the same connection, so they run after it; the caller never sees it.

The raw protocol is driven here (hiredis reader on an asyncio transport) rather than through
redis-py's connection: its `send_packed_command` awaits a drain per write, and its
`disconnect` closes the transport gracefully, which waits forever for the send buffer to
drain when Redis is stopped (SIGSTOP) -- exactly the connection that must be aborted.
redis-py still parses the URL (`redis_url.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import hiredis
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, StatusCode

from authz.config.settings import StoreSettings

from ._validate import check_charge
from .base import BucketSpec, BucketState, ChargeResult, StoreError
from .redis_url import RedisAddress, parse_redis_url

SCRIPT = resources.files(__package__).joinpath("token_bucket.lua").read_bytes()
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest().encode()

# Connecting (TCP, TLS, AUTH, SCRIPT LOAD) may take longer than one call's timeout, e.g. a
# TLS handshake across zones. Charges never wait for it longer than their own timeout; this
# only bounds the attempt itself.
DEFAULT_CONNECT_TIMEOUT = 1.0
# Reconnect attempts after a failure: quick at first (a restart or failover takes ~1 s), then
# at most once a second so a dead Redis is not hammered by every replica.
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
# A call answered NOSCRIPT is retried this many times (a retry only follows a fresh SCRIPT
# LOAD, so more than one means something keeps flushing scripts).
_MAX_SCRIPT_RETRIES = 2

# The SDK's global tracer unless the server hands the store its telemetry's (see `tracer`).
_default_tracer = trace.get_tracer(__name__)
_NOT_ENOUGH_DATA: Any = object()


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def _number(value: float) -> bytes:
    # repr() is the shortest string that round-trips; Lua's tonumber reads it ("1.0", "1e-05").
    return _bulk(repr(value).encode())


_SCRIPT_LOAD = _command(b"SCRIPT", b"LOAD", SCRIPT)


log = logging.getLogger(__name__)


@dataclass(slots=True)
class RedisStoreStats:
    """Plain counters telemetry reads (monotonic since start)."""

    calls: int = 0  # charge() calls
    errors: int = 0  # charge() calls that raised StoreError
    batches: int = 0  # pipelined writes
    batched_calls: int = 0  # calls sent in those writes (batched_calls / batches = batch size)
    batch_seconds: float = 0.0  # sum over batches of write -> last reply
    timeouts: int = 0  # connections aborted because a reply was late
    connects: int = 0  # successful connections (the first one included)
    script_loads: int = 0  # SCRIPT LOADs sent after a NOSCRIPT


class _Batch:
    __slots__ = ("failed", "outstanding", "span", "started")

    def __init__(self, span: Span | None, outstanding: int) -> None:
        self.span = span
        self.outstanding = outstanding
        self.started = time.perf_counter()
        self.failed = False


class _Call:
    __slots__ = ("batch", "command", "deadline", "future", "generation", "retries", "trace")

    def __init__(self, command: bytes, future: asyncio.Future[Any] | None,
                 deadline: float) -> None:
        self.command = command
        # None for fire-and-forget internal commands (a SCRIPT LOAD after NOSCRIPT).
        self.future = future
        self.deadline = deadline
        self.batch: _Batch | None = None
        self.generation = 0  # script generation when sent (see _on_reply)
        self.retries = 0
        # The caller's recording span, when tracing: the batch's span links to every other
        # caller (see _flush).
        self.trace: Span | None = None


class _Link(asyncio.Protocol):
    """One connection: a FIFO of calls in flight, replies matched to them in order."""

    def __init__(self, store: RedisBucketStore) -> None:
        self.store = store
        self.inflight: collections.deque[_Call] = collections.deque()
        self.reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH_DATA)
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        inflight = self.inflight
        on_reply = self.store._on_reply
        try:
            while (reply := reader.gets()) is not _NOT_ENOUGH_DATA:
                if self.closed:  # dropped by a reply handled just before (READONLY, ...)
                    return
                if not inflight:
                    raise StoreError("Redis sent a reply nobody asked for")
                on_reply(self, inflight.popleft(), reply)
        except (hiredis.ProtocolError, StoreError) as e:
            self.store._drop(self, StoreError(f"Redis protocol error: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.store._drop(self, StoreError(f"connection to Redis lost{reason}"))

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            # abort, not close: close() waits for the send buffer to drain, which never
            # happens when Redis is stuck.
            self.transport.abort()


class RedisBucketStore:
    """`BucketStore` on Redis. Use from one event loop (the one that called `start()`)."""

    def __init__(self, settings: StoreSettings, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 tracer: trace.Tracer | None = None) -> None:
        self._settings = settings
        # Starts the "redis.charge" span of each write (the server passes Telemetry.tracer:
        # the SDK tracer of its provider, when tracing is on).
        self.tracer = tracer if tracer is not None else _default_tracer
        self._prefix = settings.key_prefix
        self._timeout = settings.timeout
        self._max_batch = max(1, settings.max_batch)
        self._connect_timeout = connect_timeout
        self._address: RedisAddress | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._connecting = False
        self._closed = False
        self._down_reason = "Redis store not started"
        self._pending: collections.deque[_Call] = collections.deque()
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._link_lost: asyncio.Future[None] | None = None
        self._reload_script = False
        self._script_generation = 0
        self._heads: dict[int, bytes] = {}
        self._spec_args: dict[tuple[float, float], bytes] = {}
        self.stats = RedisStoreStats()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, wait: bool = False) -> None:
        """Validate the URL (StoreError if it is unusable) and connect.

        Redis being unreachable at start is not an error: like an outage later on, charges fail
        with StoreError (so `store.on_error` applies), `ready` stays False, and the connection
        is retried in the background. `wait=True` raises instead if the first attempt fails.
        """
        if self._loop is not None:
            return
        self._address = parse_redis_url(self._settings.redis_url)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        try:
            self._link = await self._open()
        except StoreError as e:
            if wait:
                self._loop = None
                raise
            self._down_reason = str(e)
            log.warning("Redis unreachable at start; retrying in the background: %s", e)
        self._maintainer = self._loop.create_task(self._maintain(), name="redis-store-connect")

    async def close(self) -> None:
        self._closed = True
        self._down_reason = "Redis store closed"
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        if self._link is not None:
            self._drop(self._link, StoreError(self._down_reason))
        self._fail_pending(self._down_reason)
        self._loop = None

    @property
    def ready(self) -> bool:
        return self._link is not None and not self._closed

    # -- the hot path ----------------------------------------------------------------------
    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        check_charge(buckets, cost)
        stats = self.stats
        stats.calls += 1
        if not buckets:
            return ChargeResult(True, (), 0.0)
        loop = self._loop
        if loop is None or (self._link is None and not self._connecting):
            # Known to be down (between reconnect attempts): answer now, not after a timeout.
            stats.errors += 1
            raise StoreError(self._down_reason)
        future: asyncio.Future[Any] = loop.create_future()
        call = _Call(self._pack(buckets, cost), future, loop.time() + self._timeout)
        caller = trace.get_current_span()
        if caller.is_recording():
            call.trace = caller
        self._pending.append(call)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        if self._timer is None:
            self._arm_timer()
        try:
            reply = await future
        except StoreError:
            stats.errors += 1
            raise
        try:
            return _result(buckets, reply)
        except StoreError:
            stats.errors += 1
            raise

    def _pack(self, buckets: Sequence[BucketSpec], cost: float) -> bytes:
        n = len(buckets)
        head = self._heads.get(n)
        if head is None:
            # EVALSHA sha numkeys key... cost (capacity rate)...
            head = self._heads[n] = (b"*%d\r\n$7\r\nEVALSHA\r\n" % (4 + 3 * n)
                                     + _bulk(SCRIPT_SHA) + _bulk(b"%d" % n))
        parts = [head]
        prefix = self._prefix
        for spec in buckets:
            parts.append(_bulk((prefix + spec.key).encode()))
        parts.append(_number(cost))
        cache = self._spec_args
        for spec in buckets:
            args = cache.get((spec.capacity, spec.rate))
            if args is None:
                if len(cache) > 1024:  # distinct limits come from config: a handful
                    cache.clear()
                args = cache[(spec.capacity, spec.rate)] = (_number(spec.capacity)
                                                            + _number(spec.rate))
            parts.append(args)
        return b"".join(parts)

    def _flush(self) -> None:
        """Write everything queued during the last loop tick, up to max_batch per write."""
        self._flush_handle = None
        link = self._link
        if link is None:
            return  # the connecting task flushes once connected; the timer expires the rest
        pending = self._pending
        stats = self.stats
        while pending:
            chunk: list[bytes] = []
            calls: list[_Call] = []
            if self._reload_script:
                self._reload_script = False
                self._script_generation += 1
                stats.script_loads += 1
                assert self._loop is not None
                load = _Call(_SCRIPT_LOAD, None, self._loop.time() + self._timeout)
                link.inflight.append(load)
                chunk.append(_SCRIPT_LOAD)
            generation = self._script_generation
            while pending and len(calls) < self._max_batch:
                call = pending.popleft()
                if call.future is not None and call.future.done():
                    continue  # the caller was cancelled while queued
                call.generation = generation
                calls.append(call)
                chunk.append(call.command)
            if not calls:
                if chunk:
                    link.send(chunk[0])
                break
            # One write serves several checks: the span is a child of the check that scheduled
            # the flush (the current context was copied by call_soon) and links to every other
            # check in the batch, so each check's trace leads to the Redis call that answered it.
            # Usually the batch is that one check alone: no links (a Link costs ~2 us).
            parent = trace.get_current_span()
            span: Span | None = None
            traced = [c.trace for c in calls if c.trace is not None]
            # No span when every check in the write is in a trace nobody records (callers that
            # are not sampled, ~99% of a mesh's requests): it could only be their unrecorded
            # child. Outside any check (no parent at all) the write is its own root span.
            if traced or not parent.get_span_context().is_valid:
                links = [Link(t.get_span_context()) for t in traced if t is not parent]
                span = self.tracer.start_span("redis.charge", kind=SpanKind.CLIENT, attributes={
                    "db.system": "redis", "db.operation.name": "EVALSHA",
                    "db.operation.batch.size": len(calls)}, links=links or None)
            batch = _Batch(span, len(calls))
            for call in calls:
                call.batch = batch
            link.inflight.extend(calls)
            stats.batches += 1
            stats.batched_calls += len(calls)
            link.send(b"".join(chunk))
        if self._timer is None:
            self._arm_timer()

    def _on_reply(self, link: _Link, call: _Call, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if (call.batch is not None and message.startswith("NOSCRIPT")
                    and call.retries < _MAX_SCRIPT_RETRIES):
                # Only the first NOSCRIPT of a generation asks for a reload; calls sent before
                # that reload simply go again after it.
                if call.generation == self._script_generation:
                    self._reload_script = True
                call.retries += 1
                self._finish(call, failed=False)
                self._pending.appendleft(call)
                self._schedule_flush()
                return
            if message.startswith(("READONLY", "LOADING", "MASTERDOWN")):
                # Connected to a replica or a Redis still loading: a new connection may reach
                # the new primary (DNS/Sentinel/Service switched over).
                self._drop(link, StoreError(f"Redis answered {message}"))
            self._fail(call, f"Redis answered an error: {message}")
            return
        future = call.future
        if future is not None and not future.done():
            future.set_result(reply)
        self._finish(call, failed=False)

    # -- failures, deadlines ---------------------------------------------------------------
    def _fail(self, call: _Call, message: str) -> None:
        future = call.future
        if future is not None and not future.done():
            future.set_exception(StoreError(message))
        self._finish(call, failed=True)

    def _finish(self, call: _Call, *, failed: bool) -> None:
        batch = call.batch
        if batch is None:
            return
        call.batch = None
        if failed:
            batch.failed = True
        batch.outstanding -= 1
        if batch.outstanding == 0:
            self.stats.batch_seconds += time.perf_counter() - batch.started
            span = batch.span
            if span is not None:
                if batch.failed:
                    span.set_status(StatusCode.ERROR)
                span.end()

    def _drop(self, link: _Link, error: StoreError) -> None:
        """Abandon a connection: its replies can no longer be trusted to match our calls."""
        if link.closed:
            return
        link.abort()
        if self._link is link:
            self._link = None
            self._down_reason = str(error)
            if self._link_lost is not None and not self._link_lost.done():
                self._link_lost.set_result(None)
        message = str(error)
        while link.inflight:
            self._fail(link.inflight.popleft(), message)

    def _fail_pending(self, message: str) -> None:
        while self._pending:
            self._fail(self._pending.popleft(), message)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _arm_timer(self) -> None:
        link = self._link
        deadline: float | None = None
        if self._pending:
            deadline = self._pending[0].deadline
        if link is not None and link.inflight:
            first = link.inflight[0].deadline
            deadline = first if deadline is None else min(deadline, first)
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        link = self._link
        if link is not None and link.inflight and link.inflight[0].deadline <= now:
            self.stats.timeouts += 1
            self._drop(link, StoreError(
                f"Redis did not answer within {self._timeout * 1000:g} ms "
                "(store.timeout); connection dropped"))
        pending = self._pending
        while pending and pending[0].deadline <= now:
            self._fail(pending.popleft(),
                       f"Redis unavailable: not connected within {self._timeout * 1000:g} ms "
                       f"(last error: {self._down_reason})")
        self._arm_timer()

    # -- connecting ------------------------------------------------------------------------
    async def _maintain(self) -> None:
        """Reconnect in the background whenever the connection is lost."""
        assert self._loop is not None
        backoff = _BACKOFF_MIN
        while not self._closed:
            if self._link is not None:
                self._link_lost = self._loop.create_future()
                await self._link_lost
                continue
            self._connecting = True
            try:
                link = await self._open()
            except StoreError as e:
                self._down_reason = str(e)
                self._connecting = False
                self._fail_pending(self._down_reason)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            finally:
                self._connecting = False
            backoff = _BACKOFF_MIN
            self._link = link
            self._schedule_flush()

    async def _open(self) -> _Link:
        address = self._address
        loop = self._loop
        assert address is not None and loop is not None
        link = _Link(self)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if address.path:
                    await loop.create_unix_connection(lambda: link, address.path)
                else:
                    await loop.create_connection(
                        lambda: link, address.host, address.port, ssl=address.tls,
                        server_hostname=address.host if address.tls else None)
                handshake: list[bytes] = []
                if address.password is not None:
                    handshake.append(_command(b"AUTH", address.password.encode())
                                     if address.username is None else
                                     _command(b"AUTH", address.username.encode(),
                                              address.password.encode()))
                if address.db:
                    handshake.append(_command(b"SELECT", b"%d" % address.db))
                handshake.append(_SCRIPT_LOAD)
                futures = [loop.create_future() for _ in handshake]
                deadline = loop.time() + self._connect_timeout
                link.inflight.extend(_Call(c, f, deadline) for c, f in
                                     zip(handshake, futures, strict=True))
                link.send(b"".join(handshake))
                # return_exceptions: every reply is consumed, so a refused AUTH followed by
                # refused SELECT / SCRIPT LOAD leaves no "exception never retrieved" behind.
                replies = await asyncio.gather(*futures, return_exceptions=True)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        except TimeoutError:
            link.abort()
            raise StoreError(f"Redis at {address.display} did not answer within "
                             f"{self._connect_timeout:g} s") from None
        except OSError as e:
            link.abort()
            raise StoreError(f"cannot connect to Redis at {address.display}: {e}") from None
        except StoreError as e:
            link.abort()
            raise StoreError(f"Redis at {address.display} refused the connection "
                             f"setup: {e}") from None
        except BaseException:  # cancelled (close() during a reconnect): no half-open socket
            link.abort()
            raise
        if replies[-1] != SCRIPT_SHA:
            link.abort()
            raise StoreError(f"Redis at {address.display} loaded token_bucket.lua as "
                             f"{replies[-1]!r}, expected {SCRIPT_SHA!r}")
        self.stats.connects += 1
        return link


def _result(buckets: Sequence[BucketSpec], reply: Any) -> ChargeResult:
    """token_bucket.lua's {allowed, retry_after, (remaining, reset_after, retry_after)...}."""
    try:
        states = []
        i = 2
        for spec in buckets:
            states.append(BucketState(spec.name, spec.capacity, float(reply[i]),
                                      float(reply[i + 1]), float(reply[i + 2])))
            i += 3
        return ChargeResult(reply[0] == 1, tuple(states), float(reply[1]))
    except (TypeError, ValueError, IndexError) as e:
        raise StoreError(f"unexpected reply from token_bucket.lua: {reply!r:.200}") from e
