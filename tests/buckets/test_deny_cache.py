"""The deny cache around the Redis store: refusals answered locally until their retry time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from authz.buckets import DenyCache, MemoryBucketStore, RedisBucketStore, StoreError
from authz.buckets.store import BucketSpec
from tests.support.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(identity: str, limit: str = "per-minute", capacity: float = 1,
         rate: float = 0.01) -> BucketSpec:
    return BucketSpec(key=f"{{{identity}}}:free:{limit}", name=limit, capacity=capacity,
                      rate=rate)


def evalsha_calls(server: RedisServer) -> int:
    with server.client() as client:
        stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cache(redis_db: RedisServer, clock: Clock) -> AsyncIterator[DenyCache]:
    c = DenyCache(RedisBucketStore(redis_db.url, timeout=0.5),
                  max_entries=3, max_hold=50.0, clock=clock)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def test_a_refused_identity_costs_no_round_trip_until_its_retry_time(
        cache: DenyCache, redis_db: RedisServer, clock: Clock, identity: str) -> None:
    bucket = spec(identity, capacity=1, rate=0.1)  # next token in 10 s
    assert (await cache.charge([bucket], 1)).allowed
    first = await cache.charge([bucket], 1)
    assert not first.allowed
    calls = evalsha_calls(redis_db)

    clock.now += 4
    local = await cache.charge([bucket], 1)
    assert evalsha_calls(redis_db) == calls  # answered from memory
    assert cache.hits == 1
    assert not local.allowed
    assert local.retry_after == pytest.approx(first.retry_after - 4)
    assert local.buckets[0].remaining == pytest.approx(first.buckets[0].remaining + 0.4)
    assert local.buckets[0].reset_after == pytest.approx(first.buckets[0].reset_after - 4)

    clock.now += 6.1  # past the retry time: ask Redis again
    await cache.charge([bucket], 1)
    assert evalsha_calls(redis_db) == calls + 1


async def test_after_the_real_retry_time_redis_admits_again(
        redis_db: RedisServer, identity: str) -> None:
    cache = DenyCache(RedisBucketStore(redis_db.url, timeout=0.5))
    await cache.start()
    try:
        bucket = spec(identity, capacity=1, rate=20)
        assert (await cache.charge([bucket], 1)).allowed
        refused = await cache.charge([bucket], 1)
        assert not refused.allowed
        assert not (await cache.charge([bucket], 1)).allowed
        await asyncio.sleep(refused.retry_after + 0.02)
        assert (await cache.charge([bucket], 1)).allowed
    finally:
        await cache.close()


async def test_only_the_identical_charge_is_refused_locally(
        cache: DenyCache, redis_db: RedisServer, identity: str) -> None:
    short = spec(identity, "short", capacity=2)
    other = spec(identity, "other", capacity=5)
    await cache.charge([short], 2)
    assert not (await cache.charge([short], 2)).allowed
    calls = evalsha_calls(redis_db)
    await cache.charge([short], 1)  # another cost
    await cache.charge([short, other], 2)  # another set of buckets
    await cache.charge([other], 2)
    # Same key, new capacity (a quota reload): not the refused charge.
    await cache.charge([spec(identity, "short", capacity=9)], 2)
    assert evalsha_calls(redis_db) == calls + 4
    assert cache.hits == 0


async def test_admissions_are_never_cached(cache: DenyCache, redis_db: RedisServer,
                                           identity: str) -> None:
    bucket = spec(identity, capacity=10)
    for _ in range(3):
        assert (await cache.charge([bucket], 1)).allowed
    assert len(cache) == 0
    assert evalsha_calls(redis_db) >= 3


async def test_size_is_bounded(cache: DenyCache) -> None:
    for n in range(10):
        bucket = spec(f"{n:032x}", capacity=1)
        await cache.charge([bucket], 1)
        assert not (await cache.charge([bucket], 1)).allowed
    assert len(cache) == 3  # max_entries


async def test_hold_is_capped_and_clear_forgets(cache: DenyCache, redis_db: RedisServer,
                                                clock: Clock, identity: str) -> None:
    bucket = spec(identity, capacity=1, rate=0.001)  # retry in ~1000 s
    await cache.charge([bucket], 1)
    await cache.charge([bucket], 1)
    calls = evalsha_calls(redis_db)
    clock.now += 49
    await cache.charge([bucket], 1)
    assert evalsha_calls(redis_db) == calls
    clock.now += 2  # past max_hold (50 s), long before the retry time
    await cache.charge([bucket], 1)
    assert evalsha_calls(redis_db) == calls + 1
    cache.clear()
    await cache.charge([bucket], 1)
    assert evalsha_calls(redis_db) == calls + 2


async def test_store_errors_pass_through_and_are_not_cached(identity: str) -> None:
    own = RedisServer().start()
    cache = DenyCache(RedisBucketStore(own.url, timeout=0.2))
    try:
        await cache.start()
        own.stop()
        for _ in range(2):
            with pytest.raises(StoreError):
                await cache.charge([spec(identity)], 1)
        assert len(cache) == 0
    finally:
        own.stop()
        await cache.close()


async def test_wraps_the_memory_store_too(clock: Clock, identity: str) -> None:
    cache = DenyCache(MemoryBucketStore(clock=clock), clock=clock)
    await cache.start()
    assert cache.ready
    bucket = spec(identity, capacity=1, rate=1)
    assert (await cache.charge([bucket], 1)).allowed
    assert not (await cache.charge([bucket], 1)).allowed
    assert not (await cache.charge([bucket], 1)).allowed
    assert cache.hits == 1
    clock.now += 1
    assert (await cache.charge([bucket], 1)).allowed
    await cache.close()
