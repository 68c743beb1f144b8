"""Every manifest parses, every overlay renders, and the service's Deployment is what the deploy
guide promises (replicas, probes, hardening, ports, config)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from deploykit import render
from deploykit.render import find, one
from deploykit.tools import DEPLOY

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_manifests() -> None:
    assert len(YAML_FILES) > 20


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc is None or isinstance(doc, (dict, list)), f"{path}: {doc!r}"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_overlay_renders_with_namespaced_objects(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    assert len(docs) > (30 if overlay in render.FULL_OVERLAYS else 15)
    seen = set()
    for doc in docs:
        meta = doc["metadata"]
        key = render.ref(doc)
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        if doc["kind"] != "Namespace":
            assert meta.get("namespace"), f"{key} has no namespace (would land in 'default')"


def test_base_alone_and_components_render(tmp_path: Path) -> None:
    """The base applies without Redis or monitoring CRDs; each component builds on it."""
    base = render.render(DEPLOY / "base")
    kinds = {d["kind"] for d in base}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    assert "StatefulSet" not in kinds
    combo = tmp_path / "combo"
    combo.mkdir()
    # kustomize accepts only relative paths to other kustomizations.
    (combo / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(DEPLOY / "base", combo)],
        "components": [os.path.relpath(DEPLOY / "components" / "monitoring", combo)],
    }))
    docs = render.load_docs(render.kustomize(combo), "base+monitoring")
    assert {"ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in docs}


def test_image_comes_from_the_kustomize_images_entry() -> None:
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert {"name": "authz", "newName": "ghcr.io/ml-platform/authz", "newTag": "0.1.0"} in \
        kustomization["images"]
    dep = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "authz"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_deployment_is_hardened_and_probed(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    dep = one(docs, "Deployment", "rate-limiter", "authz-system")
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "authz"
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["runAsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    [c] = pod["containers"]
    assert c["image"].startswith("ghcr.io/ml-platform/authz:")
    assert c["command"] == ["authz"]
    assert c["args"] == ["serve", "--config", "/etc/authz/config.yaml", "--workers", "1"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc.get("privileged") is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 9000, "http": 8000, "http-metrics": 9464}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 9000, probe
    assert c["readinessProbe"]["grpc"]["service"] == "envoy.service.auth.v3.Authorization"
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    config_volume = volumes[mounts["/etc/authz"]]["configMap"]["name"]
    assert find(docs, "ConfigMap", config_volume, "authz-system"), "config volume dangles"
    env = {e["name"]: e for e in c["env"]}
    ref = env["AUTHZ_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("authz-redis", "url")
    assert ref["optional"] is (overlay != "production")
    # The identity provider of values.yaml (components/issuer-env), in every overlay.
    assert {"AUTHZ_ISSUER", "AUTHZ_JWKS_URL"} <= set(env)
    # The pod is terminated only after the service's own drain (2 s) and grace (20 s).
    assert pod["terminationGracePeriodSeconds"] > 22


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_service_pdb_hpa_match_the_deployment(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    dep = one(docs, "Deployment", "rate-limiter", "authz-system")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service", "rate-limiter", "authz-system")
    assert svc["spec"]["selector"].items() <= labels.items()
    grpc = next(p for p in svc["spec"]["ports"] if p["port"] == 9000)
    assert grpc["name"] == "grpc" and grpc["appProtocol"] == "grpc"
    http = next(p for p in svc["spec"]["ports"] if p["port"] == 8000)
    assert http["name"] == "http" and http["appProtocol"] == "http"
    assert http["targetPort"] == "http"
    pdb = one(docs, "PodDisruptionBudget", "rate-limiter", "authz-system")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler", "rate-limiter", "authz-system")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "rate-limiter"}
    assert hpa["spec"]["minReplicas"] >= 2
    # A PDB that allows no disruption would block node drains forever.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or \
        pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_dev_has_the_trial_redis_and_production_does_not(rendered) -> None:
    dev, prod = rendered["dev"], rendered["production"]
    sts = one(dev, "StatefulSet", "redis", "authz-system")
    assert one(dev, "Service", "redis", "authz-system")["spec"]["selector"] == {"app": "redis"}
    assert sts["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"] is True
    assert not find(prod, "StatefulSet")
    assert one(prod, "NetworkPolicy", "rate-limiter-to-redis", "authz-system")


def test_namespace_is_injected_and_ml_namespaces_are_not_owned(rendered) -> None:
    for docs in rendered.values():
        namespaces = {d["metadata"]["name"]: d for d in find(docs, "Namespace")}
        # Only our own namespace: `kubectl delete -k` must never take ML workloads with it.
        assert set(namespaces) == {"authz-system"}
        assert namespaces["authz-system"]["metadata"]["labels"]["istio-injection"] == "enabled"
