"""Built-in kinds validate strictly (an unknown field fails) against the Kubernetes schemas of
the oldest and newest versions we support; Istio kinds against the Istio CRD schemas in
schemas/. Both run in one call to the tools venv (kubernetes-validate, jsonschema)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploykit import render
from deploykit.tools import tools_python

HERE = Path(__file__).parent
# 1.29: oldest supported (gRPC probes GA in 1.27; Istio 1.22+ supports 1.27+); 1.37: newest
# schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# No schema here for these; test_deploy_monitoring checks them.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def run_schema_check(docs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    request = {
        "k8s_versions": list(K8S_VERSIONS),
        "istio_schemas": str(HERE / "schemas" / "istio-v1.yaml"),
        "docs": [{"ref": ref, "doc": doc} for ref, doc in docs],
    }
    result = subprocess.run(
        [tools_python(), str(HERE / "deploykit" / "schema_check.py")],
        input=json.dumps(request), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def results(rendered) -> dict[str, list[dict[str, Any]]]:
    """Results per "<overlay>: <ref>"; a document identical in several overlays is validated
    once (most of them are: loading schemas is the slow part)."""
    unique: dict[str, dict[str, Any]] = {}
    refs: dict[str, list[str]] = {}
    for overlay, docs in rendered.items():
        for d in docs:
            if d["kind"] in CRD_KINDS:
                continue
            key = json.dumps(d, sort_keys=True)
            unique[key] = d
            refs.setdefault(key, []).append(f"{overlay}: {render.ref(d)}")
    keys = list(unique)
    by_ref: dict[str, list[dict[str, Any]]] = {}
    for r in run_schema_check([(str(i), unique[k]) for i, k in enumerate(keys)]):
        for ref in refs[keys[int(r["ref"])]]:
            by_ref.setdefault(ref, []).append({**r, "ref": ref})
    return by_ref


def test_every_rendered_document_is_checked(rendered, results) -> None:
    for overlay, docs in rendered.items():
        for d in docs:
            if d["kind"] in CRD_KINDS:
                continue
            checks = results.get(f"{overlay}: {render.ref(d)}")
            assert checks, f"{render.ref(d)} was not validated"
            expected = 1 if not render.is_builtin(d) else len(K8S_VERSIONS)
            assert len(checks) == expected


def test_no_schema_errors(results) -> None:
    errors = [f"{ref} [{r['checked_by']}]: {r['error']}"
              for ref, rs in results.items() for r in rs if r["error"]]
    assert not errors, "\n".join(errors)


def test_the_checker_rejects_unknown_fields_and_bad_values() -> None:
    """The strict checks can fail: a typo'd field in each family is reported."""
    bad = [
        ("deployment-typo", {"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": "x", "namespace": "y"},
                             "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                                 "metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{
                                     "name": "a", "image": "b",
                                     "securityContext": {"readOnlyRootFS": True}}]}}}}),
        ("netpol-typo", {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"name": "x", "namespace": "y"},
                         "spec": {"podSelector": {}, "egres": []}}),
        ("authz-typo", {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "x", "namespace": "y"},
                        "spec": {"action": "ALLOW", "rules": [
                            {"to": [{"operation": {"path": ["/v1/models/*"]}}]}]}}),
        ("sidecar-enum", {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
                          "metadata": {"name": "x", "namespace": "y"},
                          "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY"}}}),
        # CEL rules of the CRDs (x-kubernetes-validations):
        ("cel-se-ports", {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                          "metadata": {"name": "x", "namespace": "y"},
                          "spec": {"hosts": ["a.example.com"], "resolution": "DNS", "ports": [
                              {"number": 443, "name": "a", "protocol": "TLS"},
                              {"number": 443, "name": "b", "protocol": "TLS"}]}}),
        ("cel-pa-selector", {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                             "metadata": {"name": "x", "namespace": "y"},
                             "spec": {"portLevelMtls": {"9464": {"mode": "PERMISSIVE"}}}}),
        ("cel-jwks-scheme", {"apiVersion": "security.istio.io/v1",
                             "kind": "RequestAuthentication",
                             "metadata": {"name": "x", "namespace": "y"},
                             "spec": {"jwtRules": [{"issuer": "https://i.example.com",
                                                    "jwksUri": "ftp://i.example.com/k"}]}}),
    ]
    results = run_schema_check(bad)
    failed = {r["ref"] for r in results if r["error"]}
    assert failed == {name for name, _ in bad}, results
    by_ref = {r["ref"]: r["error"] for r in results}
    assert "port number cannot be duplicated" in by_ref["cel-se-ports"]
    assert "failed to run" not in "".join(e for e in by_ref.values() if e)
