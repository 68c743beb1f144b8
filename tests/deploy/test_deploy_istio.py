"""Istio objects obey the rules istiod enforces beyond the schemas, and the mesh policies keep
the promises of the deploy guide. The same checks run on the design document's original
examples and must find each flaw the guide lists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from deploykit import authzconfig, doctables, invariants, istio, render

HERE = Path(__file__).parent
DESIGN_DOC = render.load_docs((HERE / "fixtures" / "design-doc-manifests.yaml").read_text(),
                              "design-doc-manifests.yaml")


def istiod_problems(docs, providers) -> list[str]:
    return (istio.check_service_entries(docs) + istio.check_sidecars(docs)
            + istio.check_authorization_policies(docs, providers)
            + istio.check_request_authentications(docs)
            + istio.check_peer_authentications(docs))


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_istio_objects_pass_istiod_rules(rendered, overlay: str) -> None:
    problems = istiod_problems(rendered[overlay], authzconfig.provider_names())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", render.FULL_OVERLAYS)
def test_protected_paths_are_rate_limited_and_need_a_token(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    problems = invariants.protected_path_problems(docs, authzconfig.view(docs))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", render.FULL_OVERLAYS)
def test_sidecars_keep_the_rate_limiter_visible(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    assert render.find(docs, "Sidecar"), "the model-loader Sidecar is part of the policies"
    problems = invariants.sidecar_problems(docs, authzconfig.view(docs))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_every_policy_namespace_has_dns_and_istiod(rendered, readme, overlay: str) -> None:
    docs = rendered[overlay]
    namespaces = {d["metadata"]["namespace"] for d in docs if d["kind"] == "NetworkPolicy"}
    # The minimal installs put no NetworkPolicy into the workloads' namespaces.
    expected = {"authz-system"} | ({"ml-serving", "ml-training", "ml-sensitive"}
                                   if overlay in render.FULL_OVERLAYS else set())
    assert namespaces == expected
    problems = invariants.network_baseline_problems(docs, doctables.endpoints(readme))
    assert not problems, "\n".join(problems)


def test_custom_policy_uses_a_registered_provider(rendered) -> None:
    names = authzconfig.provider_names()
    assert names == ["rate-limiter", "rate-limiter-body", "rate-limiter-http"]
    for docs in rendered.values():
        custom = [p for p in render.find(docs, "AuthorizationPolicy")
                  if p["spec"].get("action") == "CUSTOM"]
        assert custom and all(p["spec"]["provider"]["name"] in names for p in custom)


# --- the checks can fail: the design document's examples ---------------------------------

@pytest.fixture(scope="module")
def design_view(rendered) -> invariants.AuthzView:
    # The design document's intent (same paths, audience) with its own (absent) registration.
    return authzconfig.view(rendered["dev"])


def test_design_doc_istiod_rules_flag_its_flaws() -> None:
    problems = "\n".join(istiod_problems(DESIGN_DOC, providers=[]))
    assert "wildcard host '*.huggingface.co' with resolution DNS" in problems
    assert "ServiceEntry <no namespace>/allowed-model-registries: no namespace" in problems
    assert "'allowed-model-registries' is not a DNS name of a service" in problems
    assert "provider 'rate-limiter' is not registered" in problems


def test_design_doc_invariants_flag_its_flaws(design_view) -> None:
    problems = "\n".join(invariants.protected_path_problems(DESIGN_DOC, design_view))
    assert "no RequestAuthentication selects ml-serving" in problems
    assert "POST /v2/models/example-model/infer is not covered by the CUSTOM" in problems
    assert "GET /v1/models/example-model/infer is denied even with a valid token" in problems
    assert "POST /v1/models/example-model/infer is denied even with a valid token" in problems
    assert "admits POST /v2/models/* with a token but the CUSTOM" in problems
    assert "differ from the authz config's public_paths" in problems
    assert "public path GET /v2/health/live is denied" not in problems  # /v2/health/* admits it


def test_design_doc_sidecar_hides_the_rate_limiter(design_view) -> None:
    problems = invariants.sidecar_problems(DESIGN_DOC, design_view)
    assert any("hides authz-system/rate-limiter.authz-system.svc.cluster.local" in p
               for p in problems), problems


def test_design_doc_network_baseline_flags_its_flaws(readme) -> None:
    problems = "\n".join(invariants.network_baseline_problems(DESIGN_DOC,
                                                              doctables.endpoints(readme)))
    assert "ml-serving/inference-service cannot reach DNS over TCP 53" in problems
    assert "ml-serving/inference-service cannot reach istiod on 15012" in problems
    assert "ml-serving/inference-service can reach the cloud metadata address" in problems
    assert "ml-sensitive/pii-processor cannot reach DNS over UDP 53" in problems
    assert "ml-training/training-worker cannot reach istiod" in problems


def test_requestauthentication_must_match_the_authz_config(rendered) -> None:
    """Changing the issuer on one side only is caught."""
    docs = rendered["production"]
    view = authzconfig.view(docs)
    drifted = dataclasses.replace(view, issuer="https://other-idp.example.net")
    problems = "\n".join(invariants.protected_path_problems(docs, drifted))
    assert "no RequestAuthentication jwtRule matches the authz config" in problems
    assert "is denied even with a valid token" in problems  # requestPrincipals pin the issuer


# --- who may call the rate limiter and Redis (mesh identity) -------------------------------

CHECK = "/envoy.service.auth.v3.Authorization/Check"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_only_the_workload_namespace_may_call_the_rate_limiter(rendered, overlay: str) -> None:
    """Mesh identities of the CUSTOM policy's namespace (ml-serving, or the one values.yaml
    names: the selected sidecars or the waypoint) and nobody else."""
    docs = rendered[overlay]
    labels = {"app": "rate-limiter"}
    workload_ns, _, _ = authzconfig.workload(overlay)

    def allowed(**kw) -> bool:
        if kw.get("source_namespace") == "ml-serving":
            kw["source_namespace"] = workload_ns
        return istio.evaluate(docs, "authz-system", labels, istio.Request(**kw)).allowed

    assert allowed(method="POST", path=CHECK, port=9000, source_namespace="ml-serving")
    assert not allowed(method="POST", path=CHECK, port=9000, source_namespace="ml-training")
    assert not allowed(method="POST", path=CHECK, port=9000)  # no mesh identity
    # The HTTP edge: any method and path (the client's own, under /check), same callers.
    for method in ("GET", "POST", "HEAD"):
        check = "/check/v1/models/m:predict"
        assert allowed(method=method, path=check, port=8000, source_namespace="ml-serving")
        assert not allowed(method=method, path=check, port=8000,
                           source_namespace="ml-training")
        assert not allowed(method=method, path=check, port=8000)
    assert allowed(method="GET", path="/metrics", port=9464)   # Prometheus, outside the mesh
    assert not allowed(method="POST", path="/metrics", port=9464)


def test_only_the_rate_limiter_identity_may_use_redis(rendered) -> None:
    docs = rendered["dev"]
    ours = "cluster.local/ns/authz-system/sa/authz"
    dep = render.one(docs, "Deployment", "rate-limiter", "authz-system")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == ours.rsplit("/", 1)[1]

    def allowed(principal: str | None) -> bool:
        req = istio.Request("", "", port=6379, source_principal=principal)
        return istio.evaluate(docs, "authz-system", {"app": "redis"}, req).allowed

    assert allowed(ours)
    assert not allowed("cluster.local/ns/ml-serving/sa/default")
    assert not allowed(None)


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_authz_system_requires_mtls(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    default = render.one(docs, "PeerAuthentication", "default", "authz-system")
    assert default["spec"] == {"mtls": {"mode": "STRICT"}}
    metrics = render.one(docs, "PeerAuthentication", "rate-limiter-metrics", "authz-system")
    assert metrics["spec"]["portLevelMtls"] == {"9464": {"mode": "PERMISSIVE"}}
