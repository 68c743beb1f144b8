"""The promises the deploy guide makes about the mesh policies, as checks that return problems.

- Every protected inference path (the authz config's protected_prefixes) is covered by the
  CUSTOM rate-limiter policy AND admitted by the ALLOW policy only with a token validated by a
  RequestAuthentication that matches the authz config (issuer, JWKS, audience).
- Every path the ALLOW policy admits with a token is rate-limited (CUSTOM covers it).
- Without a token, exactly the authz config's public paths are admitted.
- A Sidecar in a namespace with a CUSTOM policy keeps the provider's service visible.
- Every pod in a namespace with NetworkPolicies can resolve names (UDP and TCP 53) and reach
  istiod (15012), and no pod can reach the cloud metadata address.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import istio
from .netpol import Endpoint, Model, contains

Doc = Mapping[str, Any]

KUBE_DNS = Endpoint("kube-dns", namespace="kube-system", labels={"k8s-app": "kube-dns"})
ISTIOD = Endpoint("istiod", namespace="istio-system", labels={"app": "istiod"})
CLOUD_METADATA = Endpoint("cloud-metadata", ip="169.254.169.254")


@dataclass(frozen=True)
class AuthzView:
    """What the mesh policies must agree with: the authz config and where the CUSTOM policy
    applies."""

    protected_prefixes: Sequence[str]
    public_paths: Sequence[str]
    issuer: str
    jwks_url: str | None
    audience: str
    provider: str
    provider_host: str
    provider_namespace: str
    workload_namespace: str
    workload_labels: Mapping[str, str]
    # Ambient: the waypoint Gateway the CUSTOM policy is attached to (None: the pods' sidecars).
    workload_gateway: str | None = None


def _sample(pattern: str) -> str:
    return pattern.replace("*", "example-model/infer")


def protected_path_problems(docs: Sequence[Doc], view: AuthzView) -> list[str]:
    problems: list[str] = []
    ns, labels = view.workload_namespace, view.workload_labels
    ras = istio.selecting(docs, "RequestAuthentication", ns, labels)
    rules = [r for ra in ras for r in ra["spec"].get("jwtRules", [])]
    # A valid token of our issuer becomes a request principal only if a RequestAuthentication
    # on the workload accepts that issuer (and audience); otherwise the sidecar sees none.
    accepted = any(r.get("issuer") == view.issuer
                   and view.audience in r.get("audiences", [view.audience]) for r in rules)
    token: dict[str, Any] = {"claims": {"aud": [view.audience]}}
    if accepted:
        token["request_principal"] = f"{view.issuer}/user-1"
    if not rules:
        problems.append(f"no RequestAuthentication selects {ns} {dict(labels)}: no request "
                        "ever has a request principal, every rule that needs one denies")
    elif not any(r.get("issuer") == view.issuer and r.get("jwksUri") == view.jwks_url
                 and view.audience in r.get("audiences", [])
                 and r.get("forwardOriginalToken") is True for r in rules):
        problems.append(
            f"no RequestAuthentication jwtRule matches the authz config (issuer "
            f"{view.issuer}, jwksUri {view.jwks_url}, audience {view.audience}, "
            "forwardOriginalToken true)")

    for prefix in view.protected_prefixes:
        path = prefix + "example-model/infer"
        for method in ("GET", "POST"):
            anon = istio.evaluate(docs, ns, labels, istio.Request(method, path))
            authed = istio.evaluate(docs, ns, labels, istio.Request(method, path, **token))
            if view.provider not in authed.custom_providers:
                problems.append(f"{method} {path} is not covered by the CUSTOM "
                                f"{view.provider!r} policy (never rate-limited)")
            if anon.allowed:
                problems.append(f"{method} {path} is admitted without a token")
            if not authed.allowed:
                problems.append(f"{method} {path} is denied even with a valid token")

    allow = [p for p in istio.selecting(docs, "AuthorizationPolicy", ns, labels)
             if p["spec"].get("action", "ALLOW") == "ALLOW"]
    if not allow:
        problems.append(f"no ALLOW AuthorizationPolicy selects {ns} {dict(labels)}")
    anonymous_paths: set[str] = set()
    for policy in allow:
        for rule in policy["spec"].get("rules") or []:
            sources = rule.get("from") or []
            needs_token = bool(sources) and all(
                s.get("source", {}).get("requestPrincipals") for s in sources)
            for op in rule.get("to") or []:
                operation = op.get("operation", {})
                if operation.get("ports"):
                    continue  # a metrics port rule, not the app's API
                for pattern in operation.get("paths", ["*"]):
                    if not needs_token:
                        anonymous_paths.add(pattern)
                        continue
                    for method in operation.get("methods", ["GET", "POST"]):
                        req = istio.Request(method, _sample(pattern), **token)
                        verdict = istio.evaluate(docs, ns, labels, req)
                        if view.provider not in verdict.custom_providers:
                            problems.append(
                                f"{policy['metadata']['name']} admits {method} {pattern} with "
                                f"a token but the CUSTOM {view.provider!r} policy does not "
                                "cover it (never rate-limited)")
    if anonymous_paths != set(view.public_paths):
        problems.append(f"paths admitted without a token {sorted(anonymous_paths)} differ from "
                        f"the authz config's public_paths {sorted(view.public_paths)}")
    for public in view.public_paths:
        if not istio.evaluate(docs, ns, labels, istio.Request("GET", public)).allowed:
            problems.append(f"public path GET {public} is denied")
    return problems


def custom_coverage_problems(docs: Sequence[Doc], view: AuthzView) -> list[str]:
    """What overlays/minimal promises: every protected prefix reaches the CUSTOM provider at
    the enforcement point (the selected pods' sidecars, or the waypoint), with or without a
    token, so the service's own token check and quotas apply to each of them."""
    problems = []
    ns, labels, gateway = view.workload_namespace, view.workload_labels, view.workload_gateway
    where = f"waypoint {ns}/{gateway}" if gateway else f"{ns} {dict(labels)}"
    for prefix in view.protected_prefixes:
        path = prefix + "example-model/infer"
        for method in ("GET", "POST"):
            verdict = istio.evaluate(docs, ns, labels, istio.Request(method, path), gateway)
            if verdict.custom_providers != (view.provider,):
                problems.append(f"{method} {path} at {where} goes to CUSTOM providers "
                                f"{verdict.custom_providers}, not only {view.provider!r}")
    return problems


def sidecar_problems(docs: Sequence[Doc], view: AuthzView) -> list[str]:
    problems = []
    custom_namespaces = {p["metadata"]["namespace"] for p in docs
                         if p.get("kind") == "AuthorizationPolicy"
                         and p["spec"].get("action") == "CUSTOM"}
    for sc in docs:
        if sc.get("kind") != "Sidecar":
            continue
        if sc["metadata"].get("namespace") in custom_namespaces and not istio.sidecar_exposes(
                sc, view.provider_namespace, view.provider_host):
            problems.append(
                f"Sidecar {sc['metadata']['namespace']}/{sc['metadata']['name']} hides "
                f"{view.provider_namespace}/{view.provider_host}: its pods lose the ext_authz "
                "cluster and every check fails")
    return problems


def network_baseline_problems(docs: Iterable[Doc], pods: Iterable[Endpoint]) -> list[str]:
    """DNS and istiod for every pod (and an unlabelled one) of every policy namespace."""
    model = Model(docs)
    problems = []
    candidates = [p for p in pods if p.namespace in model.namespaces()]
    candidates += [Endpoint(f"{ns}/<unlabelled>", namespace=ns)
                   for ns in sorted(model.namespaces())]
    for pod in candidates:
        dns = model.reach(pod, KUBE_DNS)
        for proto in ("UDP", "TCP"):
            if not contains(dns, proto, 53):
                problems.append(f"{pod.namespace}/{pod.name} cannot reach DNS over {proto} 53")
        if not contains(model.reach(pod, ISTIOD), "TCP", 15012):
            problems.append(f"{pod.namespace}/{pod.name} cannot reach istiod on 15012 "
                            "(its sidecar never gets config)")
        if model.reach(pod, CLOUD_METADATA):
            problems.append(f"{pod.namespace}/{pod.name} can reach the cloud metadata address")
    return problems
