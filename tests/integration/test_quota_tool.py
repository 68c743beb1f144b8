"""`authz quota show` and `authz quota reset` against real Redis topologies and real `authz
serve` processes: levels on Redis's clock, and a reset that reaches every replica's deny cache
within about a second."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from tests.support.authz_process import Proc, check_request, run, write_config
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisClusterNodes, RedisSentinels

QUOTA = """
default_plan: free
plans:
  free: {limits: [{name: per-minute, rate: 2, per: 1m}, {name: per-day, rate: 100, per: 1d}]}
  team:
    limits:
      - {name: per-minute, rate: 5, per: 1m}
      - {name: org-per-hour, rate: 3, per: 1h, scope: org}
"""


def configure(directory: Path, issuer: TestIssuer, store: dict[str, Any]) -> tuple[Path, int]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "quota.yaml").write_text(QUOTA)
    cfg = write_config(directory, issuer, store=store)
    data = yaml.safe_load(cfg.read_text())
    data["quota_file"] = "quota.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg, data["server"]["grpc_port"]


def status(port: int, token: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = pb_grpc.AuthorizationStub(ch).Check(check_request(token), timeout=5)
    return 200 if r.status.code == 0 else int(r.denied_response.status.code)


def quota(cfg: Path, *args: str) -> dict[str, Any]:
    r = run("quota", *args, "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def levels(report: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(b["plan"], b["limit"]): round(b["level"], 2) for b in report["buckets"]}


def test_show_and_reset_reach_every_replica(tmp_path: Path, issuer: TestIssuer,
                                            procs: list[Proc]) -> None:
    with RedisServer() as redis:
        ports = []
        for i in range(2):
            cfg, port = configure(tmp_path / f"svc{i}", issuer, {"redis_url": redis.url})
            p = Proc(["serve", "--config", str(cfg)], port)
            procs.append(p)
            ports.append(port)
        for p in procs:
            p.wait_serving()
        token = issuer.mint("hammer")
        who = ["--issuer", issuer.name, "--subject", "hammer"]
        assert [status(ports[i % 2], token) for i in range(4)] == [200, 200, 429, 429]
        shown = quota(cfg, "show", *who, "--plan", "free")
        assert levels(shown)[("free", "per-minute")] < 0.1
        assert levels(shown)[("free", "per-day")] == pytest.approx(98, abs=0.1)
        assert shown["applies"]["plan"] == "free"
        # Both replicas now answer 429 from their local deny caches ...
        for port in ports:
            assert status(port, token) == 429
        human = run("quota", "show", *who, "--config", str(cfg))
        assert "per-minute" in human.stdout and "2 per 1m" in human.stdout
        reset_at = time.monotonic()
        done = quota(cfg, "reset", *who)
        assert done["deleted"] == 2
        # ... and both allow again within about a second of the reset.
        recovered = {}
        while len(recovered) < 2:
            for port in ports:
                if port not in recovered and status(port, token) == 200:
                    recovered[port] = time.monotonic() - reset_at
            assert time.monotonic() - reset_at < 3, recovered
            time.sleep(0.05)
        print(f"\nreset seen by both replicas after {max(recovered.values()):.2f} s")
        assert max(recovered.values()) < 1.5
        after = quota(cfg, "show", *who, "--plan", "free")
        # refilled by the reset, then one request allowed on each replica
        assert levels(after)[("free", "per-day")] == pytest.approx(98, abs=0.1)


def test_shared_buckets_need_the_claim_and_reset_with_shared(tmp_path: Path,
                                                             issuer: TestIssuer,
                                                             procs: list[Proc]) -> None:
    with RedisServer() as redis:
        cfg, port = configure(tmp_path, issuer, {"redis_url": redis.url})
        p = Proc(["serve", "--config", str(cfg)], port)
        procs.append(p)
        p.wait_serving()
        alice = issuer.mint("alice", plan="team", org="acme")
        bob = issuer.mint("bob", plan="team", org="acme")
        assert [status(port, t) for t in (alice, alice, bob, bob)] == [200, 200, 200, 429]
        who = ["--issuer", issuer.name, "--subject", "bob", "--plan", "team"]
        blind = quota(cfg, "show", *who)
        assert blind["buckets"] == [] and "--claim org=VALUE" in blind["notes"][0]
        shown = quota(cfg, "show", *who, "--claim", "org=acme")
        assert levels(shown)[("team", "org-per-hour")] < 0.1
        assert levels(shown)[("team", "per-minute")] == pytest.approx(4, abs=0.1)
        assert {b["scope"] for b in shown["buckets"]} == {"", "org=acme"}
        # a reset of bob alone leaves the organisation's bucket empty
        quota(cfg, "reset", *who, "--claim", "org=acme")
        time.sleep(1.2)
        assert status(port, bob) == 429
        quota(cfg, "reset", *who, "--claim", "org=acme", "--shared")
        time.sleep(1.2)
        assert status(port, bob) == 200


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
def test_works_on_every_topology(tmp_path: Path, issuer: TestIssuer, topology: str) -> None:
    with (RedisClusterNodes() if topology == "cluster" else RedisSentinels()) as nodes:
        if isinstance(nodes, RedisClusterNodes):
            store = {"redis_mode": "cluster", "redis_url": nodes.url()}
        else:
            store = {"redis_mode": "sentinel", "sentinel_master": nodes.name,
                     "redis_url": f"redis://{nodes.sentinel_addresses()[0]}/0"}
        cfg, _port = configure(tmp_path, issuer, store)
        who = ["--issuer", issuer.name, "--subject", "nobody"]
        shown = quota(cfg, "show", *who, "--plan", "free")
        assert {b["stored"] for b in shown["buckets"]} == {False}  # never charged: full
        assert levels(shown)[("free", "per-minute")] == 2
        assert quota(cfg, "reset", *who)["deleted"] == 0


def test_in_memory_store_is_refused_clearly(tmp_path: Path, issuer: TestIssuer) -> None:
    cfg, _ = configure(tmp_path, issuer, {})
    r = run("quota", "show", "--issuer", "x", "--subject", "y", "--config", str(cfg))
    assert r.returncode == 2
    assert "store.redis_url: is empty: the in-memory store lives inside the serving" in r.stderr
    r = run("quota", "show", "--issuer", "x", "--subject", "y", "--config", str(cfg),
            "--claim", "nonsense")
    assert r.returncode == 2
