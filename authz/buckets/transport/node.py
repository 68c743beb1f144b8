"""One Redis node: a pipelined connection, the calls in flight on it, their deadlines, and the
connection's lifecycle.

- `submit()` queues a command and schedules one flush for the end of the current loop tick;
  the flush writes up to `max_batch` queued calls in one `transport.write` (concurrent
  decisions share a write: ~10x less client CPU than a call each).
- Redis answers in order, so replies are matched to calls by position (a FIFO of calls in
  flight), parsed by hiredis in `data_received`.
- A single timer watches the oldest call. If it passes its deadline the connection is aborted:
  its later replies would belong to calls that already failed, so it is never reused. Every
  call in flight fails (StoreTimeout), a background task reconnects, and calls made while the
  node is known to be down fail at once (StoreUnavailable) instead of waiting out the timeout.
- Reconnecting: the first attempt at once, then every 50 ms doubling to at most 250 ms. So once
  Redis answers again, a decision succeeds within 250 ms plus one connection set-up, whenever
  in the backoff it came back: recovery stays under a second by design.
- Scripts are loaded when connecting (SCRIPT LOAD). A NOSCRIPT reply (SCRIPT FLUSH, a failover
  to a replica that never saw the script) queues one SCRIPT LOAD ahead of the calls retried
  after it, on the same connection, so they run after it; the caller never sees it.
- READONLY, LOADING and MASTERDOWN replies mean this is not (or no longer) a usable master: the
  connection is dropped and the owner told (`on_lost`), so Sentinel can look for the new one.
  With `expect_master`, the connection set-up asks ROLE and refuses a replica: writes never go
  to a replica.
- Other error replies (MOVED, ASK, TRYAGAIN, script errors ...) are the caller's: the future
  gets the `ReplyError` value, the topology layer decides.

The raw protocol is driven here rather than through redis-py's connection: its
`send_packed_command` awaits a drain per write, and its `disconnect` closes the transport
gracefully, which waits forever for the send buffer to drain when Redis is stopped (SIGSTOP)
-- exactly the connection that must be aborted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, StatusCode

from ...config.redis_url import RedisAddress
from ...errors import StoreError, StoreProtocolError, StoreTimeout, StoreUnavailable
from . import resp

# Connecting (TCP, TLS, AUTH, SCRIPT LOAD) may take longer than one call's timeout, e.g. a
# TLS handshake across zones. Calls never wait for it longer than their own deadline; this
# only bounds the attempt itself.
DEFAULT_CONNECT_TIMEOUT = 1.0
# Reconnect attempts: at once, then 50 ms doubling to 250 ms (see the module docstring).
BACKOFF_MIN = 0.05
BACKOFF_MAX = 0.25
# A call answered NOSCRIPT is retried this many times (a retry only follows a fresh SCRIPT
# LOAD, so more than one means something keeps flushing scripts).
_MAX_SCRIPT_RETRIES = 2
_NOT_MASTER = ("READONLY", "LOADING", "MASTERDOWN")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RedisStoreStats:
    """Plain counters telemetry and the benchmark read (monotonic since start), shared by the
    nodes of one store."""

    calls: int = 0  # charge() calls
    errors: int = 0  # charge() calls that raised StoreError
    batches: int = 0  # pipelined writes
    batched_calls: int = 0  # calls sent in those writes (batched_calls / batches = batch size)
    batch_seconds: float = 0.0  # sum over batches of write -> last reply
    timeouts: int = 0  # connections aborted because a reply was late
    connects: int = 0  # successful connections (the first one included)
    script_loads: int = 0  # SCRIPT LOADs sent after a NOSCRIPT
    redirects: int = 0  # MOVED / ASK replies followed (cluster)
    topology_refreshes: int = 0  # slot map or master lookups (cluster, sentinel)


class _Batch:
    __slots__ = ("barrier", "failed", "outstanding", "span", "started")

    def __init__(self, span: Span | None, outstanding: int) -> None:
        self.span = span
        self.outstanding = outstanding
        self.started = time.perf_counter()
        self.failed = False
        # With replica_acks: the WAIT that closes the write; replies are held until it answers.
        self.barrier: Call | None = None


class Call:
    __slots__ = ("asking", "batch", "command", "deadline", "future", "generation", "held",
                 "retries", "trace")

    def __init__(self, command: bytes, future: asyncio.Future[Any] | None,
                 deadline: float) -> None:
        self.command = command
        # None for fire-and-forget internal commands (a SCRIPT LOAD after NOSCRIPT, ASKING).
        self.future = future
        self.deadline = deadline
        self.batch: _Batch | None = None
        self.generation = 0  # script generation when sent (see _on_reply)
        self.retries = 0
        self.asking = False  # cluster: send ASKING first, on this same connection
        # A WAIT barrier: the replies of its write, answered once replicas acknowledged it.
        self.held: list[tuple[Call, Any]] | None = None
        # The caller's recording span, when tracing: the write's span links to every other
        # caller of the write (see _flush).
        self.trace: Span | None = None


class _Link(asyncio.Protocol):
    """One connection: a FIFO of calls in flight, replies matched to them in order."""

    def __init__(self, node: NodeClient) -> None:
        self.node = node
        self.inflight: collections.deque[Call] = collections.deque()
        self.reader = resp.reader()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        inflight = self.inflight
        on_reply = self.node._on_reply
        try:
            while (reply := reader.gets()) is not resp.NOT_ENOUGH_DATA:
                if self.closed:  # dropped by a reply handled just before (READONLY, ...)
                    return
                if not inflight:
                    raise StoreProtocolError("Redis sent a reply nobody asked for")
                on_reply(self, inflight.popleft(), reply)
        except (hiredis.ProtocolError, StoreError) as e:
            self.node._drop(self, StoreProtocolError(f"Redis protocol error: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.node._drop(self, StoreUnavailable(f"connection to Redis lost{reason}"))

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            # abort, not close: close() waits for the send buffer to drain, which never
            # happens when Redis is stuck.
            self.transport.abort()


_ASKING = resp.command(b"ASKING")
_ROLE = resp.command(b"ROLE")
# How often a master's replicas are counted (replica_acks): a replica that drops out is noticed
# within a second, and its absence then costs nothing but the WAIT it no longer gets.
ROLE_INTERVAL = 1.0
# The SDK's global tracer unless the owner hands the node its telemetry's.
_default_tracer = trace.get_tracer("authz.buckets.redis")


class NodeClient:
    """One Redis node. Use from one event loop (the one that called `start()`)."""

    def __init__(self, address: RedisAddress, *, scripts: Mapping[bytes, bytes],
                 timeout: float, max_batch: int = 512,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 tracer: trace.Tracer | None = None, stats: RedisStoreStats | None = None,
                 expect_master: bool = False, replica_acks: int = 0, show_server: bool = False,
                 on_lost: Callable[[NodeClient, StoreError], None] | None = None) -> None:
        """`scripts`: sha1 -> source, loaded at every connect. `timeout`: the default deadline
        of a call, in seconds. `replica_acks`: replicas that must have each write before its
        replies are given out (one WAIT per write; fewer acknowledgements in time fail the
        write's calls). `on_lost`: called when the connection is dropped (from the event
        loop; must not block)."""
        self.address = address
        self.name = address.display
        self.tracer = tracer if tracer is not None else _default_tracer
        self.stats = stats if stats is not None else RedisStoreStats()
        self._scripts = dict(scripts)
        self._script_loads = {sha: resp.command(b"SCRIPT", b"LOAD", src)
                              for sha, src in self._scripts.items()}
        self._timeout = timeout
        self._max_batch = max(1, max_batch)
        self._connect_timeout = connect_timeout
        self._expect_master = expect_master
        self._replica_acks = replica_acks
        # Replicas connected to this master (from ROLE, at connect and every ROLE_INTERVAL):
        # a write waits for min(replica_acks, connected). After a failover the promoted master
        # has none until one reconnects: its writes then go unacknowledged rather than all
        # failing, which would turn a replica's loss into an outage of the whole shard.
        self._replicas = 0
        self._role_task: asyncio.Task[None] | None = None
        # The write spans' attributes; which server only where there are several (every
        # attribute costs ~1-2 us of the SDK's validation per span).
        self._span_attributes: dict[str, Any] = {"db.system": "redis",
                                                 "db.operation.name": "EVALSHA"}
        if show_server:
            self._span_attributes.update({"server.address": address.host or address.path,
                                          "server.port": address.port})
        self._on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._connecting = False
        self._closed = False
        self.down_reason = f"Redis at {self.name}: not started"
        self._pending: collections.deque[Call] = collections.deque()
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._link_lost: asyncio.Future[None] | None = None
        self._reload_scripts = False
        self._script_generation = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, wait: bool = False) -> None:
        """Connect. Redis being unreachable is not an error: calls fail with StoreUnavailable,
        `ready` stays False and the connection is retried in the background. `wait=True`
        raises instead if the first attempt fails."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        try:
            self._link = await self._open()
        except StoreError as e:
            if wait:
                self._loop = None
                raise
            self.down_reason = str(e)
            log.warning("Redis unreachable at start; retrying in the background: %s", e)
        self._maintainer = self._loop.create_task(self._maintain(),
                                                  name=f"redis-connect {self.name}")
        if self._replica_acks:
            self._role_task = self._loop.create_task(self._watch_replicas(),
                                                     name=f"redis-replicas {self.name}")

    async def close(self) -> None:
        self._closed = True
        self.down_reason = f"Redis at {self.name}: closed"
        if self._role_task is not None:
            self._role_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._role_task
            self._role_task = None
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
            self._drop(self._link, StoreUnavailable(self.down_reason))
        self._fail_pending(StoreUnavailable(self.down_reason))
        self._loop = None

    @property
    def ready(self) -> bool:
        return self._link is not None and not self._closed

    @property
    def available(self) -> bool:
        """Connected, or connecting: a call may still get through."""
        return self._loop is not None and (self._link is not None or self._connecting)

    # -- calls -----------------------------------------------------------------------------
    def submit(self, command: bytes, *, deadline: float | None = None,
               trace_span: Span | None = None, asking: bool = False) -> asyncio.Future[Any]:
        """Queue `command`; the future gets its reply (an error reply as a ReplyError value).

        Raises StoreUnavailable at once when the node is known to be down (between reconnect
        attempts). The future fails with StoreTimeout when `deadline` (loop time; default now +
        timeout) passes, StoreUnavailable when the connection is lost."""
        loop = self._loop
        if loop is None or (self._link is None and not self._connecting):
            raise StoreUnavailable(self.down_reason)
        future: asyncio.Future[Any] = loop.create_future()
        call = Call(command, future,
                    deadline if deadline is not None else loop.time() + self._timeout)
        call.trace = trace_span
        call.asking = asking
        self._pending.append(call)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        if self._timer is None:
            self._arm_timer()
        return future

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
            calls: list[Call] = []
            if self._reload_scripts:
                self._reload_scripts = False
                self._script_generation += 1
                stats.script_loads += 1
                assert self._loop is not None
                for load in self._script_loads.values():
                    link.inflight.append(Call(load, None, self._loop.time() + self._timeout))
                    chunk.append(load)
            generation = self._script_generation
            while pending and len(calls) < self._max_batch:
                call = pending.popleft()
                if call.future is not None and call.future.done():
                    continue  # the caller was cancelled while queued
                call.generation = generation
                if call.asking:
                    # ASKING applies to the next command on this connection only: the two go
                    # out together, its +OK is consumed in order.
                    link.inflight.append(Call(_ASKING, None, call.deadline))
                    chunk.append(_ASKING)
                calls.append(call)
                link.inflight.append(call)
                chunk.append(call.command)
            if not calls:
                if chunk:
                    link.send(b"".join(chunk))
                break
            # One write serves several checks: the span is a child of the check that scheduled
            # the flush (the current context was copied by call_soon) and links to every other
            # check in the batch, so each check's trace leads to the Redis call that answered
            # it. No span when every check of the write is in a trace nobody records (callers
            # that are not sampled, most of a mesh's requests): it could only be their
            # unrecorded child. Outside any check (no parent at all) the write is its own root.
            parent = trace.get_current_span()
            traced = [c.trace for c in calls if c.trace is not None]
            span: Span | None = None
            if traced or not parent.get_span_context().is_valid:
                links = [Link(t.get_span_context()) for t in traced if t is not parent]
                span = self.tracer.start_span("redis.charge", kind=SpanKind.CLIENT, attributes={
                    **self._span_attributes, "db.operation.batch.size": len(calls)},
                    links=links or None)
            batch = _Batch(span, len(calls))
            for call in calls:
                call.batch = batch
            acks = min(self._replica_acks, self._replicas)
            if acks:
                # WAIT answers when the replicas have everything this connection wrote, or at
                # its timeout with how many had: give it until just before the first deadline.
                assert self._loop is not None
                first = min(c.deadline for c in calls)
                wait_ms = max(1, int((first - self._loop.time()) * 900))
                barrier = Call(resp.command(b"WAIT", b"%d" % acks, b"%d" % wait_ms), None,
                               first)
                barrier.held = []
                batch.barrier = barrier
                link.inflight.append(barrier)
                chunk.append(barrier.command)
            stats.batches += 1
            stats.batched_calls += len(calls)
            link.send(b"".join(chunk))
        if self._timer is None:
            self._arm_timer()

    def _on_reply(self, link: _Link, call: Call, reply: Any) -> None:
        if call.held is not None:
            self._release(call, reply)
            return
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if (call.batch is not None and message.startswith("NOSCRIPT")
                    and call.retries < _MAX_SCRIPT_RETRIES):
                # Only the first NOSCRIPT of a generation asks for a reload; calls sent before
                # that reload simply go again after it.
                if call.generation == self._script_generation:
                    self._reload_scripts = True
                call.retries += 1
                self._finish(call, failed=False)
                self._pending.appendleft(call)
                self._schedule_flush()
                return
            if message.startswith(_NOT_MASTER):
                # A replica, a demoted master, or a Redis still loading: a new connection (or
                # the owner, for Sentinel) may reach the new primary.
                self._drop(link, StoreUnavailable(f"Redis at {self.name} answered {message}"))
                self._fail(call, StoreUnavailable(f"Redis at {self.name} answered {message}"))
                return
            if call.future is None:  # an internal command (ASKING, SCRIPT LOAD) refused
                log.warning("Redis at %s refused %s: %s", self.name,
                            call.command.split(b"\r\n", 3)[2][:16], message)
                return
        batch = call.batch
        if batch is not None and batch.barrier is not None:
            assert batch.barrier.held is not None
            batch.barrier.held.append((call, reply))  # given out when the WAIT answers
            return
        future = call.future
        if future is not None and not future.done():
            future.set_result(reply)
        self._finish(call, failed=isinstance(reply, hiredis.ReplyError))

    def _release(self, barrier: Call, reply: Any) -> None:
        """The WAIT of a write answered: give out its replies, or fail them if too few
        replicas have the write (a failover could forget those admissions)."""
        held, barrier.held = barrier.held or [], None
        acks = reply if isinstance(reply, int) else -1
        wanted = int(barrier.command.split(b"\r\n")[4])  # WAIT <wanted> <ms>
        if acks >= wanted:
            for call, value in held:
                future = call.future
                if future is not None and not future.done():
                    future.set_result(value)
                self._finish(call, failed=isinstance(value, hiredis.ReplyError))
            return
        error = StoreUnavailable(
            f"Redis at {self.name}: the write reached {max(acks, 0)} of {wanted} "
            "replica(s) in time (store.replica_acks)")
        for call, _ in held:
            self._fail(call, error)

    # -- failures, deadlines ---------------------------------------------------------------
    def _fail(self, call: Call, error: StoreError) -> None:
        if call.held is not None:  # a WAIT barrier lost: its write's replies go with it
            held, call.held = call.held, None
            for c, _ in held:
                self._fail(c, error)
        future = call.future
        if future is not None and not future.done():
            # One exception object per caller (a shared one would collect every caller's
            # traceback), of the same type: what failed decides the metric label.
            future.set_exception(type(error)(str(error)))
        self._finish(call, failed=True)

    def _finish(self, call: Call, *, failed: bool) -> None:
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
        current = self._link is link
        if current:
            self._link = None
            self.down_reason = str(error)
            if self._link_lost is not None and not self._link_lost.done():
                self._link_lost.set_result(None)
        while link.inflight:
            self._fail(link.inflight.popleft(), error)
        if current and not self._closed and self._on_lost is not None:
            self._on_lost(self, error)

    def _fail_pending(self, error: StoreError) -> None:
        while self._pending:
            self._fail(self._pending.popleft(), error)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _arm_timer(self) -> None:
        link = self._link
        deadline: float | None = None
        if self._pending:
            # Not always the first: a redirected call (cluster) joins with its old deadline.
            deadline = min(c.deadline for c in self._pending)
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
            self._drop(link, StoreTimeout(
                f"Redis at {self.name} did not answer within {self._timeout * 1000:g} ms "
                "(store.timeout); connection dropped"))
        pending = self._pending
        if pending and any(c.deadline <= now for c in pending):
            keep: collections.deque[Call] = collections.deque()
            for c in pending:
                if c.deadline <= now:
                    self._fail(c, StoreUnavailable(
                        f"Redis at {self.name} unavailable: not connected in time "
                        f"(last error: {self.down_reason})"))
                else:
                    keep.append(c)
            self._pending = keep
        self._arm_timer()

    async def _watch_replicas(self) -> None:
        """How many replicas this master has, re-read every ROLE_INTERVAL (replica_acks)."""
        while not self._closed:
            await asyncio.sleep(ROLE_INTERVAL)
            if self._link is None:
                continue
            # A failure here is the connection's own failure handling's to deal with.
            with contextlib.suppress(StoreError):
                self._replicas = _connected_replicas(await self.submit(_ROLE))

    # -- connecting ------------------------------------------------------------------------
    async def _maintain(self) -> None:
        """Reconnect in the background whenever the connection is lost."""
        assert self._loop is not None
        backoff = 0.0  # the first attempt after a loss goes at once
        while not self._closed:
            if self._link is not None:
                self._link_lost = self._loop.create_future()
                await self._link_lost
                backoff = 0.0
                continue
            if backoff:
                await asyncio.sleep(backoff)
            self._connecting = True
            try:
                link = await self._open()
            except StoreError as e:
                self.down_reason = str(e)
                self._connecting = False
                self._fail_pending(StoreUnavailable(self.down_reason))
                backoff = min(max(backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
                continue
            finally:
                self._connecting = False
            self._link = link
            self._schedule_flush()

    async def _open(self) -> _Link:
        address = self.address
        loop = self._loop
        assert loop is not None
        link = _Link(self)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if address.path:
                    await loop.create_unix_connection(lambda: link, address.path)
                else:
                    await loop.create_connection(
                        lambda: link, address.host, address.port, ssl=address.tls,
                        server_hostname=address.host if address.tls else None)
                handshake = resp.auth(address.username, address.password)
                if address.db:
                    handshake.append(resp.command(b"SELECT", b"%d" % address.db))
                if self._expect_master or self._replica_acks:
                    handshake.append(resp.command(b"ROLE"))
                handshake.extend(self._script_loads.values())
                futures = [loop.create_future() for _ in handshake]
                deadline = loop.time() + self._connect_timeout
                link.inflight.extend(Call(c, f, deadline) for c, f in
                                     zip(handshake, futures, strict=True))
                link.send(b"".join(handshake))
                # return_exceptions: every reply is consumed, so a refused AUTH followed by
                # refused SELECT / SCRIPT LOAD leaves no "exception never retrieved" behind.
                replies = await asyncio.gather(*futures, return_exceptions=True)
            for reply in replies:
                # An error reply arrives as a value (a ReplyError, itself an Exception).
                if isinstance(reply, hiredis.ReplyError):
                    raise StoreUnavailable(str(reply))
                if isinstance(reply, BaseException):
                    raise reply
        except TimeoutError:
            link.abort()
            raise StoreUnavailable(f"Redis at {address.display} did not answer within "
                                   f"{self._connect_timeout:g} s") from None
        except OSError as e:
            link.abort()
            raise StoreUnavailable(f"cannot connect to Redis at {address.display}: {e}"
                                   ) from None
        except StoreError as e:
            link.abort()
            raise StoreUnavailable(f"Redis at {address.display} refused the connection "
                                   f"setup: {e}") from None
        except BaseException:  # cancelled (close() during a reconnect): no half-open socket
            link.abort()
            raise
        loaded = replies[len(replies) - len(self._script_loads):]
        for sha, got in zip(self._script_loads, loaded, strict=True):
            if got != sha:
                link.abort()
                raise StoreUnavailable(f"Redis at {address.display} loaded a script as "
                                       f"{got!r}, expected {sha!r}")
        if self._expect_master or self._replica_acks:
            role = replies[len(replies) - len(self._script_loads) - 1]
            kind = resp.text(role[0]) if isinstance(role, list) and role else "?"
            if self._expect_master and kind != "master":
                link.abort()
                raise StoreUnavailable(f"Redis at {address.display} is a {kind}, not the "
                                       "master: no writes go to a replica")
            self._replicas = _connected_replicas(role)
        self.stats.connects += 1
        return link


def _connected_replicas(role: Any) -> int:
    """The replicas a master's ROLE reply lists ([b"master", offset, [[ip, port, offset]...]])."""
    if isinstance(role, list) and len(role) >= 3 and resp.text(role[0]) == "master":
        return len(role[2]) if isinstance(role[2], list) else 0
    return 0
