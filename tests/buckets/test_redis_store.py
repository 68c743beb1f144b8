"""What only the Redis store has: keys and TTLs, one EVALSHA per decision, pipelining, script
reloads, outages, URLs. Every test talks to a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanContext, TraceFlags
from redis.crc import key_slot

from authz.buckets import RedisBucketStore, StoreError
from authz.buckets.store import BucketSpec
from tests.support.redis_server import RedisServer, free_port

TEST_TIMEOUT = 0.5  # as in conftest: generous, CI machines stall


def spec(identity: str, limit: str = "per-minute", capacity: float = 10,
         rate: float = 1.0) -> BucketSpec:
    return BucketSpec(key=f"{{{identity}}}:free:{limit}", name=limit, capacity=capacity,
                      rate=rate)


def commandstats(server: RedisServer) -> dict[str, int]:
    with server.client() as client:
        stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def reset_stats(server: RedisServer) -> None:
    with server.client() as client:
        client.config_resetstat()


async def wait_until_ready(store: RedisBucketStore, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not store.ready:
        assert time.monotonic() < deadline, "the store did not reconnect by itself"
        await asyncio.sleep(0.02)


@pytest.fixture
async def store_on_own(own_redis: RedisServer) -> AsyncIterator[RedisBucketStore]:
    s = RedisBucketStore(own_redis.url, timeout=0.2)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


# -- keys ------------------------------------------------------------------------------------
async def test_keys_carry_the_prefix_and_hash_tag_and_a_ttl(
        redis_store: RedisBucketStore, redis_db: RedisServer, identity: str) -> None:
    result = await redis_store.charge([spec(identity, capacity=10, rate=2)], 4)
    assert result.buckets[0].reset_after == pytest.approx(2.0, abs=0.01)
    key = f"authz:{{{identity}}}:free:per-minute"
    with redis_db.client() as client:
        assert client.keys("*") == [key]
        # Time to refill (2 s) plus the 1 s margin.
        assert 2000 < client.pttl(key) <= 3000
    # The hash tag: every bucket of one identity maps to the identity's Redis Cluster slot.
    assert key_slot(key.encode()) == key_slot(identity.encode())


async def test_key_prefix_comes_from_settings(redis_db: RedisServer, identity: str) -> None:
    store = RedisBucketStore(redis_db.url, key_prefix="rl:")
    await store.start()
    try:
        await store.charge([spec(identity)], 1)
    finally:
        await store.close()
    with redis_db.client() as client:
        assert client.keys("*") == [f"rl:{{{identity}}}:free:per-minute"]


async def test_idle_buckets_vanish(redis_store: RedisBucketStore, redis_db: RedisServer,
                                   identity: str) -> None:
    # Full again after 0.1 s, so the key lives ~1.1 s (the 1 s margin).
    await redis_store.charge([spec(identity, capacity=2, rate=10)], 1)
    with redis_db.client() as client:
        assert client.dbsize() == 1
        deadline = time.monotonic() + 3.0
        while client.dbsize():
            assert time.monotonic() < deadline, "the idle bucket's key never expired"
            await asyncio.sleep(0.05)
    # An absent bucket is a full one.
    result = await redis_store.charge([spec(identity, capacity=2, rate=10)], 1)
    assert result.buckets[0].remaining == pytest.approx(1)


async def test_a_refusal_writes_nothing(redis_store: RedisBucketStore, redis_db: RedisServer,
                                        identity: str) -> None:
    bucket = spec(identity, capacity=1, rate=0.001)
    await redis_store.charge([bucket], 1)
    reset_stats(redis_db)
    assert not (await redis_store.charge([bucket], 1)).allowed
    assert "set" not in commandstats(redis_db)


# -- round trips and pipelining ----------------------------------------------------------------
async def test_one_evalsha_per_decision_whatever_the_number_of_limits(
        redis_store: RedisBucketStore, redis_db: RedisServer, identity: str) -> None:
    reset_stats(redis_db)
    batches = redis_store.stats.batches
    for n in (1, 2, 3, 5):
        await redis_store.charge([spec(identity, f"limit-{i}") for i in range(n)], 1)
    calls = commandstats(redis_db)
    assert calls.pop("evalsha") == 4
    # Inside the script: one TIME, then one GET and one SET per bucket. Nothing else reached
    # Redis from the store (no SCRIPT EXISTS, no EVAL); the rest is this test's own client.
    assert calls.pop("time") == 4
    assert calls.pop("get") == calls.pop("set") == 1 + 2 + 3 + 5
    assert set(calls) <= {"info", "config|resetstat", "hello", "client|setinfo"}
    assert redis_store.stats.batches - batches == 4


async def test_concurrent_charges_are_coalesced(redis_db: RedisServer) -> None:
    store = RedisBucketStore(redis_db.url, timeout=TEST_TIMEOUT,
                                           max_batch=64)
    await store.start()
    try:
        reset_stats(redis_db)
        results = await asyncio.gather(
            *(store.charge([spec(f"{i:032x}")], 1) for i in range(200)))
        assert all(r.allowed for r in results)
        # 200 charges made in one loop tick: ceil(200 / 64) pipelined writes.
        assert store.stats.batches == 4
        assert store.stats.batched_calls == store.stats.calls == 200
        assert commandstats(redis_db)["evalsha"] == 200
    finally:
        await store.close()


async def test_each_batch_is_one_span(redis_store: RedisBucketStore, identity: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    redis_store.tracer = provider.get_tracer("test")
    await asyncio.gather(*(redis_store.charge([spec(f"{identity}{i}")], 1) for i in range(10)))
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["redis.charge"]
    assert spans[0].attributes is not None
    assert spans[0].attributes["db.operation.batch.size"] == 10
    assert spans[0].attributes["db.system"] == "redis"


async def test_every_traced_caller_leads_to_its_batch_span(
        redis_store: RedisBucketStore, identity: str) -> None:
    """Ten checks coalesced into one write: the batch span is the child of the first and links
    to the nine others, so every check's trace reaches the Redis call that answered it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    redis_store.tracer = tracer

    async def traced_check(i: int) -> int:
        with tracer.start_as_current_span(f"check-{i}") as span:
            await redis_store.charge([spec(f"{identity}{i}")], 1)
            return span.get_span_context().span_id

    checks = set(await asyncio.gather(*(traced_check(i) for i in range(10))))
    [batch] = [s for s in exporter.get_finished_spans() if s.name == "redis.charge"]
    assert batch.parent is not None and batch.parent.span_id in checks
    linked = {link.context.span_id for link in batch.links}
    assert batch.parent.span_id not in linked  # the parent needs no link as well
    assert linked | {batch.parent.span_id} == checks
    assert len(batch.links) == 9


async def test_a_write_whose_callers_are_not_recorded_gets_no_span(
        redis_store: RedisBucketStore, identity: str) -> None:
    """Checks in a trace nobody records (a caller that is not sampled): no span for their
    write, even under a sampler that would record one."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    redis_store.tracer = provider.get_tracer("test")
    unsampled = trace.NonRecordingSpan(SpanContext(0x0AF7651916CD43DD8448EB211C80319C,
                                                   0xB7AD6B7169203331, True, TraceFlags(0)))
    with trace.use_span(unsampled):
        await asyncio.gather(*(redis_store.charge([spec(f"{identity}{i}")], 1)
                               for i in range(3)))
    assert exporter.get_finished_spans() == ()


async def test_a_cancelled_caller_does_not_disturb_the_others(
        redis_store: RedisBucketStore, identity: str) -> None:
    bucket = spec(identity, capacity=10, rate=0.001)
    task = asyncio.ensure_future(redis_store.charge([bucket], 1))
    others = [asyncio.ensure_future(redis_store.charge([bucket], 1)) for _ in range(3)]
    await asyncio.sleep(0)  # queued and written
    task.cancel()
    results = await asyncio.gather(*others)
    assert all(r.allowed for r in results)
    after = await redis_store.charge([bucket], 1)
    # The cancelled charge may or may not have reached Redis; the pipeline stayed in step.
    assert after.buckets[0].remaining == pytest.approx(5, abs=1.01)
    assert redis_store.stats.connects == 1


async def test_two_replicas_never_over_admit(redis_db: RedisServer, identity: str) -> None:
    """Two stores (two service replicas) on one identity: Redis's clock and atomic script
    keep the total within burst + rate x elapsed."""
    stores = [RedisBucketStore(redis_db.url, timeout=TEST_TIMEOUT) for _ in range(2)]
    for s in stores:
        await s.start()
    burst, rate, duration = 5, 50.0, 1.0
    bucket = spec(identity, "per-second", burst, rate)
    admitted = 0

    async def worker(store: RedisBucketStore) -> None:
        nonlocal admitted
        while time.monotonic() < stop_at:
            result = await store.charge([bucket], 1)
            admitted += result.allowed

    try:
        start = time.monotonic()
        stop_at = start + duration
        await asyncio.gather(*(worker(stores[i % 2]) for i in range(16)))
        outer = time.monotonic() - start
    finally:
        for s in stores:
            await s.close()
    assert burst + rate * duration * 0.9 <= admitted <= burst + rate * outer + 1


# -- scripts -----------------------------------------------------------------------------------
async def test_noscript_reloads_transparently(redis_store: RedisBucketStore,
                                              redis_db: RedisServer, identity: str) -> None:
    bucket = spec(identity, capacity=100, rate=0.001)
    assert (await redis_store.charge([bucket], 1)).allowed
    with redis_db.client() as client:
        client.script_flush()
    reset_stats(redis_db)
    # A whole batch meets NOSCRIPT: one SCRIPT LOAD, then every call retried after it.
    results = await asyncio.gather(*(redis_store.charge([bucket], 1) for _ in range(20)))
    assert all(r.allowed for r in results)
    assert min(r.buckets[0].remaining for r in results) == pytest.approx(79, abs=0.01)
    assert redis_store.stats.script_loads == 1
    calls = commandstats(redis_db)
    assert calls["script|load"] == 1
    assert calls["evalsha"] == 40  # 20 refused with NOSCRIPT, 20 retried
    assert redis_store.stats.errors == 0


async def test_a_bad_value_in_a_bucket_key_is_a_store_error(
        redis_store: RedisBucketStore, redis_db: RedisServer, identity: str) -> None:
    with redis_db.client() as client:
        client.set(f"authz:{{{identity}}}:free:garbage", "not a bucket")
        client.hset(f"authz:{{{identity}}}:free:hash", "a", "b")
    with pytest.raises(StoreError, match="unexpected value"):
        await redis_store.charge([spec(identity, "garbage")], 1)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await redis_store.charge([spec(identity, "hash")], 1)
    # Error replies keep the connection in step: it is still used.
    assert (await redis_store.charge([spec(identity)], 1)).allowed
    assert redis_store.stats.connects == 1


# -- outages -----------------------------------------------------------------------------------
async def test_redis_stopped_then_back(store_on_own: RedisBucketStore, own_redis: RedisServer,
                                       identity: str) -> None:
    store = store_on_own
    assert (await store.charge([spec(identity)], 1)).allowed
    own_redis.stop()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.charge([spec(identity)], 1)
        assert time.monotonic() - started < 0.2 + 0.1  # within the timeout
    assert not store.ready

    own_redis.start()  # same port, no data (persistence is off)
    await wait_until_ready(store)
    result = await store.charge([spec(identity)], 1)
    assert result.allowed and result.buckets[0].remaining == pytest.approx(9)


async def test_recovery_after_a_restart_is_under_a_second_by_design(
        store_on_own: RedisBucketStore, own_redis: RedisServer, identity: str) -> None:
    """Reconnect attempts back off to at most 250 ms (transport/node.py): however the restart
    falls between two attempts, Redis answering again means a decision succeeds within
    250 ms plus one connection set-up. Measured over restarts at different points of the
    backoff."""
    store = store_on_own
    assert (await store.charge([spec(identity)], 1)).allowed
    worst = 0.0
    for down_for in (0.06, 0.3, 1.2):  # early in the backoff, mid-way, at its cap
        own_redis.kill()
        await asyncio.sleep(down_for)
        own_redis.start()
        back = time.monotonic()
        while True:
            try:
                if (await store.charge([spec(identity)], 1)).allowed:
                    break
            except StoreError:
                await asyncio.sleep(0.005)
        worst = max(worst, time.monotonic() - back)
    print(f"\nslowest recovery after Redis answered again: {worst * 1000:.0f} ms")
    assert worst < 1.0


async def test_redis_paused_times_out_then_recovers(
        store_on_own: RedisBucketStore, own_redis: RedisServer, identity: str) -> None:
    store = store_on_own
    assert (await store.charge([spec(identity)], 1)).allowed
    own_redis.pause()
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"did not answer|not connected"):
                await store.charge([spec(identity)], 1)
            elapsed = time.monotonic() - started
            assert 0.15 < elapsed < 0.2 + 0.15, elapsed
        assert store.stats.timeouts == 1  # the connection in flight was dropped, not reused
    finally:
        own_redis.resume()
    await wait_until_ready(store)
    assert (await store.charge([spec(identity)], 1)).allowed
    assert store.stats.connects >= 2


async def test_close_then_charge_is_a_store_error(redis_db: RedisServer, identity: str) -> None:
    store = RedisBucketStore(redis_db.url)
    await store.start()
    assert store.ready
    await store.close()
    assert not store.ready
    with pytest.raises(StoreError, match="closed"):
        await store.charge([spec(identity)], 1)


# -- URLs and authentication -------------------------------------------------------------------
@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    with RedisServer(password="s3cret", extra_args=(
            "--user", "alice", "on", ">alice-pw", "~*", "+@all")) as server:
        yield server


@pytest.mark.parametrize("make_url", [
    lambda s: s.url,  # redis://:s3cret@127.0.0.1:port/0
    lambda s: f"redis://alice:alice-pw@127.0.0.1:{s.port}/2",
    lambda s: s.unix_url,  # unix:///.../redis.sock?password=s3cret
])
async def test_urls_with_credentials(password_redis: RedisServer, identity: str,
                                     make_url: Any) -> None:
    store = RedisBucketStore(make_url(password_redis))
    await store.start()
    try:
        assert (await store.charge([spec(identity)], 1)).allowed
    finally:
        await store.close()


async def test_db_number_is_selected(password_redis: RedisServer, identity: str) -> None:
    store = RedisBucketStore(f"redis://alice:alice-pw@127.0.0.1:{password_redis.port}/3")
    await store.start()
    try:
        await store.charge([spec(identity)], 1)
    finally:
        await store.close()
    with password_redis.client() as client:
        client.select(3)
        assert client.exists(f"authz:{{{identity}}}:free:per-minute")


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:6379", "must start with redis://"),
    ("127.0.0.1:6379", "must start with redis://"),
    ("redis://", "no host"),
    ("redis://127.0.0.1:6379/0?frobnicate=1", "unsupported option"),
    ("redis://127.0.0.1:6379/zero", "names the database: a number"),
    ("redis://127.0.0.1:6379?db=-1", "db must be a number"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "TLS options need rediss://"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes", "ssl_cert_reqs must be"),
    ("unix://", "no socket path"),
    ("unix:///nonexistent/redis.sock", "cannot connect"),
    ("redis://127.0.0.1:{free}/0", "cannot connect to Redis at redis://127.0.0.1"),
])
async def test_bad_urls_fail_at_start_with_a_clear_message(url: str, message: str) -> None:
    store = RedisBucketStore(url.format(free=free_port()))
    with pytest.raises(StoreError, match=message):
        await store.start(wait=True)
    assert not store.ready


async def test_unreachable_at_start_is_an_outage_not_a_failure() -> None:
    """Redis down when the service starts: charges fail (so store.on_error applies), `ready`
    stays False, and the store connects by itself once Redis is there."""
    port = free_port()
    store = RedisBucketStore(f"redis://127.0.0.1:{port}/0",
                                           timeout=0.1)
    await store.start()
    try:
        assert not store.ready
        with pytest.raises(StoreError):
            await store.charge([BucketSpec("{x}:p:l", "l", 5, 1)], 1)
        server = RedisServer(port=port).start()
        try:
            deadline = time.monotonic() + 10
            while not store.ready:
                assert time.monotonic() < deadline, "never connected"
                await asyncio.sleep(0.05)
            assert (await store.charge([BucketSpec("{x}:p:l", "l", 5, 1)], 1)).allowed
        finally:
            server.stop()
    finally:
        await store.close()


@pytest.mark.parametrize("make_url", [
    lambda s: f"redis://:wrong@127.0.0.1:{s.port}/0",
    lambda s: f"redis://127.0.0.1:{s.port}/0",
])
async def test_wrong_credentials_fail_at_start_without_leaking_them(
        password_redis: RedisServer, make_url: Any) -> None:
    store = RedisBucketStore(make_url(password_redis))
    with pytest.raises(StoreError, match="refused the connection setup") as info:
        await store.start(wait=True)
    assert "wrong" not in str(info.value).replace("WRONGPASS", "")


async def test_unanswering_redis_fails_within_the_connect_timeout() -> None:
    # A paused (SIGSTOP) server accepts the TCP connection in the kernel but never answers
    # the handshake: the connect attempt must still end within its bound. Loopback only.
    server = RedisServer().start()
    try:
        server.pause()
        store = RedisBucketStore(server.url, connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"127\.0\.0\.1"):
            await store.start(wait=True)
        assert time.monotonic() - started < 1.0
    finally:
        server.resume()
        server.stop()


# -- TLS -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    with RedisServer(tls=True) as server:
        yield server


@pytest.mark.parametrize("make_url", [
    lambda s: s.url,  # rediss://127.0.0.1:port/0?ssl_ca_certs=<the test CA>
    lambda s: f"rediss://127.0.0.1:{s.port}/0?ssl_cert_reqs=none",
])
async def test_rediss(tls_redis: RedisServer, identity: str, make_url: Any) -> None:
    store = RedisBucketStore(make_url(tls_redis))
    await store.start()
    try:
        assert (await store.charge([spec(identity)], 1)).allowed
    finally:
        await store.close()


async def test_rediss_verifies_the_certificate(tls_redis: RedisServer) -> None:
    # The system trust store does not know the test CA.
    store = RedisBucketStore(f"rediss://127.0.0.1:{tls_redis.port}/0")
    with pytest.raises(StoreError, match="certificate verify failed"):
        await store.start(wait=True)


# -- uvloop (what the service runs on) ----------------------------------------------------------
def test_works_on_uvloop(redis_db: RedisServer, identity: str) -> None:
    import uvloop

    async def scenario() -> None:
        store = RedisBucketStore(redis_db.url, timeout=TEST_TIMEOUT)
        await store.start()
        try:
            results = await asyncio.gather(
                *(store.charge([spec(identity, capacity=30, rate=0.001)], 1) for _ in range(40)))
            assert sum(r.allowed for r in results) == 30
            assert store.stats.batches == 1
        finally:
            await store.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_a_replica_is_left_for_a_new_connection(redis_server: RedisServer,
                                                      identity: str) -> None:
    """READONLY (the URL now points at a replica, e.g. after a failover): a StoreError, and
    the connection is replaced so the next one can reach the new primary."""
    with RedisServer(extra_args=("--replicaof", "127.0.0.1", str(redis_server.port))) as replica:
        store = RedisBucketStore(replica.url, timeout=TEST_TIMEOUT)
        await store.start()
        try:
            with pytest.raises(StoreError, match="READONLY"):
                await store.charge([spec(identity)], 1)
            await wait_until_ready(store)
            assert store.stats.connects == 2
        finally:
            await store.close()
