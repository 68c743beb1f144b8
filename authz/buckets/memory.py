"""In-process token buckets: one replica, development, and the reference the Redis store must
match (tests/buckets runs the same behaviour tests against both).

The arithmetic mirrors token_bucket.lua line for line: a bucket is (tokens, last update); it
refills by elapsed * rate up to capacity when read, is written only when a charge is admitted,
and is forgotten once it would be full again (plus a margin) -- Redis's key TTL. A forgotten
bucket reads as full, exactly like an expired key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ._validate import check_charge
from .store import BucketSpec, BucketState, ChargeResult

# Tokens of slack in "holds at least `cost`": refill arithmetic in floating point can land a
# hair under a whole token (e.g. 0.1 s * 10/s = 0.9999999999999999). Far below anything a
# client could exploit; token_bucket.lua uses the same value.
EPSILON = 1e-9

# Seconds a bucket is kept after it would be full again. Same as the Redis key TTL margin
# (token_bucket.lua), so both stores forget a bucket at the same moment.
TTL_MARGIN = 1.0

# Forgotten buckets are swept when the table doubles since the last sweep (amortised O(1) per
# charge, memory at most ~2x the live buckets) and at least this often.
_SWEEP_MIN_SIZE = 1024
_SWEEP_INTERVAL = 10.0


class MemoryBucketStore:
    """`BucketStore` in a dict. `clock` is a monotonic clock in seconds (injectable for tests)."""

    def __init__(
        self,
        key_prefix: str = "authz:",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = key_prefix
        self._clock = clock
        # key -> (tokens after the last admitted charge, time of that charge, forget-after time)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._sweep_size = _SWEEP_MIN_SIZE
        self._sweep_time = clock() + _SWEEP_INTERVAL
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        self._buckets.clear()

    @property
    def ready(self) -> bool:
        return self._started

    def __len__(self) -> int:
        """Buckets currently remembered (the ones not known to be full)."""
        return len(self._buckets)

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        check_charge(buckets, cost)
        now = self._clock()
        table = self._buckets
        prefix = self._prefix
        keys = [prefix + spec.key for spec in buckets]
        levels: list[float] = []
        allowed = True  # every enforced bucket holds `cost`
        complete = True  # every bucket does, shadow ones included
        for spec, key in zip(buckets, keys, strict=True):
            level = spec.capacity
            entry = table.get(key)
            if entry is not None:
                tokens, updated, forget_at = entry
                if now < forget_at:
                    # Time never runs backwards here, but Redis's clock can (failover): both
                    # stores then refill nothing rather than a negative amount.
                    elapsed = now - updated if now > updated else 0.0
                    level = min(spec.capacity, tokens + elapsed * spec.rate)
            levels.append(level)
            if level + EPSILON < (1.0 if spec.per_request else cost):
                complete = False
                if not spec.shadow:
                    allowed = False
        shadow_refused = allowed and not complete

        states: list[BucketState] = []
        retry_after = 0.0
        for spec, key, level in zip(buckets, keys, levels, strict=True):
            c = 1.0 if spec.per_request else cost
            if allowed and (complete or not spec.shadow):
                remaining = max(0.0, level - c)
                reset_after = (spec.capacity - remaining) / spec.rate
                table[key] = (remaining, now, now + reset_after + TTL_MARGIN)
            else:
                remaining = level
                reset_after = (spec.capacity - remaining) / spec.rate
            wait = (c - remaining) / spec.rate if remaining + EPSILON < c else 0.0
            # Refused: the wait for the enforced buckets. Shadow-refused: the would-be wait.
            if (not allowed and not spec.shadow) or (shadow_refused and spec.shadow):
                retry_after = max(retry_after, wait)
            states.append(BucketState(spec.name, spec.capacity, remaining, reset_after, wait))

        if len(table) >= self._sweep_size or now >= self._sweep_time:
            self._sweep(now)
        return ChargeResult(allowed, tuple(states), retry_after, shadow_refused)

    def _sweep(self, now: float) -> None:
        table = self._buckets
        for key in [k for k, (_, _, forget_at) in table.items() if forget_at <= now]:
            del table[key]
        self._sweep_size = max(_SWEEP_MIN_SIZE, 2 * len(table))
        self._sweep_time = now + _SWEEP_INTERVAL
