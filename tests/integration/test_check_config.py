"""`authz check-config` runs exactly the validation `authz serve` runs: every problem at once,
the nearest known key for a typo, the referring key for a file reference. A corpus of files
goes through both commands; they must agree on every one."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.authz_process import Proc, run, write_config
from tests.support.issuer import TestIssuer


def _edit(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        for dotted, value in changes.items():
            node = cfg
            *parents, last = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
    return apply


BAD: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("two typos", _edit(store__timout="1s", server__grpc_prot=1),
     ["server.grpc_prot: unknown key (did you mean 'grpc_port'?)",
      "store.timout: unknown key (did you mean 'timeout'?)"]),
    ("jwks_uri", lambda c: c["auth"]["issuers"].append(
        {"issuer": "https://b", "jwks_uri": "https://b/jwks"}),
     ["auth.issuers[1].jwks_uri: unknown key (did you mean 'jwks_url'?)"]),
    ("missing quota file", _edit(quota_file="nope.yaml"),
     ["config.yaml: quota_file: cannot read ", "nope.yaml: No such file or directory"]),
    ("empty quota file", _edit(quota_file="empty.yaml"),
     ["empty.yaml: the quota file is empty"]),
    ("bad numbers", _edit(store__timeout="1us", server__drain_delay="1h"),
     ["server.drain_delay: expected a duration between 0 and 5m",
      "store.timeout: expected a duration of at least 1ms"]),
    ("no issuers", lambda c: c["auth"].pop("issuers"),
     ["auth.issuers: no issuers configured"]),
    ("missing key file", lambda c: c["auth"]["issuers"].append(
        {"issuer": "https://c", "jwks_file": "missing.json"}),
     ["auth.issuers[1].jwks_file: ", "missing.json: cannot read (No such file"]),
    ("workers with the in-memory store", _edit(server__workers=3),
     ["server.workers: is 3 but store.redis_url is empty"]),
    ("bad quota values", _edit(quota_file="badquota.yaml"),
     ["badquota.yaml: plans.p.limits[0].per: expected a duration between 1ms and 366d",
      "badquota.yaml: plans.p.limits[1].rate: expected a number > 0 and <= 1e+12"]),
]


def _files(tmp_path: Path, issuer: TestIssuer, edit: Callable[[dict[str, Any]], None]) -> Path:
    cfg = write_config(tmp_path, issuer)
    data = yaml.safe_load(cfg.read_text())
    edit(data)
    cfg.write_text(yaml.safe_dump(data))
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    (tmp_path / "badquota.yaml").write_text(
        "default_plan: p\nplans: {p: {limits: [{name: a, rate: 1, per: 1.0e+300}, "
        "{name: b, rate: 1.0e+308}]}}\n")
    return cfg


@pytest.mark.parametrize(("case", "edit", "expected"), BAD, ids=[b[0] for b in BAD])
def test_check_config_and_serve_refuse_alike(tmp_path: Path, issuer: TestIssuer, case: str,
                                             edit: Callable[[dict[str, Any]], None],
                                             expected: list[str]) -> None:
    cfg = _files(tmp_path, issuer, edit)
    checked = run("check-config", str(cfg))
    served = run("serve", "--config", str(cfg))
    assert checked.returncode == 1, checked.stdout
    assert served.returncode == 2, served.stdout + served.stderr
    for text in expected:
        assert text in checked.stderr, (case, checked.stderr)
    # the same problems, line for line
    check_lines = [line.removeprefix("authz: ") for line in checked.stderr.splitlines()]
    serve_lines = [line.removeprefix("authz: configuration error: ")
                   for line in served.stderr.splitlines() if "configuration error" in line]
    assert check_lines == serve_lines


def test_a_file_check_config_accepts_is_served(tmp_path: Path, issuer: TestIssuer,
                                               procs: list[Proc]) -> None:
    cfg = _files(tmp_path, issuer, _edit(quota_file="quota.yaml"))
    (tmp_path / "quota.yaml").write_text(
        "default_plan: free\nplans:\n  free: {limits: [{name: s, rate: 5}]}\n"
        "  pro: {limits: [{name: s, rate: 50}]}\n")
    checked = run("check-config", str(cfg))
    assert checked.returncode == 0, checked.stderr
    # plans defined in the file, not counting the built-ins
    assert "2 plans (+ built-in unlimited, blocked)" in checked.stdout
    port = yaml.safe_load(cfg.read_text())["server"]["grpc_port"]
    p = Proc(["serve", "--config", str(cfg)], port)
    procs.append(p)
    p.wait_serving()
    p.p.send_signal(signal.SIGTERM)
    assert p.p.wait(timeout=20) == 0


def test_empty_config_is_refused_by_both(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("# empty\n")
    checked = run("check-config", str(cfg))
    served = run("serve", "--config", str(cfg))
    assert (checked.returncode, served.returncode) == (1, 2)
    assert "no issuers configured" in checked.stderr and "no issuers configured" in served.stderr


def test_bad_otel_environment_is_found_by_check_config(tmp_path: Path,
                                                       issuer: TestIssuer) -> None:
    import os
    import subprocess
    import sys

    cfg = write_config(tmp_path, issuer)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "nonsense"}
    r = subprocess.run([sys.executable, "-m", "authz", "check-config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1 and "OTEL_TRACES_EXPORTER" in r.stderr
