"""Refuse locally what the store just refused, until its retry time: no Redis round trip for an
identity already known to be over its limit.

A client that ignores Retry-After keeps sending; without this every one of those requests
would cost an EVALSHA. With it, once a charge for a set of buckets and a cost is refused with
retry_after R, identical charges are refused from memory until R has passed on the local
monotonic clock. The answer can only be stale in the safe direction for the buckets' own
traffic: nothing refills a bucket faster than its rate, so the charge could not have been
admitted before R -- except if someone resets the bucket by hand or the quota changes, which
`max_hold` and `clear()` cover.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from .store import BucketSpec, BucketState, BucketStore, ChargeResult

# Entries are ~300 bytes; 100k of them is ~30 MB at worst, reached only by 100k identities
# over their limits at the same time.
DEFAULT_MAX_ENTRIES = 100_000
# Longest a refusal is answered locally, whatever its retry_after (a daily limit can say
# hours): bounds how long a bucket reset by an operator, or a raised quota, stays unseen.
DEFAULT_MAX_HOLD = 300.0

_Key = tuple[object, ...]


class DenyCache:
    """A `BucketStore` wrapping another one (Redis, memory) with a cache of refusals."""

    def __init__(self, inner: BucketStore, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_hold: float = DEFAULT_MAX_HOLD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.inner = inner
        self._max_entries = max_entries
        self._max_hold = max_hold
        self._clock = clock
        # key -> (local time the refusal was seen, local expiry, the refusal). Insertion
        # order is age order, which eviction relies on.
        self._entries: dict[_Key, tuple[float, float, ChargeResult]] = {}
        self.hits = 0  # charges refused locally

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        self._entries.clear()
        await self.inner.close()

    @property
    def ready(self) -> bool:
        return self.inner.ready

    def clear(self) -> None:
        """Forget every refusal (call after a quota reload)."""
        self._entries.clear()

    def forget(self, markers: Iterable[str]) -> int:
        """Forget the refusals of buckets whose key contains any of `markers` (an identity's
        or a scope's hash: `authz quota reset`); returns how many. Walks every entry: resets
        are an operator's action, seldom, and the cache is bounded (~30 ms at its 100k cap)."""
        wanted = tuple(markers)
        stale = [k for k in self._entries
                 if any(isinstance(spec, BucketSpec) and m in spec.key
                        for spec in k[1:] for m in wanted)]
        for k in stale:
            del self._entries[k]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        # The specs themselves (not only their keys) are part of the key: the same bucket with
        # another capacity or rate after a quota reload is not the refused charge.
        key: _Key = (cost, *buckets)
        entries = self._entries
        entry = entries.get(key)
        if entry is not None:
            now = self._clock()
            seen, until, refusal = entry
            if now < until:
                self.hits += 1
                return _aged(refusal, buckets, now - seen)
            del entries[key]

        result = await self.inner.charge(buckets, cost)
        if not result.allowed and result.retry_after > 0.0:
            now = self._clock()
            entries.pop(key, None)  # re-insert at the young end
            entries[key] = (now, now + min(result.retry_after, self._max_hold), result)
            self._evict(now)
        return result

    def _evict(self, now: float) -> None:
        entries = self._entries
        # Drop expired entries from the old end (a few per insert keeps it amortised), then
        # the oldest ones beyond the cap.
        for _ in range(4):
            if not entries:
                return
            oldest = next(iter(entries))
            if entries[oldest][1] > now:
                break
            del entries[oldest]
        while len(entries) > self._max_entries:
            del entries[next(iter(entries))]


def _aged(refusal: ChargeResult, buckets: Sequence[BucketSpec], age: float) -> ChargeResult:
    """The cached refusal as it stands `age` seconds later: buckets refilled at their rate."""
    states = tuple(
        BucketState(s.name, s.capacity, min(s.capacity, s.remaining + age * spec.rate),
                    max(0.0, s.reset_after - age), max(0.0, s.retry_after - age))
        for s, spec in zip(refusal.buckets, buckets, strict=True))
    return ChargeResult(False, states, max(0.0, refusal.retry_after - age))
