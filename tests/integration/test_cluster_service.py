"""Two `authz serve` processes on one real Redis Cluster: exact accounting across them, and a
master killed under their load answered without a single RPC error."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from authz.buckets.transport.topology import key_slot
from authz.tokens.verifier import identity_key
from tests.support.authz_process import Proc, check_request, write_config
from tests.support.issuer import TestIssuer
from tests.support.redis_topologies import RedisClusterNodes

pytestmark = pytest.mark.slow

BURST, RATE = 10, 20.0
QUOTA = (f"default_plan: free\nplans: {{free: {{limits: [{{name: s, rate: {RATE:g}, "
         f"burst: {BURST}}}]}}}}\n")


def start_two(tmp_path: Path, issuer: TestIssuer, cluster: RedisClusterNodes,
              procs: list[Proc]) -> list[int]:
    ports = []
    for i in range(2):
        d = tmp_path / f"svc{i}"
        d.mkdir()
        (d / "quota.yaml").write_text(QUOTA)
        cfg = write_config(d, issuer, store={
            "redis_mode": "cluster", "redis_url": cluster.url(), "timeout": "200ms",
            "redis_nodes": cluster.seeds()[1:], "replica_acks": 1})
        data = yaml.safe_load(cfg.read_text())
        data["quota_file"] = "quota.yaml"
        cfg.write_text(yaml.safe_dump(data))
        port = data["server"]["grpc_port"]
        p = Proc(["serve", "--config", str(cfg)], port)
        procs.append(p)
        ports.append(port)
    for p in procs:
        p.wait_serving()
    return ports


def hammer(ports: list[int], token: str, until: threading.Event,
           outcomes: list[tuple[float, str]]) -> None:
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    stubs = [pb_grpc.AuthorizationStub(c) for c in channels]
    try:
        i = 0
        while not until.is_set():
            sent = time.monotonic()
            try:
                r = stubs[i % 2].Check(check_request(token), timeout=5)
                outcome = "200" if r.status.code == 0 else str(r.denied_response.status.code)
            except grpc.RpcError as e:
                outcome = f"rpc_error {e.code().name}"
            outcomes.append((sent, outcome))
            i += 1
            time.sleep(0.002)
    finally:
        for c in channels:
            c.close()


def test_two_services_share_one_cluster_exactly(tmp_path: Path, issuer: TestIssuer,
                                                procs: list[Proc]) -> None:
    with RedisClusterNodes() as cluster:
        ports = start_two(tmp_path, issuer, cluster, procs)
        token = issuer.mint("shared-user")
        outcomes: list[tuple[float, str]] = []
        until = threading.Event()
        threads = [threading.Thread(target=hammer, args=(ports, token, until, outcomes))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        until.set()
        for t in threads:
            t.join(30)
    allowed = sum(1 for _, o in outcomes if o == "200")
    span = max(s for s, _ in outcomes) - min(s for s, _ in outcomes)
    assert {o for _, o in outcomes} <= {"200", "429"}, set(o for _, o in outcomes)
    assert allowed <= BURST + RATE * (span + 0.5)
    assert allowed >= BURST + RATE * span * 0.8  # both services admitted their share


def test_master_killed_under_two_services_no_rpc_error(tmp_path: Path, issuer: TestIssuer,
                                                       procs: list[Proc]) -> None:
    with RedisClusterNodes() as cluster:
        ports = start_two(tmp_path, issuer, cluster, procs)
        token = issuer.mint("failover-user")
        slot = key_slot("{" + identity_key(issuer.name, "failover-user") + "}")
        victim = cluster.owner(slot)
        outcomes: list[tuple[float, str]] = []
        until = threading.Event()
        threads = [threading.Thread(target=hammer, args=(ports, token, until, outcomes))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        killed = cluster.kill_master(victim)
        promoted = killed + cluster.wait_promoted(victim, killed)
        time.sleep(3.0)
        until.set()
        for t in threads:
            t.join(30)
    kinds = {o for _, o in outcomes}
    assert not [o for o in kinds if o.startswith("rpc_error")], kinds
    assert kinds <= {"200", "429", "503"}, kinds
    first_allow = min(s for s, o in outcomes if o == "200" and s > promoted)
    print(f"\ntwo services: promotion {promoted - killed:.2f} s after the kill, first allow "
          f"{first_allow - promoted:.2f} s after the promotion, "
          f"{sum(o == '503' for _, o in outcomes)} answers were 503 (store.on_error: deny), "
          f"0 RPC errors out of {len(outcomes)}")
    assert first_allow - promoted <= 2.0
    allowed = sum(1 for _, o in outcomes if o == "200")
    span = max(s for s, _ in outcomes) - min(s for s, _ in outcomes)
    assert allowed <= BURST + RATE * (span + 0.5)
