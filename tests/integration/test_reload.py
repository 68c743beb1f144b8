"""Quota reloads never hurt serving: bad files of any kind are refused, logged once, counted
and the current quota kept; the watcher survives and sees changes whatever their mtime;
decisions keep their pace while a large file is being refused."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from authz.config.service_file import parse_settings
from authz.quota import load_quota
from authz.server.app import Server
from tests.support.authz_process import Proc, check_request, write_config
from tests.support.issuer import TestIssuer
from tests.support.redis_server import free_port

ALLOW_A = "default_plan: free\nplans: {free: {limits: [{name: s, rate: 100}], models: {a: {}}}}\n"
ALLOW_B = "default_plan: free\nplans: {free: {limits: [{name: s, rate: 100}], models: {b: {}}}}\n"
DEEP = "plans: " + "[" * 5000 + "]" * 5000 + "\n"


def start(tmp_path: Path, issuer: TestIssuer, procs: list[Proc], *, interval: str | int
          ) -> tuple[Proc, int, int, Path]:
    quota = tmp_path / "quota.yaml"
    quota.write_text(ALLOW_A)
    metrics = free_port()
    cfg = write_config(tmp_path, issuer, server={"metrics_port": metrics})
    data = yaml.safe_load(cfg.read_text())
    data.update(quota_file="quota.yaml", quota_reload_interval=interval)
    cfg.write_text(yaml.safe_dump(data))
    port = data["server"]["grpc_port"]
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    p.wait_serving()
    return p, port, metrics, quota


def allowed_models(port: int, token: str) -> set[str]:
    out = set()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        for model in ("a", "b"):
            r = stub.Check(check_request(token, f"/v1/models/{model}:predict"), timeout=5)
            if r.status.code == 0:
                out.add(model)
    return out


def reloads(metrics_port: int, result: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith("authz_config_reloads_total{") and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_pathological_file_then_a_valid_one_without_sighup(
        tmp_path: Path, issuer: TestIssuer, procs: list[Proc]) -> None:
    p, port, metrics, quota = start(tmp_path, issuer, procs, interval="1s")
    token = issuer.mint("w")
    assert allowed_models(port, token) == {"a"}
    quota.write_text(DEEP)  # RecursionError territory for a recursive parser
    wait_for(lambda: reloads(metrics, "error") == 1)
    assert allowed_models(port, token) == {"a"}  # the current quota is kept
    time.sleep(2.5)  # the same bad content is not reported again at every poll
    assert reloads(metrics, "error") == 1
    quota.write_text("")  # an empty ConfigMap
    wait_for(lambda: reloads(metrics, "error") == 2)
    assert allowed_models(port, token) == {"a"}  # not "everyone blocked"
    quota.write_text(ALLOW_B)  # the watcher survived: a valid file is picked up
    wait_for(lambda: allowed_models(port, token) == {"b"})
    assert reloads(metrics, "ok") == 1
    p.p.send_signal(signal.SIGTERM)
    out = p.output()
    failures = [line for line in out.splitlines() if "quota reload failed" in line]
    assert len(failures) == 2, failures
    assert "nested deeper than 20 levels" in failures[0]
    assert "the quota file is empty" in failures[1]


def test_change_with_the_same_mtime_is_picked_up(tmp_path: Path, issuer: TestIssuer,
                                                 procs: list[Proc]) -> None:
    """cp -p / rsync -a keep the modification time; the content still changed."""
    _p, port, _metrics, quota = start(tmp_path, issuer, procs, interval="1s")
    token = issuer.mint("m")
    before = quota.stat()
    time.sleep(1.2)
    quota.write_text(ALLOW_B)
    os.utime(quota, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert quota.stat().st_mtime_ns == before.st_mtime_ns
    wait_for(lambda: allowed_models(port, token) == {"b"})


def test_sighup_with_a_pathological_file_is_logged_once_and_counted(
        tmp_path: Path, issuer: TestIssuer, procs: list[Proc]) -> None:
    p, port, metrics, quota = start(tmp_path, issuer, procs, interval=0)
    token = issuer.mint("h")
    quota.write_text(DEEP)
    p.p.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(metrics, "error") == 1)
    assert allowed_models(port, token) == {"a"}
    quota.write_text(ALLOW_B)
    p.p.send_signal(signal.SIGHUP)
    wait_for(lambda: allowed_models(port, token) == {"b"})
    p.p.send_signal(signal.SIGTERM)
    out = p.output()
    assert "Exception in callback" not in out and "RecursionError" not in out
    assert len(re.findall("quota reload failed", out)) == 1


async def in_process(quota: Path, text: str, issuer: TestIssuer) -> Server:
    """A started server in this process on `quota` (written with `text`), reloads by hand."""
    quota.write_text(text)  # noqa: ASYNC240 - a test's setup, before anything runs
    settings = parse_settings({
        "server": {"grpc_port": 0, "metrics_port": 0, "drain_delay": 0, "host": "127.0.0.1"},
        "auth": {"issuers": [issuer.settings()]}, "quota_file": str(quota),
        "quota_reload_interval": 0}, "test")
    server = Server(settings, load_quota(quota))
    await server.start()
    return server


def _large_bad_quota(path: Path) -> None:
    """Just under 1 MiB of overrides (~0.7 s for libyaml here) with a typo at the very end:
    refused only after the whole parse and validation."""
    lines = ["default_plan: free", "plans: {free: {limits: [{name: s, rate: 1000}]}}",
             "overrides:"]
    size = 100
    i = 0
    while size < (1 << 20) - 200:
        line = f"  - {{issuer: https://idp.example.com, subject: user-{i:07d}, plan: free}}"
        lines.append(line)
        size += len(line) + 1
        i += 1
    lines.append("  - {issuer: x, subject: y, plan: free, pln: typo}")
    path.write_text("\n".join(lines) + "\n")


async def test_decisions_keep_their_pace_while_a_large_file_is_refused(
        tmp_path: Path, issuer: TestIssuer) -> None:
    quota = tmp_path / "quota.yaml"
    server = await in_process(quota, ALLOW_A.replace("rate: 100", "rate: 1000000"), issuer)
    token = issuer.mint("pace")
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.AuthorizationStub(ch)
            stop = asyncio.Event()

            async def checks() -> None:
                while not stop.is_set():
                    t = time.perf_counter()
                    r = await stub.Check(check_request(token, "/v1/models/a:predict"), timeout=5)
                    assert r.status.code == 0
                    latencies.append(time.perf_counter() - t)

            _large_bad_quota(quota)
            runner = asyncio.create_task(checks())
            await asyncio.sleep(0.2)
            before = len(latencies)
            t0 = time.perf_counter()
            ok = await server.reload_quota()
            took = time.perf_counter() - t0
            during = latencies[before:]
            stop.set()
            await runner
    finally:
        await server.stop()
    assert not ok
    # The refusal takes a long time by itself; checks went on meanwhile, none of them waiting
    # anywhere near the refusal's length (a parse on the event loop would stall them all).
    assert took > 0.3, took
    assert len(during) >= 10, (took, len(during))
    assert max(during) < took / 3, (took, max(during))


@pytest.mark.parametrize("bad", [DEEP, "", "# comments only\n", "plans: [1, 2"])
async def test_reload_failure_keeps_the_quota_in_process(tmp_path: Path, issuer: TestIssuer,
                                                         bad: str) -> None:
    quota = tmp_path / "quota.yaml"
    server = await in_process(quota, ALLOW_A, issuer)
    try:
        resolver = server.components.pipeline.resolver
        quota.write_text(bad)
        assert not await server.reload_quota()
        assert server.components.pipeline.resolver is resolver
    finally:
        await server.stop()


async def test_shadow_mode_is_switched_by_a_reload(tmp_path: Path, issuer: TestIssuer) -> None:
    """Shadow mode lives in the quota file: a reload turns enforcement into a marked allow and
    back, with no restart."""
    quota = tmp_path / "quota.yaml"
    enforced = "default_plan: free\nplans: {free: {limits: [{name: s, rate: 1, per: 1h}]}}\n"
    server = await in_process(quota, enforced, issuer)
    token = issuer.mint("shadowed")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.AuthorizationStub(ch)

            async def answer() -> tuple[int, dict[str, str]]:
                r = await stub.Check(check_request(token, "/v1/models/a:predict"), timeout=5)
                if r.status.code:
                    return r.denied_response.status.code, {}
                return 200, {h.header.key: h.header.value for h in r.ok_response.headers}

            assert (await answer())[0] == 200
            assert (await answer())[0] == 429
            quota.write_text(enforced.replace("default_plan: free",
                                              "shadow: {rate_limits: true}\ndefault_plan: free"))
            assert await server.reload_quota()
            status, upstream = await answer()
            assert (status, upstream["x-authz-shadow"]) == (200, "rate_limited")
            quota.write_text(enforced)
            assert await server.reload_quota()
            assert (await answer())[0] == 429
    finally:
        await server.stop()


async def test_cached_identities_keep_what_the_quota_reads_across_reloads(
        tmp_path: Path, issuer: TestIssuer) -> None:
    """Cached identities keep only the claims the quota reads; a reload that reads another
    claim empties the token cache, and the next checks use the new claim."""
    two_plans = ("plan_claim: {claim}\ndefault_plan: free\nplans:\n"
                 "  free: {{limits: [{{name: s, rate: 100}}], models: {{a: {{}}}}}}\n"
                 "  pro: {{limits: [{{name: s, rate: 100}}]}}\n")
    quota = tmp_path / "quota.yaml"
    server = await in_process(quota, two_plans.format(claim="plan"), issuer)
    auth = server.components.authenticator
    token = issuer.mint("claims", plan="free", tier="pro", email="e@x")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.AuthorizationStub(ch)

            async def allows_b() -> bool:
                r = await stub.Check(check_request(token, "/v1/models/b:predict"), timeout=5)
                return bool(r.status.code == 0)

            assert auth.retained_claims == frozenset({"plan"})
            assert not await allows_b()  # plan=free: model b is not in it
            [identity] = auth._cache.values()
            assert dict(identity.claims) == {"plan": "free"}
            quota.write_text(two_plans.format(claim="tier"))
            assert await server.reload_quota()
            assert auth.retained_claims == frozenset({"tier"}) and auth.cache_size == 0
            assert await allows_b()  # tier=pro now decides
            [identity] = auth._cache.values()
            assert dict(identity.claims) == {"tier": "pro"}
    finally:
        await server.stop()
