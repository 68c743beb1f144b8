"""The rendered manifests pass checkov's Kubernetes checks; every waived check carries its
reason in the manifest (`checkov.io/skipN: CKV_ID=reason`). One checkov run per session: it
takes several seconds just to start."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploykit import render
from deploykit.tools import checkov

# Checks a weakened Deployment must fail, so the scan is known to look at what we rely on:
# privilege escalation, read-only root FS, NET_RAW/ALL capabilities, non-root, seccomp.
EXPECTED_ON_WEAKENED = {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_37", "CKV_K8S_23",
                        "CKV_K8S_31"}


def _weakened(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = copy.deepcopy(render.one(docs, "Deployment", "rate-limiter", "authz-system"))
    dep["metadata"]["name"] = "weakened"
    dep["metadata"]["annotations"] = {}
    pod = dep["spec"]["template"]["spec"]
    pod.pop("securityContext")
    for c in pod["containers"]:
        c.pop("securityContext")
    return dep


@pytest.fixture(scope="module")
def scan(rendered, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("checkov")
    for overlay, docs in rendered.items():
        (root / overlay).mkdir()
        (root / overlay / "rendered.yaml").write_text(yaml.safe_dump_all(docs))
    (root / "weakened").mkdir()
    (root / "weakened" / "deployment.yaml").write_text(yaml.safe_dump(_weakened(rendered["dev"])))
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(
        [checkov(), "-d", str(root), "--framework", "kubernetes", "-o", "json",
         "--skip-download", "--compact"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    # Exit 1 = failed checks (expected: the weakened copy); anything else is a crash.
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    [kube] = [r for r in (report if isinstance(report, list) else [report])
              if r["check_type"] == "kubernetes"]
    return kube


def _in(results: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    return [r for r in results if f"/{part}/" in r["file_path"]]


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_no_failed_checks(scan, overlay: str) -> None:
    failed = _in(scan["results"]["failed_checks"], overlay)
    assert not failed, "\n".join(f"{c['check_id']} {c['check_name']}: {c['resource']}"
                                 for c in failed)
    passed = _in(scan["results"]["passed_checks"], overlay)
    scanned = {c["resource"] for c in passed}
    assert "Deployment.authz-system.rate-limiter" in scanned
    assert len(passed) > 50


def test_every_waiver_has_a_reason(scan) -> None:
    skipped = [c for c in scan["results"]["skipped_checks"] if "/weakened/" not in c["file_path"]]
    assert skipped, "expected the documented waivers (image digest, env secret)"
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason) > 30, f"{c['check_id']} on {c['resource']} waived without a reason"
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_43", "CKV_K8S_35"}


def test_the_scan_fails_a_weakened_deployment(scan) -> None:
    failed = {c["check_id"] for c in _in(scan["results"]["failed_checks"], "weakened")}
    missing = EXPECTED_ON_WEAKENED - failed
    assert not missing, f"checkov did not flag {missing} on a Deployment without securityContext"


def test_scan_covered_only_expected_dirs(scan) -> None:
    dirs = {Path(c["file_path"]).parts[1] for c in scan["results"]["passed_checks"]}
    assert dirs <= {*render.OVERLAYS, "weakened"}
