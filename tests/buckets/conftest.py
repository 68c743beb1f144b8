"""Fixtures for the bucket-store tests: a real redis-server and each store under test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from authz.buckets import DenyCache, MemoryBucketStore, RedisBucketStore
from authz.buckets.store import BucketStore
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterNodes, RedisSentinels

# Generous next to the 50 ms production default: CI machines stall; the timeout tests set
# their own small value.
TEST_TIMEOUT = 0.5


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by the tests that do not stop or pause it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_db(redis_server: RedisServer) -> RedisServer:
    """The shared server, emptied and with its command statistics reset."""
    with redis_server.client() as client:
        client.flushall()
        client.config_resetstat()
    return redis_server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for stopping, restarting and pausing."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def identity() -> str:
    """A fresh identity hash, so tests never share buckets."""
    return uuid.uuid4().hex


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A 3-master / 3-replica Redis Cluster shared by the tests that do not break it."""
    with RedisClusterNodes() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinels() -> Iterator[RedisSentinels]:
    """A master, a replica and three sentinels, shared by the tests that do not fail it over."""
    with RedisSentinels() as topology:
        yield topology


def cluster_store(cluster: RedisClusterNodes, **kwargs: Any) -> RedisBucketStore:
    return RedisBucketStore(cluster.url(), mode="cluster",
                            nodes=cluster.seeds()[1:], **{"timeout": TEST_TIMEOUT, **kwargs})


def sentinel_store(topology: RedisSentinels, **kwargs: Any) -> RedisBucketStore:
    return RedisBucketStore(f"redis://{topology.sentinel_addresses()[0]}/0", mode="sentinel",
                            nodes=topology.sentinel_addresses()[1:],
                            sentinel_master=topology.name,
                            **{"timeout": TEST_TIMEOUT, **kwargs})


@pytest.fixture(params=["memory", "redis", "deny-cache", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest, redis_db: RedisServer
                ) -> AsyncIterator[BucketStore]:
    """Every store behind the same BucketStore contract (the deny cache wraps Redis), the Redis
    one on every topology: one server, a Redis Cluster, a Sentinel-watched master."""
    kind = request.param
    s: BucketStore
    if kind == "memory":
        s = MemoryBucketStore()
    elif kind == "redis":
        s = RedisBucketStore(redis_db.url, timeout=TEST_TIMEOUT)
    elif kind == "cluster":
        s = cluster_store(request.getfixturevalue("redis_cluster"))
    elif kind == "sentinel":
        s = sentinel_store(request.getfixturevalue("redis_sentinels"))
    else:
        s = DenyCache(RedisBucketStore(redis_db.url, timeout=TEST_TIMEOUT))
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def redis_store(redis_db: RedisServer) -> AsyncIterator[RedisBucketStore]:
    s = RedisBucketStore(redis_db.url, timeout=TEST_TIMEOUT)
    await s.start()
    try:
        yield s
    finally:
        await s.close()
