"""The container image, built from the Dockerfile and run for real (see conftest.py).

Run: `pytest -m image tests/image` (about a minute with a cached base image).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.issuer import TestIssuer
from tests.support.redis_server import free_port

from .engines import CONFIG_MOUNT, ROOT, Container, Engine

pytestmark = pytest.mark.image

UID = GID = 10001
# First start in a container on a loaded 2-core machine: interpreter start plus imports of
# grpc, protobuf and OpenTelemetry take ~2 s here; 60 s only bounds a hang.
SERVING_TIMEOUT = 60.0
# drain_delay + shutdown_grace configured below (0.3 s + 5 s), plus interpreter exit.
STOP_TIMEOUT = 20.0


def _pyproject_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
        return version


def test_image_metadata(engine: Engine, image: str) -> None:
    config = engine.inspect(image)["Config"]
    assert config["User"] == f"{UID}:{GID}"
    assert config["Entrypoint"] == ["authz", "serve"]
    assert {"9000/tcp", "9464/tcp"} <= set(config["ExposedPorts"])
    assert "/tmp" in config["Volumes"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == _pyproject_version()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "org.opencontainers.image.source" in labels
    # The revision is the commit the build saw (others may commit meanwhile: only check that
    # it names a real commit of this repository).
    revision = labels["org.opencontainers.image.revision"]
    if (ROOT / ".git").exists():
        known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{revision}^{{commit}}"],
                               capture_output=True, text=True, check=False)
        assert known.returncode == 0, f"revision label {revision!r} is not a commit here"


# Runs inside the image as root (so nothing is hidden by permissions) with the venv's Python.
_CONTENTS_PROBE = r"""
import importlib.util, json, os, shutil
found = []
found += [f"compiler {t}" for t in ("gcc", "cc", "c++", "clang", "make") if shutil.which(t)]
found += [f"leftover {p}" for p in ("/src", "/wheels", "/root/.cache", "/tmp/.cache")
          if os.path.exists(p)]
found += [f"in venv {m}" for m in ("pip", "setuptools", "tests") if importlib.util.find_spec(m)]
for top, dirs, files in os.walk("/opt/authz"):
    for name in dirs + files:
        st = os.lstat(os.path.join(top, name))
        if st.st_uid != 0 or (st.st_mode & 0o022 and not os.path.islink(os.path.join(top, name))):
            found.append(f"writable by the service {os.path.join(top, name)}")
            break
import authz.cli  # the console script's module imports without writing anything
print(json.dumps(found))
"""


def test_runtime_has_only_the_runtime(container: Container) -> None:
    r = container.oneshot(["/opt/authz/bin/python", "-c", _CONTENTS_PROBE], root=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def _check(channel: grpc.Channel, token: str | None) -> Any:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "POST"
    http.path = "/v1/models/m:predict"
    http.host = "models.example"
    http.headers[":path"] = http.path
    http.headers[":method"] = http.method
    http.headers[":authority"] = http.host
    if token is not None:
        http.headers["authorization"] = f"Bearer {token}"
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return stub.Check(req, timeout=5)


def _wait_serving(channel: grpc.Channel, proc: subprocess.Popen[bytes], log: Path) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + SERVING_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"container exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    pytest.fail(f"not SERVING within {SERVING_TIMEOUT:.0f}s:\n{log.read_text()[-4000:]}")


def test_serves_checks_from_a_read_only_root(container: Container, config_dir: Path,
                                              tmp_path: Path) -> None:
    issuer = TestIssuer(config_dir, name="https://test-issuer.example")
    grpc_port, metrics_port = free_port(), free_port()
    config = {
        "server": {"host": container.bind_host, "grpc_port": grpc_port,
                   "metrics_port": metrics_port, "workers": 1,
                   "drain_delay": "300ms", "shutdown_grace": "5s"},
        # No store.redis_url: in-memory store. No quota_file: embedded default quota, whose
        # default plan allows every model.
        "auth": {"issuers": [{"issuer": issuer.name,
                              "jwks_file": f"{CONFIG_MOUNT}/{issuer.jwks_file.name}",
                              "algorithms": ["RS256"]}]},
    }
    (config_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for f in config_dir.iterdir():
        f.chmod(0o644)

    # A first run lets the engine create its mount points (/etc/authz, /etc/hosts, ...), so
    # the comparison below sees only what the service itself writes.
    warm = container.oneshot(["true"])
    assert warm.returncode == 0, warm.stdout + warm.stderr
    before = container.changes()

    log = tmp_path / "container.log"
    proc = container.serve(["--config", f"{CONFIG_MOUNT}/config.yaml"], log,
                           [grpc_port, metrics_port])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            _wait_serving(channel, proc, log)

            denied = _check(channel, None)
            assert denied.status.code != 0
            assert denied.denied_response.status.code == 401
            deny_headers = {h.header.key.lower(): h.header.value
                            for h in denied.denied_response.headers}
            assert deny_headers["www-authenticate"].startswith("Bearer")

            allowed = _check(channel, issuer.mint("alice"))
            assert allowed.status.code == 0, allowed
            upstream = {h.header.key: h.header.value for h in allowed.ok_response.headers}
            assert upstream["x-auth-subject"] == "alice"
            assert upstream["x-auth-issuer"] == issuer.name

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as resp:
            assert resp.status == 200
            assert b"# TYPE" in resp.read()

        # SIGTERM, as Kubernetes stops a pod: the service drains and exits cleanly.
        assert container.stop(proc, STOP_TIMEOUT) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    # Nothing written below / (podman); docker ran it with --read-only, so nothing could be.
    after = container.changes()
    assert after == before, f"the service wrote to the image's filesystem: {after - before}"

    # Logs went to stdout/stderr, as JSON lines.
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{")]
    assert any(line.get("msg") == "serving" for line in lines), log.read_text()[-4000:]
