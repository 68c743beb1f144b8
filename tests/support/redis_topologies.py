"""Real Redis Cluster and Sentinel topologies for tests, on free loopback ports.

Started with the system's `redis-server` (a sentinel is `redis-server FILE --sentinel`, so no
redis-sentinel binary is needed), with the failover timings measured on this kind of machine:
- `RedisClusterNodes`: N masters with one replica each, `cluster-node-timeout 1000`,
  `repl-diskless-sync-delay 0` (start-up ~2 s instead of ~6 s); the slots are assigned and the
  nodes joined with CLUSTER commands (ADDSLOTSRANGE, MEET, REPLICATE), no redis-cli needed.
- `RedisSentinels`: one master, one replica, three sentinels with `down-after-milliseconds 1000`
  and `failover-timeout 3000`.
Both can kill a master (SIGKILL) and wait for Redis's own promotion, reporting how long it took.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from typing import Any

import redis

from tests.support.redis_server import RedisServer, Running, write_certificates

SLOTS = 16384
_CLUSTER_TIMEOUT = 30.0


def key_slot(key: str | bytes) -> int:
    """The hash slot of a key (CRC16 of its hash tag, or of the key), as Redis computes it."""
    from redis.crc import key_slot as slot

    return int(slot(key.encode() if isinstance(key, str) else key))


def cluster_port() -> int:
    """A free loopback port P with P + 10000 free too (the cluster bus), P <= 55535."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes(Running):
    def __init__(self, masters: int = 3, *, password: str | None = None, tls: bool = False,
                 full_coverage: bool = False, tmp: Path | None = None) -> None:
        """`full_coverage`: Redis's default `cluster-require-full-coverage yes` (healthy
        masters refuse commands while a shard has no master); our deploy guide recommends
        `no`, the default here."""
        self.password = password
        self.tls = tls
        certs = None
        if tls:
            import tempfile

            certs = Path(tempfile.mkdtemp(prefix="authz-certs-", dir=tmp))
            write_certificates(certs)
        self.certificates = certs
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0",
                 "--cluster-require-full-coverage", "yes" if full_coverage else "no"]
        if password:
            extra += ["--masterauth", password]
        if tls:
            extra += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        self.nodes = [RedisServer(password=password, tls=tls, extra_args=tuple(extra),
                                  certificates=certs, port=cluster_port())
                      for _ in range(masters * 2)]
        self.masters_wanted = masters

    # -- addresses -------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.nodes[0].ca_file

    def url(self, node: RedisServer | None = None) -> str:
        """A redis:// (or rediss://) URL of one node (a seed)."""
        n = node or self.nodes[0]
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{n.port}?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{n.port}"

    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes[:3]]

    def client(self, node: RedisServer) -> redis.Redis:
        return node.client()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> RedisClusterNodes:
        for n in self.nodes:
            n.start()
        masters = self.nodes[:self.masters_wanted]
        replicas = self.nodes[self.masters_wanted:]
        per = SLOTS // len(masters)
        for i, m in enumerate(masters):
            first = i * per
            last = SLOTS - 1 if i == len(masters) - 1 else first + per - 1
            with m.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with masters[0].client() as c:
            for n in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
        self._wait(lambda: all(len(self._known(n)) == len(self.nodes) for n in self.nodes))
        for m, r in zip(masters, replicas, strict=True):
            master_id = self.node_id(m)
            with r.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", master_id)
        self.wait_ok()
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    # -- state -----------------------------------------------------------------------------
    def node_id(self, node: RedisServer) -> str:
        with node.client() as c:
            return str(c.execute_command("CLUSTER", "MYID"))

    def _known(self, node: RedisServer) -> list[str]:
        with node.client() as c:
            return [line for line in str(c.execute_command("CLUSTER", "NODES")).splitlines()
                    if line and "handshake" not in line and "noaddr" not in line]

    def _info(self, node: RedisServer) -> dict[str, str]:
        with node.client() as c:
            text = c.execute_command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in str(text).split() if ":" in line)

    def masters(self) -> list[RedisServer]:
        """Running nodes that are masters owning slots, by their own view."""
        out = []
        for n in self.nodes:
            if not n.running:
                continue
            try:
                with n.client() as c:
                    role = c.execute_command("ROLE")[0]
                    nodes = str(c.execute_command("CLUSTER", "NODES"))
            except redis.RedisError:
                continue
            mine = next(line.split() for line in nodes.splitlines() if "myself" in line)
            if role in ("master", b"master") and len(mine) > 8:  # fields 9+: slot ranges
                out.append(n)
        return out

    def owner(self, slot: int) -> RedisServer:
        """The master that serves `slot`, as a running master sees it."""
        for n in self.masters():
            with n.client() as c:
                for start, end, master, *_replicas in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(x for x in self.nodes if x.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def wait_ok(self, timeout: float = _CLUSTER_TIMEOUT) -> float:
        """Wait until every running node says cluster_state:ok and every replica is in sync.
        Returns the seconds waited."""
        start = time.monotonic()

        def ok() -> bool:
            running = [n for n in self.nodes if n.running]
            for n in running:
                if self._info(n).get("cluster_state") != "ok":
                    return False
                with n.client() as c:
                    info = c.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            return len(self.masters()) == self.masters_wanted

        self._wait(ok, timeout)
        return time.monotonic() - start

    def kill_master(self, node: RedisServer) -> float:
        """SIGKILL a master; returns the monotonic time of the kill."""
        node.kill()
        return time.monotonic()

    def wait_promoted(self, killed: RedisServer, since: float,
                      timeout: float = _CLUSTER_TIMEOUT) -> float:
        """Seconds from `since` until a replica took over `killed`'s slots and every running
        node says cluster_state:ok again (Redis's own promotion, measured from outside)."""
        def promoted() -> bool:
            running = [n for n in self.nodes if n.running]
            return (len(self.masters()) == self.masters_wanted
                    and all(self._info(n).get("cluster_state") == "ok" for n in running))

        self._wait(promoted, timeout, interval=0.02)
        return time.monotonic() - since

    def migrate_slot(self, slot: int, source: RedisServer, target: RedisServer,
                     *, pause_before_node: float = 0.0) -> None:
        """Move one slot with its keys: IMPORTING/MIGRATING, one MIGRATE of all its keys (so
        no multi-key command ever sees half of them: that would be TRYAGAIN), then SETSLOT
        NODE on every master. Between the MIGRATE and the SETSLOT NODE the source answers ASK
        for the slot's keys; `pause_before_node` keeps that window open."""
        source_id, target_id = self.node_id(source), self.node_id(target)
        with target.client() as t:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        with source.client() as s:
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
                if not keys:
                    break
                auth = ["AUTH", self.password] if self.password else []
                s.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                  *auth, "KEYS", *keys)
        if pause_before_node:
            time.sleep(pause_before_node)
        for n in self.masters():
            with n.client() as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    @staticmethod
    def _wait(condition: Any, timeout: float = _CLUSTER_TIMEOUT, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except redis.RedisError as e:
                last = e
            time.sleep(interval)
        raise TimeoutError(f"cluster not ready within {timeout} s (last error: {last})")


class RedisSentinels(Running):
    """One master, one replica, three sentinels watching them as `name`."""

    def __init__(self, name: str = "authz", *, password: str | None = None,
                 sentinel_password: str | None = None, tls: bool = False,
                 tmp: Path | None = None) -> None:
        self.name = name
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        certs = None
        if tls:
            import tempfile

            certs = Path(tempfile.mkdtemp(prefix="authz-certs-", dir=tmp))
            write_certificates(certs)
        self.certificates = certs
        extra: tuple[str, ...] = ("--masterauth", password) if password else ()
        if tls:
            extra += ("--tls-replication", "yes")
        self.master = RedisServer(password=password, tls=tls, extra_args=extra,
                                  certificates=certs)
        self.replica = RedisServer(password=password, tls=tls, certificates=certs,
                                   extra_args=(*extra, "--replicaof", "127.0.0.1",
                                               str(self.master.port)))
        self.sentinels: list[RedisServer] = []
        for _ in range(3):
            conf = [f"sentinel monitor {name} 127.0.0.1 {self.master.port} 2",
                    f"sentinel down-after-milliseconds {name} 1000",
                    f"sentinel failover-timeout {name} 3000",
                    "sentinel resolve-hostnames no"]
            if password:
                conf.append(f"sentinel auth-pass {name} {password}")
            if tls:
                conf.append("tls-replication yes")
            self.sentinels.append(RedisServer(
                password=sentinel_password, tls=tls, certificates=certs, sentinel=True,
                config="\n".join(conf) + "\n"))

    @property
    def ca_file(self) -> Path:
        return self.master.ca_file

    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> RedisSentinels:
        self.master.start()
        self.replica.start()
        for s in self.sentinels:
            s.start()
        self._wait(lambda: self.replica_in_sync() and all(
            self._sentinel_sees(s) for s in self.sentinels))
        return self

    def replica_in_sync(self) -> bool:
        """The replica's link is up *and* the master lists it in ROLE. The two differ for a
        moment after a sync (the master counts a replica online once it first acknowledges),
        and the store reads ROLE to know how many replicas a write can wait for."""
        with self.replica.client() as c:
            if c.info("replication").get("master_link_status") != "up":
                return False
        with self.master.client() as c:
            role = c.execute_command("ROLE")
        return bool(role and role[0] in (b"master", "master") and len(role[2]) >= 1)

    def _sentinel_sees(self, s: RedisServer) -> bool:
        with s.client() as c:
            info = c.execute_command("SENTINEL", "MASTER", self.name)
        fields = dict(zip(info[::2], info[1::2], strict=False)) if isinstance(info, list) \
            else info
        return int(fields.get("num-slaves", 0)) >= 1 and int(fields.get("num-other-sentinels",
                                                                         0)) >= 2

    def master_port_by(self, s: RedisServer) -> int | None:
        with s.client() as c:
            addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(addr[1]) if addr else None

    def current_master(self) -> RedisServer:
        port = self.master_port_by(self.sentinels[0])
        return self.master if port == self.master.port else self.replica

    def kill_master(self) -> tuple[RedisServer, float]:
        m = self.current_master()
        m.kill()
        return m, time.monotonic()

    def wait_failover(self, killed: RedisServer, since: float, timeout: float = 30.0) -> float:
        """Seconds from `since` until every sentinel names the other node as master and it
        accepts writes."""
        other = self.replica if killed is self.master else self.master

        def done() -> bool:
            if not all(self.master_port_by(s) == other.port for s in self.sentinels):
                return False
            with other.client() as c:
                return bool(c.info("replication").get("role") == "master")

        self._wait(done, timeout, interval=0.02)
        return time.monotonic() - since

    def stop(self) -> None:
        for n in (*self.sentinels, self.replica, self.master):
            n.stop()

    _wait = staticmethod(RedisClusterNodes._wait)
