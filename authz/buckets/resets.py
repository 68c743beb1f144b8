"""Bucket resets reach every replica: a Redis stream every service process reads.

`authz quota reset` deletes an identity's bucket keys in Redis, which the next charge sees at
once. What it cannot reach is each replica's local deny cache, which answers a refused identity
from memory for up to 5 minutes. So the reset also appends the hashes it reset (the identity's,
and a scope's for shared buckets) to the stream `<prefix>{resets}`, and every process reads it
every `POLL_INTERVAL` and forgets the refusals of those buckets: a reset is in effect everywhere
within about a second.

Why a stream read by polling, not pub/sub or a key read per check: nothing is added to the
check path (the deny cache is consulted exactly as before; measured in loadtests/README.md); a
process that was disconnected reads what it missed from its last id when it is back, which a
pub/sub subscriber would lose; and it works the same on every topology (the stream is one key,
in one slot). One XREAD per process per POLL_INTERVAL is the whole cost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import StoreError
from .redis import RedisBucketStore

log = logging.getLogger(__name__)

# "Within ~1 s": half a second between reads, plus the read itself.
POLL_INTERVAL = 0.5
# The stream keeps the last resets only (a process reads it twice a second). A process that
# could not read it for a while forgets its whole deny cache once it can again: the resets it
# missed may have been trimmed, and the cache is only a saving of Redis calls.
MAX_LEN = 10_000
_KEY = "{resets}"


def stream_key(store: RedisBucketStore) -> str:
    return store.prefix + _KEY


async def publish(store: RedisBucketStore, markers: Iterable[str]) -> bytes:
    """Announce that the buckets whose keys contain `markers` were reset; returns the id."""
    args = [b"XADD", stream_key(store).encode(), b"MAXLEN", b"~", b"%d" % MAX_LEN, b"*"]
    for marker in markers:
        args += [b"reset", marker.encode()]
    reply = await store.command(_KEY, *args)
    return reply if isinstance(reply, bytes) else str(reply).encode()


class ResetFeed:
    """Reads the resets stream and hands every reset's markers to `forget` (the deny cache's)."""

    def __init__(self, store: RedisBucketStore, forget: Callable[[list[str]], int],
                 forget_all: Callable[[], None], *, interval: float = POLL_INTERVAL) -> None:
        self._store = store
        self._forget = forget
        self._forget_all = forget_all
        self._interval = interval
        self._last: bytes | None = None
        self._missed_reads = False
        self.applied = 0  # resets applied (tests, logs)

    async def run(self) -> None:
        key = stream_key(self._store).encode()
        while True:
            try:
                if self._last is None:
                    # Where the stream is now: older resets happened before this process's
                    # deny cache held anything.
                    newest = await self._store.command(_KEY, b"XREVRANGE", key, b"+", b"-",
                                                       b"COUNT", b"1")
                    self._last = newest[0][0] if newest else b"0-0"
                else:
                    await self._read(key)
                if self._missed_reads:
                    self._missed_reads = False
                    self._forget_all()
            except StoreError:
                # Redis is down (the store's own failure handling says so): read later, and
                # then start afresh, since what happened meanwhile is not known for sure.
                self._missed_reads = True
            except Exception:
                log.exception("reading the bucket resets failed")
            await asyncio.sleep(self._interval)

    async def _read(self, key: bytes) -> None:
        assert self._last is not None
        reply: Any = await self._store.command(_KEY, b"XREAD", b"COUNT", b"1000", b"STREAMS",
                                               key, self._last)
        if not reply:
            return
        entries = reply[0][1]
        if len(entries) >= 1000:  # a burst of resets: cheaper to start afresh
            self._forget_all()
        else:
            markers = [v.decode() for _, fields in entries
                       for k, v in zip(fields[::2], fields[1::2], strict=True) if k == b"reset"]
            self._forget(markers)
        self.applied += len(entries)
        self._last = entries[-1][0]
