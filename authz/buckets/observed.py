"""A store wrapper that reports each real store call (duration, failure) to telemetry.

It sits between the deny cache and the store, so only calls that reach Redis are measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .base import BucketSpec, BucketStore, ChargeResult, StoreError

Observer = Callable[[float, bool, str], None]  # (seconds, ok, error_type)


def error_type(e: StoreError) -> str:
    """A bounded label for a store failure (metric label: never the message itself)."""
    text = str(e).lower()
    if "did not answer" in text or "timed out" in text or "timeout" in text:
        return "timeout"
    if "connect" in text or "lost" in text or "closed" in text:
        return "connection"
    return "error"


class ObservedStore:
    def __init__(self, inner: BucketStore, observe: Observer) -> None:
        self.inner = inner
        self._observe = observe

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        started = time.perf_counter()
        try:
            result = await self.inner.charge(buckets, cost)
        except StoreError as e:
            self._observe(time.perf_counter() - started, False, error_type(e))
            raise
        self._observe(time.perf_counter() - started, True, "")
        return result
