"""The `authz` process as users and Kubernetes run it: CLI, startup failures, signals, workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.authz_process import Proc, check_request, run, write_config
from tests.support.authz_process import children as child_pids
from tests.support.issuer import TestIssuer
from tests.support.redis_server import free_port


def test_check_config_ok_and_errors(tmp_path: Path, issuer: TestIssuer) -> None:
    cfg = write_config(tmp_path, issuer)
    r = run("check-config", str(cfg))
    assert r.returncode == 0 and "OK" in r.stdout
    quota = tmp_path / "quota.yaml"
    quota.write_text("default_plan: free\nplans: {free: {limits: [{name: s, rate: 1}]}}\n")
    r = run("check-config", str(quota))
    assert r.returncode == 0 and "quota" in r.stdout
    quota.write_text("default_plan: free\nplans: {free: {limits: [{name: s, rate: -1}]}}\n")
    r = run("check-config", str(quota))
    assert r.returncode == 1
    assert f"{quota}: plans.free.limits[0].rate: expected a number > 0" in r.stderr


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.write_text("server: {grpc_port: x}"), "server.grpc_port: expected an integer"),
        (lambda c: c.unlink(), "cannot read file"),
        (lambda c: (c.unlink(), c.mkdir()), "cannot read file"),  # a directory
        (lambda c: c.write_text(c.read_text() + "\nstore: {redis_url: 'redis://[bad'}\n"),
         "store.redis_url: invalid Redis URL"),
        (lambda c: c.write_text(c.read_text() + "\nquota_file: nope.yaml\n"), "nope.yaml"),
    ],
)
def test_startup_fails_fast_with_a_clear_message(tmp_path: Path, issuer: TestIssuer,
                                                 mutate: Any, expected: str) -> None:
    cfg = write_config(tmp_path, issuer)
    mutate(cfg)
    r = run("serve", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stdout + r.stderr


def test_unreachable_jwks_fails_or_retries(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}/jwks.json"
    cfg = tmp_path / "c.yaml"
    base = {"server": {"host": "127.0.0.1", "grpc_port": port, "metrics_port": 0},
            "auth": {"issuers": [{"issuer": "https://x", "jwks_url": dead}],
                     "jwks_timeout": "300ms"}}
    cfg.write_text(yaml.safe_dump(base))
    r = run("serve", "--config", str(cfg))
    assert r.returncode == 2 and "jwks" in (r.stdout + r.stderr).lower()

    base["auth"]["on_jwks_unavailable"] = "retry"  # type: ignore[index]
    cfg.write_text(yaml.safe_dump(base))
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    time.sleep(2.5)
    assert p.p.poll() is None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = pb_grpc.AuthorizationStub(ch).Check(check_request("x"), timeout=2)
        assert resp.denied_response.status.code == 503
        assert json.loads(resp.denied_response.body)["reason"] == "not_ready"

    # The identity provider comes back: keys load, health turns SERVING, tokens verify.
    import http.server

    idp = TestIssuer(tmp_path / "idp", name="https://x")
    body = json.dumps(idp.jwks).encode()

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    jwks_port = int(dead.rsplit(":", 1)[1].split("/")[0])
    httpd = http.server.HTTPServer(("127.0.0.1", jwks_port), Jwks)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        p.wait_serving(timeout=40)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = pb_grpc.AuthorizationStub(ch).Check(check_request(idp.mint("late")),
                                                       timeout=5)
        assert resp.status.code == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_check_help_describes_every_option_and_its_default() -> None:
    r = run("check", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for option, words in (("--target", "(default: 127.0.0.1:9000)"), ("--token", "$TOKEN"),
                          ("--path", "(default: /v1/models/example:predict)"),
                          ("--method", "(default: POST)"), ("--header", "repeatable"),
                          ("--body-file", "raw_body"), ("--repeat", "(default: 1)")):
        assert option in text and words in text, (option, words, r.stdout)


def test_check_sends_a_body_file(tmp_path: Path, issuer: TestIssuer, procs: list[Proc]) -> None:
    quota = {"default_plan": "free", "plans": {"free": {
        "limits": [{"name": "tokens", "rate": 100, "per": "1h"}],
        "models": {"*": {"cost": {"from": "instances"}}}}}}
    (tmp_path / "quota.yaml").write_text(yaml.safe_dump(quota))
    config = write_config(tmp_path, issuer)
    config.write_text(config.read_text() + "quota_file: quota.yaml\n")
    port = free_port()
    p = Proc(["serve", "--config", str(config), "--grpc-port", str(port)], port)
    procs.append(p)
    p.wait_serving()
    body = tmp_path / "batch.json"
    body.write_text(json.dumps({"instances": [[1, 2]] * 30}))
    token = issuer.mint("cli-body")
    r = run("check", "--target", f"127.0.0.1:{port}", "--token", token, "--path",
            "/v1/models/m:predict", "--body-file", str(body))
    assert r.returncode == 0 and "ALLOW 200" in r.stdout
    assert "ratelimit-remaining: 70" in r.stdout  # charged the batch of 30
    r = run("check", "--target", f"127.0.0.1:{port}", "--token", token, "--path",
            "/v1/models/m:predict")
    assert "DENY 400" in r.stdout and "body_missing" in r.stdout
    r = run("check", "--target", f"127.0.0.1:{port}", "--body-file", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--body-file: cannot read" in r.stderr


def test_no_issuers_refuses_to_start() -> None:
    r = run("serve", "--grpc-port", str(free_port()))
    assert r.returncode == 2 and "no issuers configured" in r.stderr


def test_dev_mode_prints_working_tokens(procs: list[Proc]) -> None:
    port = free_port()
    p = Proc(["serve", "--dev", "--grpc-port", str(port), "--metrics-port", "0"], port)
    procs.append(p)
    p.wait_serving()
    p.p.send_signal(signal.SIGTERM)
    out = p.output()
    # Ready to paste: `export ALICE=<token>   # plan free`.
    token = next(line.split("=", 1)[1].split()[0] for line in out.splitlines()
                 if line.strip().startswith("export ALICE="))
    assert "DEVELOPMENT MODE" in out
    assert '--token "$ALICE"' in out
    # Human-readable log lines, and none of the production warnings/config dump.
    assert '{"ts"' not in out and "subject_salt" not in out
    assert "effective configuration" not in out
    # and the token works against a fresh dev server? No: the key was ephemeral.
    p2 = Proc(["serve", "--dev", "--grpc-port", str(port), "--metrics-port", "0"], port)
    procs.append(p2)
    p2.wait_serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = pb_grpc.AuthorizationStub(ch).Check(check_request(token), timeout=2)
    assert resp.denied_response.status.code == 401


def test_sigterm_under_load_drains_without_failures(tmp_path: Path, issuer: TestIssuer,
                                                    procs: list[Proc]) -> None:
    """SIGTERM while two clients keep 32 Checks in flight each, with Redis paused across the
    listener close so checks are truly in flight then:
    - health is NOT_SERVING at once, Checks are still answered during drain_delay;
    - after drain_delay new connections are refused while the in-flight checks wait;
    - every Check sent before the listener closed gets an answer (none fails);
    - the process exits 0 once they are answered."""
    import socket

    from tests.support.redis_server import RedisServer

    drain = 1.5
    redis = RedisServer().start()
    procs.append(redis)  # type: ignore[arg-type]
    cfg = write_config(tmp_path, issuer,
                       server={"drain_delay": f"{drain}s", "shutdown_grace": "8s"},
                       store={"redis_url": redis.url, "timeout": "5s"})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    p.wait_serving()
    token = issuer.mint("loadtest", plan="pro")
    results: list[tuple[float, str]] = []  # (monotonic time sent, outcome)
    exited = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.AuthorizationStub(ch)
            while not exited.is_set():
                batch = [(time.monotonic(), stub.Check.future(check_request(token), timeout=15))
                         for _ in range(32)]
                results.extend((sent, _outcome(f)) for sent, f in batch)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        p.p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.2)
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
    time.sleep(0.3)
    redis.pause()  # from here on, checks stay in flight until Redis answers again
    try:
        time.sleep(max(0.0, t0 + drain + 0.7 - time.monotonic()))
        assert p.p.poll() is None, "exited while checks were in flight"
        with socket.socket() as sock:  # the listener is closed: new connections are refused
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    finally:
        redis.resume()
    assert p.p.wait(timeout=15) == 0
    exited.set()
    for w in workers:
        w.join(timeout=30)
    close = t0 + drain
    before_close = [o for sent, o in results if sent < close - 0.1]
    assert len(before_close) > 100
    assert before_close.count("rpc_error") == 0, before_close[-40:]
    assert set(before_close) <= {"200", "429"}  # answers (the default pro plan is 100/s)


def _outcome(f: Any) -> str:
    try:
        resp = f.result()
    except grpc.RpcError:
        return "rpc_error"
    return "200" if resp.status.code == 0 else str(resp.denied_response.status.code)


def test_two_workers_share_the_port_and_restart(tmp_path: Path, issuer: TestIssuer,
                                                procs: list[Proc]) -> None:
    p, port, children = _start_two_workers(tmp_path, issuer, procs)
    os.kill(children[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = child_pids(p.p.pid)
        if len(now) == 2 and children[0] not in now:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("dead worker was not restarted")
    p.wait_serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = pb_grpc.AuthorizationStub(ch).Check(check_request(issuer.mint("w")), timeout=5)
    assert resp.status.code == 0
    p.p.send_signal(signal.SIGTERM)
    assert p.p.wait(timeout=20) == 0
    assert not child_pids(p.p.pid)


def _two_worker_supervisor(tmp_path: Path, issuer: TestIssuer, procs: list[Proc]) -> Proc:
    """A supervisor of two workers sharing a test Redis, just started (not yet serving)."""
    from tests.support.redis_server import RedisServer

    redis = RedisServer().start()
    procs.append(redis)  # type: ignore[arg-type]  # stopped by the fixture like the others
    cfg = write_config(tmp_path, issuer, server={"workers": 2},
                       store={"redis_url": redis.url})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    return p


def _start_two_workers(tmp_path: Path, issuer: TestIssuer,
                       procs: list[Proc]) -> tuple[Proc, int, list[int]]:
    """A supervisor with two workers sharing a test Redis; returns it, its port, the pids."""
    p = _two_worker_supervisor(tmp_path, issuer, procs)
    port = p.port
    p.wait_serving()
    pids = child_pids(p.p.pid)
    assert len(pids) == 2
    return p, port, pids


def _sighup_only_quota(tmp_path: Path, issuer: TestIssuer) -> tuple[Path, Path, int]:
    """A config whose quota file (model "allowed" only) is re-read on SIGHUP alone (no
    polling): the quota file, the config file and the gRPC port."""
    quota = tmp_path / "quota.yaml"
    quota.write_text("default_plan: free\nplans: {free: {limits: [{name: s, rate: 100}], "
                     "models: {allowed: {}}}}\n")
    cfg = write_config(tmp_path, issuer)
    data = yaml.safe_load(cfg.read_text())
    data["quota_file"] = "quota.yaml"
    data["quota_reload_interval"] = 0
    cfg.write_text(yaml.safe_dump(data))
    return quota, cfg, int(data["server"]["grpc_port"])


def test_quota_reload_on_sighup_keeps_old_quota_on_error(tmp_path: Path, issuer: TestIssuer,
                                                         procs: list[Proc]) -> None:
    quota, cfg, port = _sighup_only_quota(tmp_path, issuer)
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    p.wait_serving()
    token = issuer.mint("rel")

    def status(model: str) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = pb_grpc.AuthorizationStub(ch).Check(
                check_request(token, f"/v1/models/{model}:predict"), timeout=5)
        return 200 if r.status.code == 0 else int(r.denied_response.status.code)

    assert (status("allowed"), status("other")) == (200, 403)
    quota.write_text("default_plan: free\nplans: {free: {limits: [{name: s, rate: 100}], "
                     "models: {other: {}}}}\n")
    p.p.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert (status("allowed"), status("other")) == (403, 200)
    quota.write_text("default_plan: free\nplans: {free: {limits: [{name: s, rate: 100}], "
                     "models: {allowed: {cost: -1}}}}\n")
    p.p.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert (status("allowed"), status("other")) == (403, 200)  # bad file: old quota kept
    p.p.send_signal(signal.SIGTERM)
    out = p.output()
    assert "quota reload failed" in out and "plans.free.models.allowed.cost" in out


def test_sigint_drains_and_a_second_signal_exits_at_once(tmp_path: Path, issuer: TestIssuer,
                                                         procs: list[Proc]) -> None:
    cfg = write_config(tmp_path, issuer, server={"drain_delay": "30s"})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    p.wait_serving()
    p.p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.p.poll() is None  # draining (30 s delay), not gone
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = pb_grpc.AuthorizationStub(ch).Check(check_request(issuer.mint("d")), timeout=2)
        assert resp.status.code == 0  # still answering during the drain delay
    started = time.monotonic()
    p.p.send_signal(signal.SIGINT)
    assert p.p.wait(timeout=5) == 128 + signal.SIGINT
    assert time.monotonic() - started < 3


def test_in_memory_store_refuses_several_workers(tmp_path: Path, issuer: TestIssuer) -> None:
    """Each worker would keep its own in-memory buckets and grant the whole limit."""
    cfg = write_config(tmp_path, issuer, server={"workers": 2})
    r = run("serve", "--config", str(cfg))
    assert r.returncode == 2 and "in-memory store keeps buckets per process" in r.stderr


def test_redis_down_at_start_applies_the_policy_then_recovers(
        tmp_path: Path, issuer: TestIssuer, procs: list[Proc]) -> None:
    from tests.support.redis_server import RedisServer

    redis_port = free_port()
    cfg = write_config(tmp_path, issuer, store={
        "redis_url": f"redis://127.0.0.1:{redis_port}/0", "timeout": "100ms"})
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    token = issuer.mint("early")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 15
        while True:  # the process is up, answering with the store.on_error policy
            try:
                resp = stub.Check(check_request(token), timeout=1)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline and p.p.poll() is None, p.output()
                time.sleep(0.1)
        assert resp.denied_response.status.code == 503
        assert json.loads(resp.denied_response.body)["reason"] == "store_unavailable"
        h = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ...but alive: Kubernetes' startup/liveness probes must not restart it in a loop
        live = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=1)
        assert live.status == health_pb2.HealthCheckResponse.SERVING
        redis = RedisServer(port=redis_port).start()
        try:
            p.wait_serving()
            assert stub.Check(check_request(token), timeout=2).status.code == 0
        finally:
            redis.stop()


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path, issuer: TestIssuer,
                                                    procs: list[Proc]) -> None:
    p, _port, children = _start_two_workers(tmp_path, issuer, procs)
    p.p.kill()  # SIGKILL: nothing can be forwarded
    p.p.wait(timeout=5)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{c}").exists() and "zombie" not in _state(c) for c in children):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def test_sighup_to_the_supervisor_reaches_every_worker(tmp_path: Path, issuer: TestIssuer,
                                                       procs: list[Proc]) -> None:
    p, _port, children = _start_two_workers(tmp_path, issuer, procs)
    p.p.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert p.p.poll() is None, "the supervisor died of SIGHUP"
    assert child_pids(p.p.pid) == children  # the same workers, still running
    p.p.send_signal(signal.SIGTERM)
    assert p.p.wait(timeout=20) == 0


def _sighup_held_back(pid: int) -> bool:
    """Whether the process's main thread blocks SIGHUP (keeps it pending)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = next(int(line.split()[1], 16) for line in status.splitlines()
                   if line.startswith("SigBlk:"))
    return bool(blocked & (1 << (signal.SIGHUP - 1)))


def _hup_until_serving(p: Proc, also: list[int] | None = None) -> int:
    """SIGHUP the process (and, once they exist, its children) every 20 ms from the moment
    `authz serve` holds the signal back (the first ~0.15 s are the interpreter's and the
    imports', where any Python program dies of it) until it serves: the window where a
    SIGHUP used to kill a starting server. Returns how many were sent."""
    sent = 0
    done = threading.Event()
    deadline = time.monotonic() + 10
    while not _sighup_held_back(p.p.pid):
        assert p.p.poll() is None and time.monotonic() < deadline, "never held SIGHUP back"
        time.sleep(0.002)

    def hup() -> None:
        nonlocal sent
        while not done.is_set() and p.p.poll() is None:
            p.p.send_signal(signal.SIGHUP)
            sent += 1
            if also is not None:
                for pid in child_pids(p.p.pid):
                    also.append(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)
            time.sleep(0.02)

    t = threading.Thread(target=hup)
    t.start()
    try:
        p.wait_serving()
    finally:
        done.set()
        t.join()
    return sent


def test_sighup_while_starting_is_kept_for_when_the_server_serves(
        tmp_path: Path, issuer: TestIssuer, procs: list[Proc]) -> None:
    _quota, cfg, port = _sighup_only_quota(tmp_path, issuer)
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    assert _hup_until_serving(p) > 5
    time.sleep(0.5)
    assert p.p.poll() is None, "SIGHUP killed a starting server:\n" + p.output()
    p.p.send_signal(signal.SIGTERM)
    assert p.p.wait(timeout=20) == 0
    out = p.output()
    # The re-reads asked for while starting happen once it serves (pending signals merge).
    assert "quota reloaded" in out, out


def test_sighup_while_workers_start_kills_none(tmp_path: Path, issuer: TestIssuer,
                                               procs: list[Proc]) -> None:
    p = _two_worker_supervisor(tmp_path, issuer, procs)
    seen: list[int] = []
    assert _hup_until_serving(p, also=seen) > 5
    time.sleep(1.5)  # both workers up (serving means one is), and time for a restart to show
    assert p.p.poll() is None, "the supervisor died of SIGHUP:\n" + p.output()
    workers = child_pids(p.p.pid)
    assert len(workers) == 2 and set(seen) <= set(workers), \
        f"workers restarted: first {sorted(set(seen))}, now {workers}"
    p.p.send_signal(signal.SIGTERM)
    assert p.p.wait(timeout=20) == 0
    assert "worker died" not in p.output()


def test_version_is_the_package_version() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"authz {pyproject['project']['version']}"
