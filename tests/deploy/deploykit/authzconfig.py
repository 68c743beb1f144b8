"""The authz service config and quota as an overlay ships them (from the rendered ConfigMap),
read with the service's own loaders, and the mesh registration in its three forms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from authz.config.service_file import apply_environment, parse_settings
from authz.config.settings import Settings
from authz.quota.loader import parse_quota
from authz.quota.model import Quota

from . import render
from .invariants import AuthzView
from .render import Doc
from .tools import DEPLOY

REGISTRATION_DIR = DEPLOY / "istio"
# The workload the CUSTOM policy protects in the full overlays (design document:
# app=inference-service); the minimal ones take it from their values.yaml (`workload`).
WORKLOAD_NAMESPACE = "ml-serving"
WORKLOAD_LABELS = {"app": "inference-service"}


def workload(overlay: str) -> tuple[str, dict[str, str], str | None]:
    """(namespace, pod labels, waypoint Gateway or None) the overlay's CUSTOM policy is for,
    as its values.yaml says (the full overlays: the design document's workload)."""
    spec = render.values(overlay)
    if "namespace" not in spec:
        return WORKLOAD_NAMESPACE, dict(WORKLOAD_LABELS), None
    if "waypoint" in spec:
        return spec["namespace"], {}, spec["waypoint"]
    return spec["namespace"], dict(spec["workloadSelector"]["matchLabels"]), None


def config_map(docs: Sequence[Doc]) -> Doc:
    found = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("authz-config")
             and d["metadata"].get("namespace") == "authz-system"]
    assert len(found) == 1, f"expected one authz-config ConfigMap, found {len(found)}"
    return found[0]


def literal_env(docs: Sequence[Doc]) -> dict[str, str]:
    """The service container's environment variables with literal values (AUTHZ_ISSUER, ...;
    the Secret-backed ones are not known before they are applied)."""
    dep = next(d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "rate-limiter")
    [container] = [c for c in dep["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "authz"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def settings_and_quota(docs: Sequence[Doc]) -> tuple[Settings, Quota]:
    """What the service runs with: the ConfigMap's config.yaml with the Deployment's
    environment overrides applied, as `load_settings` would in the pod."""
    data = config_map(docs)["data"]
    settings = parse_settings(yaml.safe_load(data["config.yaml"]), "config.yaml",
                              base_dir=Path("/etc/authz"))
    settings = apply_environment(settings, literal_env(docs))
    assert settings.quota_file == "/etc/authz/quota.yaml", settings.quota_file
    quota = parse_quota(yaml.safe_load(data["quota.yaml"]), "quota.yaml")
    return settings, quota


def registrations() -> dict[str, list[dict[str, Any]]]:
    """extensionProviders as written in each registration form."""
    operator = yaml.safe_load((REGISTRATION_DIR / "istio-operator.yaml").read_text())
    helm = yaml.safe_load((REGISTRATION_DIR / "helm-values.yaml").read_text())
    mesh = yaml.safe_load((REGISTRATION_DIR / "mesh-config.yaml").read_text())
    return {
        "IstioOperator": operator["spec"]["meshConfig"]["extensionProviders"],
        "Helm values": helm["meshConfig"]["extensionProviders"],
        "istio ConfigMap (data.mesh)": mesh["extensionProviders"],
    }


def provider_names() -> list[str]:
    names = {p["name"] for providers in registrations().values() for p in providers}
    return sorted(names)


# The two registrations of the one service: the gRPC provider (what the CUSTOM policy names by
# default) and the HTTP one (components/http-provider switches the policy to it).
GRPC_PROVIDER = "rate-limiter"
HTTP_PROVIDER = "rate-limiter-http"
# The gRPC one with includeRequestBodyInCheck (components/body-costs).
BODY_PROVIDER = "rate-limiter-body"


def provider(name: str) -> dict[str, Any]:
    """A provider entry of the registration (IstioOperator form) by name."""
    [found] = [p for p in registrations()["IstioOperator"] if p["name"] == name]
    return found


def view(docs: Sequence[Doc], overlay: str | None = None) -> AuthzView:
    settings, _ = settings_and_quota(docs)
    [issuer] = settings.auth.issuers
    registered = provider(GRPC_PROVIDER)
    host = registered["envoyExtAuthzGrpc"]["service"]
    namespace, labels, gateway = (workload(overlay) if overlay
                                  else (WORKLOAD_NAMESPACE, WORKLOAD_LABELS, None))
    return AuthzView(
        protected_prefixes=settings.paths.protected_prefixes,
        public_paths=settings.paths.public_paths,
        issuer=issuer.issuer,
        jwks_url=issuer.jwks_url,
        audience=settings.auth.audience,
        provider=registered["name"],
        provider_host=host,
        provider_namespace=host.split(".")[1],
        workload_namespace=namespace,
        workload_labels=labels,
        workload_gateway=gateway,
    )
