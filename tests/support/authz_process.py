"""The `authz` command as a real process, for the tests that start one (CLI, signals, ports,
reloads): run it to completion, or start a server and wait until it is SERVING."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.service.auth.v3 import external_auth_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.issuer import TestIssuer
from tests.support.redis_server import free_port

AUTHZ = [sys.executable, "-m", "authz"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AUTHZ, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def write_config(tmp_path: Path, issuer: TestIssuer, **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "grpc_port": free_port(), "metrics_port": 0,
                   "workers": 1, "drain_delay": "300ms", "shutdown_grace": "5s"},
        "auth": {"issuers": [issuer.settings()]},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Proc:
    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.p = subprocess.Popen([*AUTHZ, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **(env or {})})

    def wait_serving(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                assert self.p.poll() is None, self.output()
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError("not serving in time:\n" + self.output())

    def output(self) -> str:
        if self.p.poll() is None:
            self.p.kill()
        out, _ = self.p.communicate(timeout=10)
        return out or ""

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)


def children(pid: int) -> list[int]:
    """Child process ids (a supervisor's workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def check_request(token: str | None, path: str = "/v1/models/m:predict") -> pb.CheckRequest:
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.path = path
    http.headers[":path"] = path
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return req
