"""The in-memory store on a controlled clock: exact arithmetic and bounded memory."""

from __future__ import annotations

import pytest

from authz.buckets import MemoryBucketStore
from authz.buckets.memory import TTL_MARGIN
from authz.buckets.store import BucketSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bucket(n: int = 0, capacity: float = 5, rate: float = 2) -> BucketSpec:
    return BucketSpec(key=f"{{{n:032x}}}:free:l", name="l", capacity=capacity, rate=rate)


async def test_exact_refill_on_a_controlled_clock() -> None:
    clock = Clock()
    store = MemoryBucketStore(clock=clock)
    for _ in range(5):
        assert (await store.charge([bucket()], 1)).allowed
    refused = await store.charge([bucket()], 1)
    assert (refused.allowed, refused.retry_after) == (False, 0.5)
    clock.now += 0.25  # half a token
    refused = await store.charge([bucket()], 1)
    assert refused.buckets[0].remaining == 0.5
    assert refused.retry_after == 0.25
    assert refused.buckets[0].reset_after == 2.25
    clock.now += 0.25
    admitted = await store.charge([bucket()], 1)
    assert admitted.allowed and admitted.buckets[0].remaining == 0
    clock.now += 100  # refill never exceeds the capacity
    assert (await store.charge([bucket()], 1)).buckets[0].remaining == 4


async def test_float_refill_lands_on_whole_tokens() -> None:
    # 0.1 s x 10/s is 0.9999999999999999 in floating point; it must still buy one token.
    clock = Clock()
    store = MemoryBucketStore(clock=clock)
    spec = bucket(capacity=1, rate=10)
    assert (await store.charge([spec], 1)).allowed
    for _ in range(20):
        clock.now += 0.1
        assert (await store.charge([spec], 1)).allowed


async def test_idle_buckets_are_forgotten() -> None:
    clock = Clock()
    store = MemoryBucketStore(clock=clock)
    for n in range(3000):
        await store.charge([bucket(n, capacity=2, rate=1)], 1)  # full again after 1 s
    assert 0 < len(store) <= 3000
    clock.now += 1 + TTL_MARGIN + 10  # past the margin and the periodic sweep
    await store.charge([bucket(99_999)], 1)
    assert len(store) == 1
    # A forgotten bucket reads as full, like an expired Redis key.
    assert (await store.charge([bucket(7, capacity=2, rate=1)], 1)).buckets[0].remaining == 1


async def test_memory_stays_bounded_under_many_identities() -> None:
    clock = Clock()
    store = MemoryBucketStore(clock=clock)
    peak = 0
    for n in range(50_000):
        clock.now += 0.001  # 1000 new identities a second, each idle after ~2 s
        await store.charge([bucket(n, capacity=2, rate=1)], 1)
        peak = max(peak, len(store))
    # ~2000 live buckets at any time; sweeps keep the table within ~2x that.
    assert peak <= 2 * 2100 + 1024


async def test_buckets_are_keyed_by_prefix_and_key() -> None:
    store = MemoryBucketStore()
    await store.start()
    assert store.ready
    spec = bucket(capacity=1)
    assert (await store.charge([spec], 1)).allowed
    assert not (await store.charge([spec], 1)).allowed
    await store.close()
    assert not store.ready and len(store) == 0


@pytest.mark.parametrize("cost", [0.5, 2.5])
async def test_fractional_costs(cost: float) -> None:
    clock = Clock()
    store = MemoryBucketStore(clock=clock)
    result = await store.charge([bucket(capacity=5, rate=1)], cost)
    assert result.buckets[0].remaining == 5 - cost
