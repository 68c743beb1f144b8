"""The Redis store on a real Redis Cluster (3 masters, 3 replicas) and a real Sentinel setup
(master, replica, 3 sentinels): routing, failover, slot migration, exact accounting.

The behaviour suite (test_behaviour.py) runs on both topologies too; these are the tests only
a topology has. Failover and migration tests start topologies of their own, and print what they
measured (run with -s to see it): how long Redis took to promote a replica, and how long after
that the store allowed again.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from authz.buckets import RedisBucketStore
from authz.buckets.store import BucketSpec
from authz.buckets.transport.node import NodeClient
from authz.buckets.transport.topology import key_slot
from authz.config.redis_url import parse_redis_url
from authz.errors import StoreError
from tests.buckets.conftest import cluster_store, sentinel_store
from tests.support.redis_topologies import RedisClusterNodes, RedisSentinels

pytestmark = pytest.mark.slow

# Failover measurements: the store's bound per call, and how long after Redis's own promotion
# the first allow must come (the refresh runs every 100 ms; 2 s is the bar).
TIMEOUT = 0.2
RECOVERY_BOUND = 2.0


def bucket(identity: str, burst: float = 5, rate: float = 20) -> list[BucketSpec]:
    return [BucketSpec(f"{{{identity}}}:free:per-second", "per-second", burst, rate),
            BucketSpec(f"{{{identity}}}:free:per-day", "per-day", 1e9, 1e6)]


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes() as cluster:
        yield cluster


@pytest.fixture
def own_sentinels() -> Iterator[RedisSentinels]:
    with RedisSentinels() as topology:
        yield topology


@pytest.fixture
async def shared_cluster_store(redis_cluster: RedisClusterNodes
                               ) -> AsyncIterator[RedisBucketStore]:
    store = cluster_store(redis_cluster)
    await store.start(wait=True)
    yield store
    await store.close()


# -- routing ------------------------------------------------------------------------------

async def test_decisions_spread_over_all_masters(redis_cluster: RedisClusterNodes,
                                                 shared_cluster_store: RedisBucketStore) -> None:
    before = {}
    for m in redis_cluster.masters():
        with m.client() as c:
            before[m.port] = int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    identities = [uuid.uuid4().hex for _ in range(300)]
    results = await asyncio.gather(*(shared_cluster_store.charge(bucket(i), 1)
                                     for i in identities))
    assert all(r.allowed for r in results)
    calls = {}
    for m in redis_cluster.masters():
        with m.client() as c:
            now = int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        calls[m.port] = now - before[m.port]
    print(f"\nEVALSHA per master for 300 identities: {calls}")
    assert sum(calls.values()) == 300  # one call per decision, none redirected
    assert all(n > 50 for n in calls.values()), calls  # each master ~1/3 of them
    # Each identity's keys are on the master that owns its hash slot.
    for i in identities[:20]:
        owner = redis_cluster.owner(key_slot(f"{{{i}}}"))
        with owner.client() as c:
            assert c.exists(f"authz:{{{i}}}:free:per-second")


async def test_noscript_on_one_node_is_reloaded_there(redis_cluster: RedisClusterNodes,
                                                      shared_cluster_store: RedisBucketStore
                                                      ) -> None:
    identity = uuid.uuid4().hex
    owner = redis_cluster.owner(key_slot(f"{{{identity}}}"))
    assert (await shared_cluster_store.charge(bucket(identity), 1)).allowed
    with owner.client() as c:
        c.script_flush()
    loads = shared_cluster_store.stats.script_loads
    assert (await shared_cluster_store.charge(bucket(identity), 1)).allowed
    assert shared_cluster_store.stats.script_loads == loads + 1


async def test_a_replica_is_never_written_to(redis_sentinels: RedisSentinels) -> None:
    """A connection that must reach a master asks ROLE and refuses a replica."""
    replica = redis_sentinels.replica
    node = NodeClient(parse_redis_url(f"redis://127.0.0.1:{replica.port}/0"), scripts={},
                      timeout=0.5, expect_master=True)
    with pytest.raises(StoreError, match="not the master"):
        await node.start(wait=True)


# -- failover -----------------------------------------------------------------------------

@dataclass
class Load:
    """Each identity charged in a loop; what it was admitted, when, and what failed."""

    identities: list[str]
    admitted: dict[str, int] = field(default_factory=dict)
    sends: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[float]] = field(default_factory=dict)
    allowed_at: dict[str, list[float]] = field(default_factory=dict)
    slowest: float = 0.0
    unexpected: list[BaseException] = field(default_factory=list)

    async def run(self, store: RedisBucketStore, until: asyncio.Event) -> None:
        async def one(identity: str) -> None:
            specs = bucket(identity)
            while not until.is_set():
                t0 = time.monotonic()
                self.sends.setdefault(identity, []).append(t0)
                try:
                    result = await store.charge(specs, 1)
                except StoreError:
                    self.errors.setdefault(identity, []).append(t0)
                    await asyncio.sleep(0.01)
                    continue
                except BaseException as e:  # anything but a store error is a bug
                    self.unexpected.append(e)
                    return
                finally:
                    self.slowest = max(self.slowest, time.monotonic() - t0)
                if result.allowed:
                    self.admitted[identity] = self.admitted.get(identity, 0) + 1
                    self.allowed_at.setdefault(identity, []).append(time.monotonic())
                await asyncio.sleep(0.005)

        await asyncio.gather(*(one(i) for i in self.identities))

    def check_exact(self, burst: float = 5, rate: float = 20) -> None:
        for identity, n in self.admitted.items():
            sends = self.sends[identity]
            bound = math.ceil(burst + rate * (sends[-1] - sends[0]))
            assert n <= bound, (identity, n, bound)


async def _failover(store: RedisBucketStore, kill: object, wait_promoted: object,
                    identities: list[str], on_killed: set[str]) -> tuple[Load, float, float]:
    """Load, kill a master 1.5 s in, wait for Redis's promotion, load 3 s more. Returns the
    load, Redis's promotion time and the store's recovery time after it (seconds)."""
    load = Load(identities)
    until = asyncio.Event()
    runner = asyncio.create_task(load.run(store, until))
    await asyncio.sleep(1.5)
    killed_at = await asyncio.to_thread(kill)  # type: ignore[arg-type]
    promoted_after = await asyncio.to_thread(wait_promoted, killed_at)  # type: ignore[arg-type]
    promoted_at = killed_at + promoted_after
    await asyncio.sleep(3.0)
    until.set()
    await runner
    assert not load.unexpected, load.unexpected
    recovered = []
    for identity in on_killed:
        after = [t for t in load.allowed_at.get(identity, []) if t > promoted_at]
        assert after, f"{identity} never allowed again after the promotion"
        recovered.append(after[0] - promoted_at)
    return load, promoted_after, max(recovered)


async def test_cluster_master_killed_under_load(own_cluster: RedisClusterNodes) -> None:
    store = cluster_store(own_cluster, timeout=TIMEOUT, replica_acks=1)
    await store.start(wait=True)
    identities = [uuid.uuid4().hex for _ in range(30)]
    victim = own_cluster.owner(key_slot(f"{{{identities[0]}}}"))
    on_victim = {i for i in identities if own_cluster.owner(key_slot(f"{{{i}}}")) is victim}
    try:
        load, promoted, recovered = await _failover(
            store, lambda: own_cluster.kill_master(victim),
            lambda t: own_cluster.wait_promoted(victim, t), identities, on_victim)
    finally:
        await store.close()
    failed_elsewhere = {i: len(v) for i, v in load.errors.items() if i not in on_victim}
    print(f"\ncluster failover: Redis promoted a replica {promoted:.2f} s after the SIGKILL; "
          f"the store allowed again {recovered:.2f} s after that; "
          f"{sum(len(v) for v in load.errors.values())} decisions got the on_error answer "
          f"(all on the killed master's {len(on_victim)} identities); "
          f"slowest call {load.slowest * 1000:.0f} ms; "
          f"{sum(load.admitted.values())} admissions, none over burst + rate x elapsed")
    assert not failed_elsewhere, failed_elsewhere  # healthy masters kept answering
    assert recovered <= RECOVERY_BOUND
    assert load.slowest <= TIMEOUT + 0.15  # no decision waits past store.timeout
    load.check_exact()


async def test_sentinel_master_killed_under_load(own_sentinels: RedisSentinels) -> None:
    store = sentinel_store(own_sentinels, timeout=TIMEOUT, replica_acks=1)
    await store.start(wait=True)
    identities = [uuid.uuid4().hex for _ in range(20)]
    killed: list[object] = []

    def kill() -> float:
        node, at = own_sentinels.kill_master()
        killed.append(node)
        return at

    try:
        load, promoted, recovered = await _failover(
            store, kill, lambda t: own_sentinels.wait_failover(killed[0], t),  # type: ignore
            identities, set(identities))
    finally:
        await store.close()
    print(f"\nsentinel failover: the sentinels named the new master {promoted:.2f} s after the "
          f"SIGKILL; the store allowed again {recovered:.2f} s after that; "
          f"{sum(len(v) for v in load.errors.values())} decisions got the on_error answer; "
          f"slowest call {load.slowest * 1000:.0f} ms; {sum(load.admitted.values())} "
          "admissions, none over burst + rate x elapsed")
    assert recovered <= RECOVERY_BOUND
    assert load.slowest <= TIMEOUT + 0.15
    load.check_exact()


async def test_clusterdown_is_an_outage_then_recovers() -> None:
    """With Redis's default cluster-require-full-coverage yes, even healthy masters answer
    CLUSTERDOWN until the replica is promoted: those decisions get the on_error answer (never
    an exception, never an allow) and the store recovers by itself."""
    with RedisClusterNodes(full_coverage=True) as cluster:
        store = cluster_store(cluster, timeout=TIMEOUT)
        await store.start(wait=True)
        identities = [uuid.uuid4().hex for _ in range(20)]
        victim = cluster.owner(key_slot(f"{{{identities[0]}}}"))
        try:
            load, promoted, recovered = await _failover(
                store, lambda: cluster.kill_master(victim),
                lambda t: cluster.wait_promoted(victim, t), identities, set(identities))
        finally:
            await store.close()
    print(f"\nfull coverage: promoted after {promoted:.2f} s, all identities allowed again "
          f"{recovered:.2f} s later")
    assert recovered <= RECOVERY_BOUND
    load.check_exact()


async def test_slot_of_a_busy_identity_migrated_under_load(own_cluster: RedisClusterNodes
                                                           ) -> None:
    store = cluster_store(own_cluster, timeout=TIMEOUT)
    await store.start(wait=True)
    identity = uuid.uuid4().hex
    slot = key_slot(f"{{{identity}}}")
    source = own_cluster.owner(slot)
    target = next(m for m in own_cluster.masters() if m is not source)
    load = Load([identity])
    until = asyncio.Event()
    try:
        runner = asyncio.create_task(load.run(store, until))
        await asyncio.sleep(0.5)
        # MIGRATE moves the keys; for 1 s the source answers ASK, then SETSLOT makes it MOVED.
        await asyncio.to_thread(own_cluster.migrate_slot, slot, source, target,
                                pause_before_node=1.0)
        await asyncio.sleep(1.0)
        until.set()
        await runner
    finally:
        await store.close()
    assert not load.unexpected, load.unexpected
    assert not load.errors, {i: len(v) for i, v in load.errors.items()}
    assert store.stats.redirects >= 2  # at least one ASK, then one MOVED
    assert own_cluster.owner(slot) is target
    with target.client() as c:
        assert c.exists(f"authz:{{{identity}}}:free:per-second")
    print(f"\nslot {slot} moved under load: {store.stats.redirects} redirects followed, "
          f"{load.admitted.get(identity, 0)} admissions, no errors")
    load.check_exact()


# -- credentials and TLS ------------------------------------------------------------------

async def test_cluster_with_tls_and_a_password() -> None:
    with RedisClusterNodes(password="cl-secret", tls=True) as cluster:
        store = cluster_store(cluster)
        await store.start(wait=True)
        try:
            results = await asyncio.gather(*(store.charge(bucket(uuid.uuid4().hex), 1)
                                             for _ in range(30)))
            assert all(r.allowed for r in results)
            assert len(store.transport.masters) == 3  # type: ignore[union-attr]
        finally:
            await store.close()
        bad = RedisBucketStore(cluster.url().replace("cl-secret", "wrong"), mode="cluster")
        with pytest.raises(StoreError) as info:
            await bad.start(wait=True)
        assert "wrong" not in str(info.value)


async def test_sentinel_with_tls_and_its_own_password() -> None:
    with RedisSentinels(password="data-secret", sentinel_password="sentinel-secret",
                        tls=True) as topology:
        url = (f"rediss://:data-secret@{topology.sentinel_addresses()[0]}/0"
               f"?ssl_ca_certs={topology.ca_file}")
        store = RedisBucketStore(url, mode="sentinel", nodes=topology.sentinel_addresses()[1:],
                                 sentinel_master=topology.name,
                                 sentinel_password="sentinel-secret")
        await store.start(wait=True)
        try:
            assert (await store.charge(bucket(uuid.uuid4().hex), 1)).allowed
        finally:
            await store.close()
        no_sentinel_auth = RedisBucketStore(url, mode="sentinel", sentinel_master=topology.name)
        with pytest.raises(StoreError, match="no sentinel named the master"):
            await no_sentinel_auth.start(wait=True)


def _replication_state(topology: RedisSentinels) -> str:
    """The sentinels' master and that master's ROLE (the replica itself may be paused)."""
    parts = []
    for sentinel in topology.sentinels:
        with sentinel.client() as c:
            named = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", topology.name)
        parts.append(f"sentinel {sentinel.port} names {named}")
    with topology.master.client() as c:
        parts.append(f"master {topology.master.port} ROLE {c.execute_command('ROLE')}")
    parts.append(f"replica port {topology.replica.port}")
    return "; ".join(parts)


async def test_replica_acks_wait_for_a_connected_replica(own_sentinels: RedisSentinels
                                                         ) -> None:
    """With replica_acks 1 a write waits for the replica: a replica that stops acknowledging
    (paused: still connected, answering nothing) fails the decision (the on_error answer),
    never an admission that a failover could forget; once it answers, decisions go through."""
    store = sentinel_store(own_sentinels, timeout=TIMEOUT, replica_acks=1)
    await store.start(wait=True)
    try:
        identity = uuid.uuid4().hex
        assert (await store.charge(bucket(identity), 1)).allowed
        own_sentinels.replica.pause()
        try:
            # WAIT answers "0 replicas" at its timeout, or (Redis notices a blocked client's
            # timeout on its own 100 ms clock) the store's deadline passes first: a failure.
            try:
                result = await store.charge(bucket(identity), 1)
            except StoreError as e:
                assert re.search(r"reached 0 of 1 replica|did not answer", str(e)), e
            else:
                # Only a master that lists no replica (so the store waits for none) lets a
                # write through here: say what the topology looked like.
                pytest.fail(f"a write went through with the replica paused ({result}); "
                            f"{_replication_state(own_sentinels)}")
        finally:
            own_sentinels.replica.resume()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert (await store.charge(bucket(identity), 1)).allowed
                break
            except StoreError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        await store.close()


async def test_sentinel_switchover_demotes_the_master_under_load(own_sentinels: RedisSentinels
                                                                ) -> None:
    """SENTINEL FAILOVER: the master stays up but becomes a replica. Writes to it then get
    READONLY (or the connection is closed); the store asks the sentinels again and follows the
    new master, never writing to the demoted one."""
    store = sentinel_store(own_sentinels, timeout=TIMEOUT, replica_acks=1)
    await store.start(wait=True)
    identities = [uuid.uuid4().hex for _ in range(10)]
    load = Load(identities)
    until = asyncio.Event()
    old = own_sentinels.current_master()
    try:
        runner = asyncio.create_task(load.run(store, until))
        await asyncio.sleep(1.0)
        with own_sentinels.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", own_sentinels.name)
        switched = time.monotonic()
        await asyncio.to_thread(own_sentinels.wait_failover, old, switched)
        await asyncio.sleep(2.0)
        until.set()
        await runner
    finally:
        await store.close()
    assert not load.unexpected, load.unexpected
    new = own_sentinels.current_master()
    assert new is not old
    assert store.stats.topology_refreshes >= 2  # it asked the sentinels again
    for identity in identities:
        assert any(t > switched for t in load.allowed_at.get(identity, [])), identity
    deadline = time.monotonic() + 15  # the sentinels reconfigure the old master in their time
    while True:
        with old.client() as c:
            if c.info("replication")["role"] == "slave":
                break
        assert time.monotonic() < deadline, "the old master was never demoted"
        await asyncio.sleep(0.1)
    load.check_exact()


async def test_an_organisation_is_one_slot_and_shares_exactly(
        redis_cluster: RedisClusterNodes, shared_cluster_store: RedisBucketStore) -> None:
    """Team quotas on a real cluster: every key of an organisation's requests carries the
    organisation's hash tag, so the shared and the personal buckets are charged in one script
    call on one master; concurrent members never exceed the shared budget."""
    import yaml

    from authz.quota import parse_quota
    from authz.quota.resolve import Grant, Resolver
    from authz.tokens.identity import Identity
    from authz.tokens.verifier import identity_key

    quota = parse_quota(yaml.safe_load("""
default_plan: team
plans:
  team:
    limits:
      - {name: own, rate: 1000, per: 1s}
      - {name: org, rate: 0.0001, per: 1s, burst: 30, scope: org}
"""), "q")
    org = uuid.uuid4().hex
    resolver = Resolver(quota)
    grants = []
    for i in range(10):
        sub = f"member-{i}"
        ident = Identity("https://idp.test", sub, identity_key("https://idp.test", sub),
                         time.time() + 60, {"org": org})
        g = resolver.resolve(ident, "m")
        assert isinstance(g, Grant)
        grants.append(g)
    slots = {key_slot(b.key) for g in grants for b in g.buckets}
    assert len(slots) == 1  # one organisation, one slot
    results = await asyncio.gather(*(shared_cluster_store.charge(g.buckets, 1)
                                     for g in grants for _ in range(5)))
    assert sum(r.allowed for r in results) == 30  # exactly the shared burst
    owner = redis_cluster.owner(slots.pop())
    with owner.client() as c:
        assert c.exists(f"authz:{grants[0].buckets[1].key}")
