"""Probes match the service's health semantics (authz/server/app.py): "liveness" is SERVING
once the process listens; the Authorization service only once keys and Redis are ready. A
startup or liveness probe on readiness would restart pods in a loop during a Redis or IdP
outage, which a restart never fixes."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deploy" / "base" / "deployment.yaml"


def test_probes_use_liveness_and_readiness_services() -> None:
    docs = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d]
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = [c for c in dep["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "authz"]
    assert container["startupProbe"]["grpc"]["service"] == "liveness"
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert container["readinessProbe"]["grpc"]["service"] == "envoy.service.auth.v3.Authorization"
