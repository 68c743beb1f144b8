"""The BucketStore contract, run against every store (memory, Redis, deny cache over Redis).

Clocks are real here (Redis has its own), so refill tests use rates where a few milliseconds of
scheduling noise cannot change the outcome, and arithmetic tests use rates slow enough that
refill between two calls is far below the tolerance.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from authz.buckets import DenyCache
from authz.buckets.store import BucketSpec, BucketStore

# Refill while a test runs stays below 1e-3 tokens at this rate (a test takes < 1 s).
SLOW = 0.0001
APPROX = 1e-3


def spec(identity: str, limit: str, capacity: float, rate: float) -> BucketSpec:
    return BucketSpec(key=f"{{{identity}}}:free:{limit}", name=limit, capacity=capacity,
                      rate=rate)


async def test_admits_the_burst_then_refuses(store: BucketStore, identity: str) -> None:
    bucket = spec(identity, "per-minute", 5, SLOW)
    for expected_left in (4, 3, 2, 1, 0):
        result = await store.charge([bucket], 1)
        assert result.allowed
        assert result.retry_after == 0
        assert result.buckets[0].remaining == pytest.approx(expected_left, abs=APPROX)
    refused = await store.charge([bucket], 1)
    assert not refused.allowed
    assert refused.buckets[0].remaining == pytest.approx(0, abs=APPROX)
    # One token at SLOW tokens/s.
    assert refused.retry_after == pytest.approx(1 / SLOW, rel=1e-2)


async def test_refills_at_its_rate(store: BucketStore, identity: str) -> None:
    bucket = spec(identity, "per-second", 2, 10)  # one token every 100 ms
    assert (await store.charge([bucket], 1)).allowed
    assert (await store.charge([bucket], 1)).allowed
    refused = await store.charge([bucket], 1)
    assert not refused.allowed
    assert 0 < refused.retry_after <= 0.1
    await asyncio.sleep(refused.retry_after + 0.02)
    assert (await store.charge([bucket], 1)).allowed
    # The refilled token is spent; the next one is ~100 ms away.
    again = await store.charge([bucket], 1)
    assert not again.allowed
    assert again.retry_after > 0.05


async def test_all_or_none(store: BucketStore, identity: str) -> None:
    roomy = spec(identity, "per-day", 10, SLOW)
    short = spec(identity, "per-second", 1, SLOW)
    first = await store.charge([roomy, short], 1)
    assert first.allowed
    assert [b.remaining for b in first.buckets] == pytest.approx([9, 0], abs=APPROX)

    refused = await store.charge([roomy, short], 1)
    assert not refused.allowed
    # The short bucket refused, so the roomy one was not charged either.
    assert refused.buckets[0].remaining == pytest.approx(9, abs=APPROX)
    assert refused.buckets[0].retry_after == 0
    assert refused.buckets[1].retry_after == pytest.approx(1 / SLOW, rel=1e-2)
    assert refused.retry_after == refused.buckets[1].retry_after

    alone = await store.charge([roomy], 1)
    assert alone.allowed
    assert alone.buckets[0].remaining == pytest.approx(8, abs=APPROX)


async def test_cost_above_one(store: BucketStore, identity: str) -> None:
    rate = 0.01
    bucket = spec(identity, "tokens", 5, rate)
    first = await store.charge([bucket], 3)
    assert first.allowed
    assert first.buckets[0].remaining == pytest.approx(2, abs=APPROX)
    refused = await store.charge([bucket], 3)
    assert not refused.allowed
    assert refused.buckets[0].remaining == pytest.approx(2, abs=APPROX)
    # One more token is needed.
    assert refused.retry_after == pytest.approx(1 / rate, rel=1e-2)
    assert (await store.charge([bucket], 2)).allowed


async def test_remaining_reset_after_retry_after(store: BucketStore, identity: str) -> None:
    rate = 0.5
    bucket = spec(identity, "per-minute", 10, rate)
    result = await store.charge([bucket], 4)
    state = result.buckets[0]
    assert (state.name, state.capacity) == ("per-minute", 10)
    assert state.remaining == pytest.approx(6, abs=0.01)
    assert state.reset_after == pytest.approx(4 / rate, abs=0.05)  # 4 tokens to refill
    assert state.retry_after == 0  # 6 left >= cost 4
    result = await store.charge([bucket], 4)
    state = result.buckets[0]
    assert result.allowed
    assert state.remaining == pytest.approx(2, abs=0.01)
    assert state.reset_after == pytest.approx(8 / rate, abs=0.05)
    # After this charge the bucket holds 2 < 4: two tokens until the next one could pass.
    assert state.retry_after == pytest.approx(2 / rate, abs=0.05)


async def test_results_keep_the_order_of_the_specs(store: BucketStore, identity: str) -> None:
    specs = [spec(identity, f"limit-{i}", 10 + i, SLOW) for i in range(4)]
    result = await store.charge(specs, 1)
    assert [b.name for b in result.buckets] == [s.name for s in specs]
    assert [b.remaining for b in result.buckets] == pytest.approx([9, 10, 11, 12], abs=APPROX)


async def test_no_buckets_means_allowed(store: BucketStore) -> None:
    result = await store.charge([], 1)
    assert result.allowed and result.buckets == () and result.retry_after == 0


async def test_buckets_of_different_identities_are_independent(store: BucketStore) -> None:
    a, b = spec("a" * 32, "l", 1, SLOW), spec("b" * 32, "l", 1, SLOW)
    assert (await store.charge([a], 1)).allowed
    assert not (await store.charge([a], 1)).allowed
    assert (await store.charge([b], 1)).allowed


@pytest.mark.parametrize(("capacity", "rate", "cost", "message"), [
    (5, 1, 6, "capacity"),  # can never be admitted
    (5, 1, -1, "cost"),
    (5, 1, math.nan, "cost"),
    (5, 1, math.inf, "cost"),
    (5, 0, 1, "rate"),
    (math.nan, 1, 1, "capacity"),
])
async def test_impossible_charges_are_refused_clearly(
        store: BucketStore, identity: str, capacity: float, rate: float, cost: float,
        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await store.charge([spec(identity, "l", capacity, rate)], cost)


async def test_duplicate_keys_are_refused(store: BucketStore, identity: str) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        await store.charge([spec(identity, "l", 5, 1), spec(identity, "l", 9, 1)], 1)


async def test_concurrent_charges_never_over_admit(store: BucketStore, identity: str) -> None:
    """Many concurrent charges for one identity over ~2 s admit exactly burst + rate x time.

    The store's clock runs between the first and the last charge it processed; that span lies
    inside [outer] (first request sent .. last reply received) and contains [inner] (first
    reply received .. last request sent), so the count is bounded on both sides.
    """
    burst, rate, duration, workers = 10, 100.0, 2.0, 32
    bucket = spec(identity, "per-second", burst, rate)
    admitted = 0
    first_reply: float | None = None
    last_send = 0.0

    async def worker() -> None:
        nonlocal admitted, first_reply, last_send
        while True:
            now = time.monotonic()
            if now >= stop_at:
                return
            last_send = max(last_send, now)
            result = await store.charge([bucket], 1)
            if first_reply is None:
                first_reply = time.monotonic()
            admitted += result.allowed
            # The memory store never yields by itself; let the other workers run.
            await asyncio.sleep(0)

    outer_start = time.monotonic()
    stop_at = outer_start + duration
    await asyncio.gather(*(worker() for _ in range(workers)))
    outer = time.monotonic() - outer_start
    assert first_reply is not None
    inner = last_send - first_reply

    assert admitted <= math.ceil(burst + rate * outer), (admitted, inner, outer)
    floor = math.floor(burst + rate * inner)
    if isinstance(store, DenyCache):
        # A cached refusal expires on the local clock, a fraction of a round trip after the
        # token is back in Redis: the cache may admit slightly less, never more.
        floor = math.floor(floor * 0.98)
    assert admitted >= floor, (admitted, inner, outer)


def shadow_spec(identity: str, limit: str, capacity: float, rate: float) -> BucketSpec:
    return BucketSpec(key=f"{{{identity}}}:free:{limit}", name=limit, capacity=capacity,
                      rate=rate, shadow=True)


async def test_a_shadow_bucket_never_refuses_and_evolves_as_enforced(
        store: BucketStore, identity: str) -> None:
    """Shadow mode: the would-be refusals are flagged, not refused; the bucket is charged only
    when enforcement would have admitted, so its level is enforcement's."""
    shadow = shadow_spec(identity, "per-minute", 3, SLOW)
    for expected_left in (2, 1, 0):
        r = await store.charge([shadow], 1)
        assert r.allowed and not r.shadow_refused
        assert r.buckets[0].remaining == pytest.approx(expected_left, abs=APPROX)
    for _ in range(3):
        r = await store.charge([shadow], 1)
        assert r.allowed and r.shadow_refused  # enforcement would have said 429 ...
        assert r.buckets[0].remaining == pytest.approx(0, abs=APPROX)  # ... and charged nothing
        assert r.retry_after == pytest.approx(1 / SLOW, rel=1e-2)  # the would-be Retry-After


async def test_enforced_limits_hold_beside_a_short_shadow_limit(store: BucketStore,
                                                                identity: str) -> None:
    enforced = spec(identity, "per-day", 4, SLOW)
    shadow = shadow_spec(identity, "per-second", 2, SLOW)
    results = [await store.charge([enforced, shadow], 1) for _ in range(5)]
    assert [(r.allowed, r.shadow_refused) for r in results] == [
        (True, False), (True, False),   # both have tokens: both charged
        (True, True), (True, True),     # the shadow one is out: allowed, enforced one charged
        (False, False)]                 # the enforced one is out: a real refusal
    assert results[3].buckets[0].remaining == pytest.approx(0, abs=APPROX)
    assert results[3].buckets[1].remaining == pytest.approx(0, abs=APPROX)
    refused = results[4]
    assert refused.retry_after == pytest.approx(1 / SLOW, rel=1e-2)


async def test_a_cost_above_a_shadow_buckets_capacity_is_a_would_be_refusal(
        store: BucketStore, identity: str) -> None:
    """A body-priced request can cost more than a shadow limit's whole burst: allowed, flagged,
    nothing taken from the shadow bucket; the enforced one is charged."""
    enforced = spec(identity, "big", 100, SLOW)
    shadow = shadow_spec(identity, "small", 5, SLOW)
    r = await store.charge([enforced, shadow], 8)
    assert r.allowed and r.shadow_refused
    assert [b.remaining for b in r.buckets] == pytest.approx([92, 5], abs=APPROX)
    assert r.retry_after == pytest.approx(3 / SLOW, rel=1e-2)  # 8 - 5 tokens short


async def test_a_per_request_bucket_counts_requests_not_cost(store: BucketStore,
                                                             identity: str) -> None:
    """10 requests/s and 50 tokens beside each other: a 20-token request takes 1 and 20."""
    requests = BucketSpec(key=f"{{{identity}}}:free:rps", name="rps", capacity=3, rate=SLOW,
                          per_request=True)
    tokens = spec(identity, "tokens", 50, SLOW)
    r = await store.charge([requests, tokens], 20)
    assert r.allowed
    assert [b.remaining for b in r.buckets] == pytest.approx([2, 30], abs=APPROX)
    r = await store.charge([requests, tokens], 20)
    assert [b.remaining for b in r.buckets] == pytest.approx([1, 10], abs=APPROX)
    refused = await store.charge([requests, tokens], 20)  # 10 tokens left: all or none
    assert not refused.allowed
    assert [b.remaining for b in refused.buckets] == pytest.approx([1, 10], abs=APPROX)
    assert (await store.charge([requests, tokens], 10)).allowed  # the last request
    assert not (await store.charge([requests, tokens], 1)).allowed  # no request left
