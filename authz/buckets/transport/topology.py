"""Where the commands go: one server, the master Sentinel names, or the Cluster master that owns
a key's hash slot. All three run every command as one call on one node (`execute`), and all
three recover by themselves.

Cluster
- The slot map comes from CLUSTER SHARDS (Redis 7), or CLUSTER SLOTS (older), asked on a
  connection of its own to any known node or seed; one pipelined `NodeClient` per master.
- MOVED: the slot's owner is updated at once, the command goes to the new owner within the same
  deadline, and the whole map is refreshed in the background. ASK: ASKING and the command go
  to the named node together, on the same connection (redis-py's asyncio client sends them on
  two pooled connections, which loops under load). At most 5 redirects per command.
- TRYAGAIN, CLUSTERDOWN, a lost connection, a slot no master serves: that command fails
  (StoreUnavailable, so `store.on_error` answers it), and the map is refreshed every 100 ms
  until every slot has a connected master again. Identities on healthy masters keep their
  answers meanwhile: nothing is rebuilt but what changed.
Sentinel
- The master's address comes from the first sentinel that answers SENTINEL
  GET-MASTER-ADDR-BY-NAME (the sentinels' own credentials, when set). The connection to it asks
  ROLE and refuses a replica.
- A lost connection, a READONLY reply (a demoted master) or a refused set-up starts asking the
  sentinels again every 100 ms until a master is connected; a new address replaces the node.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import hiredis
from opentelemetry import trace
from opentelemetry.trace import Span

from ...config.redis_url import RedisAddress
from ...errors import StoreError, StoreProtocolError, StoreTimeout, StoreUnavailable
from . import resp
from .node import DEFAULT_CONNECT_TIMEOUT, NodeClient, RedisStoreStats

log = logging.getLogger(__name__)

SLOTS = 16384
# Between two topology questions after a failure: a failover takes ~2 s (Cluster) or ~2.3 s
# (Sentinel) here, so 100 ms adds at most a twentieth to it, and a dead topology is asked ten
# times a second per service process, no more.
REFRESH_INTERVAL = 0.1
# A question to a node or sentinel gets this long (a dead one must not hold up the others).
QUERY_TIMEOUT = 0.5
MAX_REDIRECTS = 5


class Transport(Protocol):
    stats: RedisStoreStats

    def set_tracer(self, tracer: trace.Tracer | None) -> None:
        """Start the spans of writes with this tracer from now on."""

    async def start(self, *, wait: bool = False) -> None: ...

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    async def execute(self, key: str, command: bytes, span: Span | None) -> Any:
        """Run `command` on the node for `key` (every key of the command shares its hash
        tag); its reply. Raises StoreError (an error reply is StoreProtocolError)."""
        ...


def _error(reply: Any) -> StoreProtocolError:
    return StoreProtocolError(f"Redis answered an error: {reply}")


class Standalone:
    """One server (or a proxy in front of a cluster)."""

    def __init__(self, address: RedisAddress, *, scripts: Mapping[bytes, bytes],
                 timeout: float, max_batch: int, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 tracer: trace.Tracer | None = None, stats: RedisStoreStats | None = None
                 ) -> None:
        self.stats = stats if stats is not None else RedisStoreStats()
        self.node = NodeClient(address, scripts=scripts, timeout=timeout, max_batch=max_batch,
                               connect_timeout=connect_timeout, tracer=tracer, stats=self.stats)

    def set_tracer(self, tracer: trace.Tracer | None) -> None:
        self.node.tracer = tracer or self.node.tracer

    async def start(self, *, wait: bool = False) -> None:
        await self.node.start(wait=wait)

    async def close(self) -> None:
        await self.node.close()

    @property
    def ready(self) -> bool:
        return self.node.ready

    async def execute(self, key: str, command: bytes, span: Span | None) -> Any:
        reply = await self.node.submit(command, trace_span=span)
        if type(reply) is hiredis.ReplyError:
            raise _error(reply)
        return reply


def key_slot(key: str) -> int:
    """A key's hash slot, as Redis computes it: CRC16/XMODEM of the hash tag (the part in the
    first {...}, when not empty), else of the whole key."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return binascii.crc_hqx(data, 0) % SLOTS


def _pairs(value: Any) -> dict[str, Any]:
    """A RESP2 flat [key, value, key, value ...] list (or a RESP3 map) as a dict."""
    if isinstance(value, dict):
        return {resp.text(k): v for k, v in value.items()}
    return {resp.text(value[i]): value[i + 1] for i in range(0, len(value) - 1, 2)}


class Cluster:
    """A Redis Cluster: commands go to the master owning their hash slot."""

    def __init__(self, seeds: Sequence[tuple[str, int]], template: RedisAddress, *,
                 scripts: Mapping[bytes, bytes], timeout: float, max_batch: int,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 tracer: trace.Tracer | None = None, stats: RedisStoreStats | None = None,
                 replica_acks: int = 0) -> None:
        """`template`: credentials and TLS for every node (its host and port are the first
        seed; a cluster has only database 0)."""
        self._replica_acks = replica_acks
        self.stats = stats if stats is not None else RedisStoreStats()
        self._seeds = list(dict.fromkeys(seeds))
        self._template = dataclasses.replace(template, db=0, path="")
        self._scripts = scripts
        self._timeout = timeout
        self._max_batch = max_batch
        self._connect_timeout = connect_timeout
        self._tracer = tracer
        self._slots: list[NodeClient | None] = [None] * SLOTS
        self._nodes: dict[tuple[str, int], NodeClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.down_reason = "Redis Cluster: no slot map yet"

    def set_tracer(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer
        for node in self._nodes.values():
            node.tracer = tracer or node.tracer

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, wait: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = False
        try:
            await self._refresh_once()
        except StoreError as e:
            if wait:
                raise
            self.down_reason = str(e)
            log.warning("Redis Cluster unreachable at start; retrying in the background: %s", e)
        for node in list(self._nodes.values()):
            await node.start()
        if wait and not self.ready:
            raise StoreUnavailable(self.down_reason)
        self._refresh_soon()

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for node in list(self._nodes.values()):
            await node.close()
        self._nodes.clear()
        self._slots = [None] * SLOTS
        self._loop = None

    @property
    def ready(self) -> bool:
        """Every slot has a master we are connected to."""
        if self._closed or not self._nodes:
            return False
        owners = {id(n): n for n in self._slots if n is not None}
        return len(owners) > 0 and None not in self._slots and all(
            n.ready for n in owners.values())

    @property
    def masters(self) -> list[str]:
        """The masters serving slots now (host:port), for tests and logs."""
        seen = {id(n): n for n in self._slots if n is not None}
        return sorted(n.name for n in seen.values())

    # -- commands --------------------------------------------------------------------------
    async def execute(self, key: str, command: bytes, span: Span | None) -> Any:
        loop = self._loop
        if loop is None:
            raise StoreUnavailable(self.down_reason)
        deadline = loop.time() + self._timeout
        slot = key_slot(key)
        node = self._slots[slot]
        asking = False
        for _ in range(MAX_REDIRECTS + 1):
            if node is None:
                self._refresh_soon()
                raise StoreUnavailable(f"Redis Cluster: no master serves slot {slot} "
                                       f"(last error: {self.down_reason})")
            if loop.time() >= deadline:
                raise StoreTimeout(f"Redis Cluster: no answer for slot {slot} within "
                                   f"{self._timeout * 1000:g} ms (store.timeout)")
            try:
                reply = await node.submit(command, deadline=deadline, trace_span=span,
                                          asking=asking)
            except StoreUnavailable:
                self._refresh_soon()
                raise
            if type(reply) is not hiredis.ReplyError:
                return reply
            message = str(reply)
            kind, _, rest = message.partition(" ")
            if kind in ("MOVED", "ASK"):
                self.stats.redirects += 1
                target = self._node_for(_address(rest))
                if target is None:
                    raise StoreProtocolError(f"Redis Cluster: unusable redirect {message!r}")
                await self._ensure_started(target)
                if kind == "MOVED":
                    self._slots[slot] = target
                    self._refresh_soon()
                    asking = False
                else:
                    asking = True  # this command only; the map stays
                node = target
                continue
            if kind in ("TRYAGAIN", "CLUSTERDOWN"):
                self._refresh_soon()
                raise StoreUnavailable(f"Redis Cluster answered {message}")
            raise _error(reply)
        raise StoreUnavailable(f"Redis Cluster: more than {MAX_REDIRECTS} redirects for slot "
                               f"{slot}")

    # -- the slot map ----------------------------------------------------------------------
    def _node_for(self, hostport: tuple[str, int] | None) -> NodeClient | None:
        if hostport is None:
            return None
        node = self._nodes.get(hostport)
        if node is None:
            host, port = hostport
            address = dataclasses.replace(self._template, host=host, port=port)
            node = NodeClient(address, scripts=self._scripts, timeout=self._timeout,
                              max_batch=self._max_batch, connect_timeout=self._connect_timeout,
                              tracer=self._tracer, stats=self.stats, on_lost=self._lost,
                              replica_acks=self._replica_acks, show_server=True)
            self._nodes[hostport] = node
        return node

    async def _ensure_started(self, node: NodeClient) -> None:
        if not node.available and self._loop is not None and not self._closed:
            await node.start()

    def _lost(self, node: NodeClient, error: StoreError) -> None:
        self.down_reason = str(error)
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._closed or self._loop is None:
            return
        if self._refresher is None or self._refresher.done():
            self._refresher = self._loop.create_task(self._keep_refreshing(),
                                                     name="redis-cluster-slots")

    async def _keep_refreshing(self) -> None:
        """Refresh the map now, then every REFRESH_INTERVAL until all is well again."""
        while not self._closed:
            try:
                await self._refresh_once()
            except StoreError as e:
                self.down_reason = str(e)
            except Exception:  # a bug must not end the recovery for good
                log.exception("refreshing the Redis Cluster slot map failed")
            if self.ready:
                return
            await asyncio.sleep(REFRESH_INTERVAL)

    async def _refresh_once(self) -> None:
        self.stats.topology_refreshes += 1
        candidates = [hp for hp, n in self._nodes.items() if n.ready]
        candidates += [hp for hp in self._nodes if hp not in candidates]
        candidates += [s for s in self._seeds if s not in candidates]
        errors = []
        for host, port in candidates:
            try:
                owners = await self._ask(host, port)
            except StoreError as e:
                errors.append(str(e))
                continue
            self._install(owners)
            for node in {id(n): n for n in self._slots if n is not None}.values():
                await self._ensure_started(node)
            return
        raise StoreUnavailable("Redis Cluster: no node answered for the slot map ("
                               + "; ".join(errors[-3:]) + ")")

    async def _ask(self, host: str, port: int) -> list[tuple[int, int, tuple[str, int]]]:
        """(first slot, last slot, master host:port) from one node."""
        t = self._template
        hello = resp.auth(t.username, t.password)
        replies = await resp.query(host, port, [*hello, resp.command(b"CLUSTER", b"SHARDS")],
                                   tls=t.tls, limit=QUERY_TIMEOUT, what="Redis Cluster node")
        for r in replies[:len(hello)]:
            if isinstance(r, hiredis.ReplyError):
                raise StoreUnavailable(f"Redis Cluster node {host}:{port}: {r}")
        shards = replies[-1]
        if isinstance(shards, hiredis.ReplyError):  # before Redis 7
            again = await resp.query(host, port, [*hello, resp.command(b"CLUSTER", b"SLOTS")],
                                     tls=t.tls, limit=QUERY_TIMEOUT, what="Redis Cluster node")
            slots = again[-1]
            if isinstance(slots, hiredis.ReplyError):
                raise StoreUnavailable(f"Redis Cluster node {host}:{port}: {slots}")
            return [(int(s[0]), int(s[1]), (resp.text(s[2][0]) or host, int(s[2][1])))
                    for s in slots]
        out = []
        for shard in shards:
            fields = _pairs(shard)
            ranges = [int(x) for x in fields.get("slots", [])]
            master = None
            for raw in fields.get("nodes", []):
                node = _pairs(raw)
                if resp.text(node.get("role", "")) != "master":
                    continue
                if resp.text(node.get("health", "online")) == "fail":
                    continue
                master = node
            if master is None or not ranges:
                continue
            endpoint = resp.text(master.get("endpoint", "") or "")
            if endpoint in ("", "?"):
                endpoint = resp.text(master.get("ip", "") or "") or host
            key = "tls-port" if t.tls is not None and "tls-port" in master else "port"
            addr = (endpoint, int(master[key]))
            out += [(ranges[i], ranges[i + 1], addr) for i in range(0, len(ranges) - 1, 2)]
        if not out:
            raise StoreUnavailable(f"Redis Cluster node {host}:{port} knows no masters")
        return out

    def _install(self, owners: list[tuple[int, int, tuple[str, int]]]) -> None:
        slots: list[NodeClient | None] = [None] * SLOTS
        for first, last, hostport in owners:
            node = self._node_for(hostport)
            for s in range(first, last + 1):
                slots[s] = node
        self._slots = slots
        serving = {id(n) for n in slots if n is not None}
        for hostport, node in list(self._nodes.items()):
            if id(node) not in serving:
                # Not a master any more (failed over, or an old redirect target): closing it
                # fails only calls that could not have been answered by it anyway.
                del self._nodes[hostport]
                assert self._loop is not None
                task = self._loop.create_task(node.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)


def _address(text: str) -> tuple[str, int] | None:
    """'3999 127.0.0.1:6381' (the rest of a MOVED/ASK reply) -> ('127.0.0.1', 6381)."""
    _, _, hostport = text.partition(" ")
    host, _, port = hostport.rpartition(":")
    try:
        return (host.strip("[]"), int(port))
    except ValueError:
        return None


class Sentinel:
    """A master watched by sentinels: commands go to the master they name."""

    def __init__(self, sentinels: Sequence[tuple[str, int]], master_name: str,
                 template: RedisAddress, *, scripts: Mapping[bytes, bytes], timeout: float,
                 max_batch: int, sentinel_username: str | None = None,
                 sentinel_password: str | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 tracer: trace.Tracer | None = None, stats: RedisStoreStats | None = None,
                 replica_acks: int = 0) -> None:
        """`template`: credentials, database and TLS of the master (its host is replaced by
        what the sentinels say); the sentinels use the same TLS and their own credentials."""
        self._replica_acks = replica_acks
        self.stats = stats if stats is not None else RedisStoreStats()
        self._sentinels = list(dict.fromkeys(sentinels))
        self._master_name = master_name
        self._template = dataclasses.replace(template, path="")
        self._sentinel_auth = (sentinel_username, sentinel_password)
        self._scripts = scripts
        self._timeout = timeout
        self._max_batch = max_batch
        self._connect_timeout = connect_timeout
        self._tracer = tracer
        self.node: NodeClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finder: asyncio.Task[None] | None = None
        self._closed = False
        self.down_reason = f"Redis Sentinel: master {master_name!r} not found yet"

    def set_tracer(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer
        if self.node is not None:
            self.node.tracer = tracer or self.node.tracer

    async def start(self, *, wait: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = False
        try:
            await self._find_once()
        except StoreError as e:
            if wait:
                raise
            self.down_reason = str(e)
            log.warning("Redis Sentinel: no master yet; retrying in the background: %s", e)
        if wait and not self.ready:
            raise StoreUnavailable(self.down_reason)
        if not self.ready:
            self._find_soon()

    async def close(self) -> None:
        self._closed = True
        if self._finder is not None:
            self._finder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._finder
            self._finder = None
        if self.node is not None:
            await self.node.close()
            self.node = None
        self._loop = None

    @property
    def ready(self) -> bool:
        return self.node is not None and self.node.ready and not self._closed

    async def execute(self, key: str, command: bytes, span: Span | None) -> Any:
        node = self.node
        if node is None:
            raise StoreUnavailable(self.down_reason)
        reply = await node.submit(command, trace_span=span)
        if type(reply) is hiredis.ReplyError:
            raise _error(reply)
        return reply

    def _lost(self, node: NodeClient, error: StoreError) -> None:
        if node is self.node:
            self.down_reason = str(error)
            self._find_soon()

    def _find_soon(self) -> None:
        if self._closed or self._loop is None:
            return
        if self._finder is None or self._finder.done():
            self._finder = self._loop.create_task(self._keep_finding(),
                                                  name="redis-sentinel-master")

    async def _keep_finding(self) -> None:
        while not self._closed:
            try:
                await self._find_once()
            except StoreError as e:
                self.down_reason = str(e)
            except Exception:
                log.exception("asking the sentinels for the master failed")
            await asyncio.sleep(REFRESH_INTERVAL)
            if self.ready:
                return

    async def _find_once(self) -> None:
        self.stats.topology_refreshes += 1
        host, port = await self._ask()
        current = self.node
        if current is not None and (current.address.host, current.address.port) == (host, port):
            return  # the same master: its own reconnect loop takes it from here
        address = dataclasses.replace(self._template, host=host, port=port)
        node = NodeClient(address, scripts=self._scripts, timeout=self._timeout,
                          max_batch=self._max_batch, connect_timeout=self._connect_timeout,
                          tracer=self._tracer, stats=self.stats, expect_master=True,
                          on_lost=self._lost, replica_acks=self._replica_acks)
        await node.start()
        self.node = node
        if current is not None:
            log.warning("Redis Sentinel: master %r is now %s (was %s)", self._master_name,
                        node.name, current.name)
            await current.close()

    async def _ask(self) -> tuple[str, int]:
        user, password = self._sentinel_auth
        hello = resp.auth(user, password)
        ask = resp.command(b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", self._master_name.encode())
        errors = []
        for host, port in self._sentinels:
            try:
                replies = await resp.query(host, port, [*hello, ask], tls=self._template.tls,
                                           limit=QUERY_TIMEOUT, what="Redis Sentinel")
            except StoreError as e:
                errors.append(str(e))
                continue
            answer = replies[-1]
            if isinstance(answer, hiredis.ReplyError) or any(
                    isinstance(r, hiredis.ReplyError) for r in replies[:-1]):
                bad = next(r for r in replies if isinstance(r, hiredis.ReplyError))
                errors.append(f"sentinel {host}:{port}: {bad}")
                continue
            if not answer:
                errors.append(f"sentinel {host}:{port} knows no master {self._master_name!r}")
                continue
            return resp.text(answer[0]), int(answer[1])
        raise StoreUnavailable("Redis Sentinel: no sentinel named the master ("
                               + "; ".join(errors[-3:]) + ")")
