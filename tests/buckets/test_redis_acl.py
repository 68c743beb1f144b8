"""The least-privilege Redis ACL users documented in deploy/README.md are enough for the store,
on every topology, and allow nothing more."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import redis as redis_py

from authz.buckets import RedisBucketStore
from authz.buckets.store import BucketSpec
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterNodes, RedisSentinels

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def documented_acls() -> dict[str, str]:
    """The ACL SETUSER lines of the deploy guide, keyed by the comment above each."""
    out: dict[str, str] = {}
    label = ""
    for raw in README.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# "):
            # "# sentinel: every sentinel (store....)" -> "sentinel:every sentinel"
            topology, _, what = line[2:].partition(":")
            label = topology if topology != "sentinel" else \
                f"sentinel:{what.split('(')[0].strip()}"
        elif line.startswith("ACL SETUSER authz"):
            out[label] = line.replace(">PASSWORD", ">s3cret")
    return out


ACLS = documented_acls()


def apply(server: RedisServer, line: str) -> None:
    with server.client() as admin:
        admin.execute_command(*line.split())


def assert_nothing_more(url: str) -> None:
    limited = redis_py.Redis.from_url(url)
    for command in (("GET", "other:key"), ("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*")):
        try:
            limited.execute_command(*command)
        except redis_py.exceptions.NoPermissionError:
            continue
        raise AssertionError(f"{command} was allowed")


def spec() -> list[BucketSpec]:
    return [BucketSpec(f"{{{uuid.uuid4().hex}}}:free:s", "s", 2, 1)]


def test_the_guide_documents_every_topology() -> None:
    assert set(ACLS) == {"standalone", "cluster", "sentinel:the master and its replicas",
                         "sentinel:every sentinel"}, ACLS


async def test_standalone_acl() -> None:
    with RedisServer() as server:
        apply(server, ACLS["standalone"])
        url = re.sub(r"^redis://", "redis://authz:s3cret@", server.url)
        store = RedisBucketStore(url, key_prefix="authz:")
        await store.start(wait=True)
        try:
            buckets = spec()
            assert (await store.charge(buckets, 1)).allowed
            with server.client() as admin:
                assert admin.exists("authz:" + buckets[0].key)
        finally:
            await store.close()
        assert_nothing_more(url)


async def test_cluster_acl_on_every_node() -> None:
    with RedisClusterNodes() as cluster:
        for node in cluster.nodes:
            apply(node, ACLS["cluster"])
        url = re.sub(r"^redis://", "redis://authz:s3cret@", cluster.url())
        store = RedisBucketStore(url, mode="cluster", replica_acks=1, timeout=0.5)
        await store.start(wait=True)
        try:
            results = [await store.charge(spec(), 1) for _ in range(30)]  # every shard
            assert all(r.allowed for r in results)
            assert len(store.transport.masters) == 3  # type: ignore[union-attr]
        finally:
            await store.close()
        assert_nothing_more(url)


@pytest.mark.slow
async def test_sentinel_acls() -> None:
    with RedisSentinels() as topology:
        for node in (topology.master, topology.replica):
            apply(node, ACLS["sentinel:the master and its replicas"])
        for sentinel in topology.sentinels:
            apply(sentinel, ACLS["sentinel:every sentinel"])
        url = f"redis://authz:s3cret@{topology.sentinel_addresses()[0]}/0"
        store = RedisBucketStore(url, mode="sentinel", nodes=topology.sentinel_addresses()[1:],
                                 sentinel_master=topology.name, sentinel_username="authz-sentinel",
                                 sentinel_password="s3cret", replica_acks=1, timeout=0.5)
        await store.start(wait=True)
        try:
            assert (await store.charge(spec(), 1)).allowed
        finally:
            await store.close()
        assert_nothing_more(f"redis://authz:s3cret@127.0.0.1:{topology.master.port}/0")
        # the sentinel user may ask where the master is, and nothing else
        limited = redis_py.Redis(port=topology.sentinels[0].port, username="authz-sentinel",
                                 password="s3cret")
        assert limited.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", topology.name)
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            limited.execute_command("SENTINEL", "RESET", "*")
