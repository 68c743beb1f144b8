"""Ports are bound exclusively: a second `authz serve` on a busy port exits 2 naming it instead
of quietly taking half the connections; `--workers N` shares one port among its own workers
only. Real processes, real sockets."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from tests.support.authz_process import Proc, check_request, children, run, write_config
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer, free_port


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def serving_answers(port: int, token: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = pb_grpc.AuthorizationStub(ch).Check(check_request(token), timeout=5)
    return r.status.code == 0


def test_second_server_on_the_grpc_port_exits_2(tmp_path: Path, issuer: TestIssuer,
                                                procs: list[Proc]) -> None:
    cfg = write_config(tmp_path, issuer)
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    first = Proc(["serve", "--config", str(cfg)], port)
    procs.append(first)
    first.wait_serving()
    r = run("serve", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and f"server.grpc_port {port}" in r.stderr
    # the first one still has every connection
    for i in range(20):  # new connections every time: none lands on a second listener
        assert serving_answers(port, issuer.mint(f"one-{i}"))


def test_second_server_on_the_metrics_port_exits_2(tmp_path: Path, issuer: TestIssuer,
                                                   procs: list[Proc]) -> None:
    metrics = free_port()
    cfg = write_config(tmp_path, issuer, server={"metrics_port": metrics})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    first = Proc(["serve", "--config", str(cfg)], port)
    procs.append(first)
    first.wait_serving()
    r = run("serve", "--config", str(cfg), "--grpc-port", str(free_port()))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"127.0.0.1:{metrics}" in r.stderr


def test_workers_share_their_port_and_nobody_else_does(
        tmp_path: Path, issuer: TestIssuer, procs: list[Proc], redis: RedisServer) -> None:
    cfg = write_config(tmp_path, issuer, server={"workers": 2}, store={"redis_url": redis.url})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    group = Proc(["serve", "--config", str(cfg)], port)
    procs.append(group)
    group.wait_serving()
    assert len(children(group.p.pid)) == 2  # both workers bound the one port

    # another supervisor, and a lone server, are refused while the workers listen
    again = run("serve", "--config", str(cfg))
    assert again.returncode == 2 and f"{port}" in again.stderr, again.stderr
    lone = run("serve", "--config", str(cfg), "--workers", "1")
    assert lone.returncode == 2 and f"server.grpc_port {port}" in lone.stderr, lone.stderr
    assert serving_answers(port, issuer.mint("w"))
    group.p.send_signal(signal.SIGTERM)
    assert group.p.wait(timeout=20) == 0


def test_workers_refuse_a_port_a_lone_server_holds(
        tmp_path: Path, issuer: TestIssuer, procs: list[Proc], redis: RedisServer) -> None:
    cfg = write_config(tmp_path, issuer, store={"redis_url": redis.url})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    lone = Proc(["serve", "--config", str(cfg)], port)
    procs.append(lone)
    lone.wait_serving()
    r = run("serve", "--config", str(cfg), "--workers", "2")
    assert r.returncode == 2 and f"server.grpc_port {port}" in r.stderr, r.stderr
    assert serving_answers(port, issuer.mint("l"))
