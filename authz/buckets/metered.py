"""A store wrapper that reports each real store call (duration, failure) to telemetry.

It sits between the deny cache and the store, so only calls that reach Redis are measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..errors import StoreError
from .store import BucketSpec, BucketStore, ChargeResult

Observer = Callable[[float, bool, str], None]  # (seconds, ok, error_type)


class MeteredStore:
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
            self._observe(time.perf_counter() - started, False, e.error_type)
            raise
        self._observe(time.perf_counter() - started, True, "")
        return result
