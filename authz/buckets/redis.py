"""Token buckets in Redis: one EVALSHA per decision, on one server, a Sentinel-named master or
the Cluster master owning the identity's hash slot.

The bucket logic is here: the script (token_bucket.lua), packing a charge into EVALSHA bytes,
and reading its reply. Getting the bytes to the right node and back -- pipelining, deadlines,
reconnects, NOSCRIPT, failover, MOVED/ASK -- is the transport's (authz/buckets/transport/).

Every key of one charge carries the same hash tag (`{<identity hash>}`, quota/resolve.py), so
the whole charge is one script call in one slot on every topology.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from opentelemetry import trace

from ..config.redis_url import parse_endpoint, parse_redis_url
from ..errors import InvalidValue, StoreError, StoreProtocolError, StoreUnavailable
from ._validate import check_charge
from .store import BucketSpec, BucketState, ChargeResult
from .transport import resp
from .transport.node import DEFAULT_CONNECT_TIMEOUT, RedisStoreStats
from .transport.topology import Cluster, Sentinel, Standalone, Transport

SCRIPT = resources.files(__package__).joinpath("token_bucket.lua").read_bytes()
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest().encode()
MODES = ("standalone", "sentinel", "cluster")
# Per-bucket flags for token_bucket.lua: 1 = shadow, 2 = per request.
_FLAGS = {(shadow, per_request): resp.bulk(b"%d" % (shadow + 2 * per_request))
          for shadow in (False, True) for per_request in (False, True)}

__all__ = ["MODES", "SCRIPT", "SCRIPT_SHA", "RedisBucketStore", "RedisStoreStats"]


class RedisBucketStore:
    """`BucketStore` on Redis. Use from one event loop (the one that called `start()`)."""

    def __init__(self, url: str, *, key_prefix: str = "authz:", timeout: float = 0.05,
                 max_batch: int = 512, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 tracer: trace.Tracer | None = None, mode: str = "standalone",
                 nodes: Sequence[str] = (), sentinel_master: str | None = None,
                 sentinel_username: str | None = None,
                 sentinel_password: str | None = None, replica_acks: int = 0) -> None:
        """`url`: redis://, rediss:// or unix:// (config/redis_url.py): in standalone mode the
        server; in cluster mode one seed node and, in every mode, the data nodes' credentials
        and TLS. `mode`: standalone, sentinel or cluster. `nodes` ("host:port"): more seeds
        (cluster) or the sentinels (sentinel; the URL's host:port is one too). `timeout`: the
        bound on every charge, in seconds; `max_batch`: charges per pipelined write at most;
        `replica_acks` (sentinel, cluster): replicas that must have a write before its
        decisions are answered."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._url = url
        self._mode = mode
        self._nodes = tuple(nodes)
        self._sentinel = (sentinel_master, sentinel_username, sentinel_password)
        self._replica_acks = replica_acks
        self._tracer = tracer
        self._prefix = key_prefix
        self._timeout = timeout
        self._max_batch = max(1, max_batch)
        self._connect_timeout = connect_timeout
        self._transport: Transport | None = None
        self._down_reason = "Redis store not started"
        self.stats = RedisStoreStats()
        self._heads: dict[int, bytes] = {}
        self._spec_args: dict[tuple[float, float, bool, bool], bytes] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def _build(self) -> Transport:
        try:
            address = parse_redis_url(self._url)
            extra = [parse_endpoint(n) for n in self._nodes]
        except InvalidValue as e:  # the store cannot be used at all
            raise StoreError(str(e)) from None
        common: dict[str, Any] = {"scripts": {SCRIPT_SHA: SCRIPT}, "timeout": self._timeout,
                                  "max_batch": self._max_batch,
                                  "connect_timeout": self._connect_timeout,
                                  "tracer": self._tracer, "stats": self.stats}
        if self._mode == "standalone":
            return Standalone(address, **common)
        if address.path:
            raise StoreError(f"{self._mode} mode needs redis:// or rediss:// host:port "
                             "addresses, not a unix socket")
        first = (address.host, address.port)
        if self._mode == "cluster":
            return Cluster([first, *extra], address, replica_acks=self._replica_acks, **common)
        master, username, password = self._sentinel
        if not master:
            raise StoreError("sentinel mode needs the master's name (store.sentinel_master)")
        return Sentinel([first, *extra], master, address, sentinel_username=username,
                        sentinel_password=password, replica_acks=self._replica_acks, **common)

    async def start(self, *, wait: bool = False) -> None:
        """Parse the addresses (StoreError if unusable) and connect.

        Redis being unreachable at start is not an error: like an outage later on, charges fail
        with StoreError (so `store.on_error` applies), `ready` stays False, and the connection
        is retried in the background. `wait=True` raises instead if the first attempt fails."""
        if self._transport is not None:
            return
        transport = self._build()
        await transport.start(wait=wait)
        self._transport = transport

    async def close(self) -> None:
        self._down_reason = "Redis store closed"
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()

    @property
    def ready(self) -> bool:
        return self._transport is not None and self._transport.ready

    @property
    def transport(self) -> Transport | None:
        return self._transport

    @property
    def tracer(self) -> trace.Tracer | None:
        """Starts the "redis.charge" span of each write (the server passes its telemetry's)."""
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer
        if self._transport is not None:
            self._transport.set_tracer(tracer)

    # -- the hot path ----------------------------------------------------------------------
    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        check_charge(buckets, cost)
        stats = self.stats
        stats.calls += 1
        if not buckets:
            return ChargeResult(True, (), 0.0)
        transport = self._transport
        if transport is None:
            stats.errors += 1
            raise StoreUnavailable(self._down_reason)
        caller = trace.get_current_span()
        try:
            reply = await transport.execute(buckets[0].key, self._pack(buckets, cost),
                                            caller if caller.is_recording() else None)
            return _result(buckets, reply)
        except StoreError:
            stats.errors += 1
            raise

    async def command(self, key: str, *args: bytes) -> Any:
        """One Redis command on the node that holds `key` (its hash tag decides in a cluster):
        for operators' tools and the resets feed, never the hot path. StoreError on failure."""
        transport = self._transport
        if transport is None:
            raise StoreUnavailable(self._down_reason)
        return await transport.execute(key, resp.command(*args), None)

    @property
    def prefix(self) -> str:
        return self._prefix

    def _pack(self, buckets: Sequence[BucketSpec], cost: float) -> bytes:
        n = len(buckets)
        head = self._heads.get(n)
        if head is None:
            # EVALSHA sha numkeys key... cost (capacity rate flags)...
            head = self._heads[n] = (b"*%d\r\n$7\r\nEVALSHA\r\n" % (4 + 4 * n)
                                     + resp.bulk(SCRIPT_SHA) + resp.bulk(b"%d" % n))
        parts = [head]
        prefix = self._prefix
        for spec in buckets:
            parts.append(resp.bulk((prefix + spec.key).encode()))
        parts.append(resp.number(cost))
        cache = self._spec_args
        for spec in buckets:
            key = (spec.capacity, spec.rate, spec.shadow, spec.per_request)
            args = cache.get(key)
            if args is None:
                if len(cache) > 1024:  # distinct limits come from config: a handful
                    cache.clear()
                args = cache[key] = (resp.number(spec.capacity) + resp.number(spec.rate)
                                     + _FLAGS[(spec.shadow, spec.per_request)])
            parts.append(args)
        return b"".join(parts)


def _result(buckets: Sequence[BucketSpec], reply: Any) -> ChargeResult:
    """token_bucket.lua's {allowed, retry_after, shadow_refused,
    (remaining, reset_after, retry_after)...}."""
    try:
        states = []
        i = 3
        for spec in buckets:
            states.append(BucketState(spec.name, spec.capacity, float(reply[i]),
                                      float(reply[i + 1]), float(reply[i + 2])))
            i += 3
        return ChargeResult(reply[0] == 1, tuple(states), float(reply[1]), reply[2] == 1)
    except (TypeError, ValueError, IndexError) as e:
        raise StoreProtocolError(f"unexpected reply from token_bucket.lua: {reply!r:.200}"
                                 ) from e

