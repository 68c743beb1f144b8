"""The install paths of issue #17: overlays/minimal (the service and one CUSTOM policy),
overlays/minimal-ambient (the same on a waypoint), the opt-in namespace policies of the full
overlays, and the values each overlay sets in one place (values.yaml) reaching every object
that repeats them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from deploykit import authzconfig, invariants, istio, render
from deploykit.netpol import Endpoint, Model, contains, format_ports
from deploykit.tools import DEPLOY
from test_deploy_istio import istiod_problems
from test_deploy_schemas import run_schema_check


def _text(docs: list[render.Doc]) -> str:
    return json.dumps(docs)


def _custom(docs: list[render.Doc]) -> render.Doc:
    [custom] = [p for p in render.find(docs, "AuthorizationPolicy")
                if p["spec"].get("action") == "CUSTOM"]
    return custom


# --- overlays/minimal and minimal-ambient ---------------------------------------------------

@pytest.mark.parametrize("overlay", render.MINIMAL_OVERLAYS)
def test_minimal_custom_policy_covers_the_protected_prefixes(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    view = authzconfig.view(docs, overlay)
    problems = invariants.custom_coverage_problems(docs, view)
    assert not problems, "\n".join(problems)
    assert set(view.protected_prefixes) == {"/v1/models/", "/v2/models/"}


@pytest.mark.parametrize("overlay", render.MINIMAL_OVERLAYS)
def test_minimal_installs_only_the_service_and_the_custom_policy(rendered, overlay: str) -> None:
    """No default-deny, no Sidecar, no RequestAuthentication or ALLOW policy in the workload
    namespace, no namespace of theirs touched; and the values object is never rendered."""
    docs = rendered[overlay]
    outside = [render.ref(d) for d in docs if d["metadata"].get("namespace") != "authz-system"
               and d["kind"] != "Namespace"]
    assert outside == [render.ref(_custom(docs))]
    assert not render.find(docs, "Sidecar") and not render.find(docs, "RequestAuthentication")
    assert not render.find(docs, "InstallValues")
    assert "ml-training" not in _text(docs) and "ml-sensitive" not in _text(docs)


def test_minimal_policy_selects_only_the_set_workload(rendered) -> None:
    docs = rendered["minimal"]
    ns, labels, _ = authzconfig.workload("minimal")
    req = istio.Request("POST", "/v1/models/m/infer")
    assert istio.evaluate(docs, ns, labels, req).custom_providers == ("rate-limiter",)
    assert not istio.evaluate(docs, ns, {"app": "other"}, req).custom_providers
    assert not istio.evaluate(docs, "default", labels, req).custom_providers
    # Nothing else decides: no ALLOW policy, so the health paths and the rest pass the sidecar
    # unchecked, and the service's answer is the only gate on the model paths.
    assert istio.evaluate(docs, ns, labels, istio.Request("GET", "/v2/health/ready")).allowed
    assert not istio.evaluate(docs, ns, labels,
                              istio.Request("GET", "/v2/health/ready")).custom_providers


def test_ambient_policy_is_attached_to_the_waypoint(rendered) -> None:
    docs = rendered["minimal-ambient"]
    ns, _, gateway = authzconfig.workload("minimal-ambient")
    custom = _custom(docs)
    assert custom["metadata"]["namespace"] == ns
    assert "selector" not in custom["spec"]
    assert custom["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}]
    req = istio.Request("POST", "/v2/models/m/infer")
    assert istio.evaluate(docs, ns, {}, req, gateway=gateway).custom_providers == \
        ("rate-limiter",)
    # ztunnel (the pods' own enforcement point) never gets it: it cannot call a provider.
    assert not istio.evaluate(docs, ns, {"app": "inference-service"}, req).custom_providers


def test_targetref_rules_of_istiod_are_checked() -> None:
    def ap(ns: str, spec: dict) -> dict:
        return {"kind": "AuthorizationPolicy", "metadata": {"name": "p", "namespace": ns},
                "spec": {"action": "CUSTOM", "provider": {"name": "rate-limiter"},
                         "rules": [{}], **spec}}

    gw = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
    waypoint = {"kind": "Gateway", "metadata": {"name": "waypoint", "namespace": "ns-a"}}
    both = ap("ns-a", {"targetRefs": [gw], "selector": {"matchLabels": {"a": "b"}}})
    route = ap("ns-a", {"targetRefs": [{**gw, "kind": "HTTPRoute", "name": "r"}]})
    cross = ap("ns-a", {"targetRefs": [{**gw, "namespace": "ns-b"}]})
    elsewhere = ap("ns-b", {"targetRefs": [gw]})
    good = ap("ns-a", {"targetRefs": [gw]})
    problems = "\n".join(istio.check_authorization_policies(
        [both, route, cross, elsewhere, waypoint], ["rate-limiter"]))
    assert "only one of targetRefs or selector can be set" in problems
    assert "CUSTOM cannot target an HTTPRoute" in problems
    assert "targetRef namespace must not be set" in problems
    assert "AuthorizationPolicy ns-b/p: targets Gateway 'waypoint' of namespace ns-a" in problems
    assert not istio.check_authorization_policies([good, waypoint], ["rate-limiter"])


@pytest.mark.parametrize("overlay", render.MINIMAL_OVERLAYS)
def test_minimal_reachability(rendered, overlay: str) -> None:
    """Only the CUSTOM policy's callers (the selected pods, or the waypoint's) and Prometheus
    reach the rate limiter; it reaches DNS, istiod, HTTPS on public addresses and Redis."""
    model = Model(rendered[overlay])
    ns, labels, gateway = authzconfig.workload(overlay)
    waypoint_labels = {"gateway.networking.k8s.io/gateway-name": gateway or "waypoint"}
    limiter = Endpoint("rate-limiter", namespace="authz-system", labels={"app": "rate-limiter"})
    caller = Endpoint("caller", namespace=ns, labels=waypoint_labels if gateway else labels)
    other = Endpoint("other", namespace=ns,
                     labels=labels if gateway else {"app": "other"})
    prometheus = Endpoint("prometheus", namespace="monitoring",
                          labels={"app.kubernetes.io/name": "prometheus"})
    expected = "TCP 8000, 9000, 15008" if gateway else "TCP 8000, 9000"
    assert format_ports(model.reach(caller, limiter)) == expected
    assert model.reach(other, limiter) == {}
    assert format_ports(model.reach(prometheus, limiter)) == "TCP 9464, 15020, 15090"
    redis = Endpoint("redis", namespace="authz-system", labels={"app": "redis"})
    assert format_ports(model.reach(limiter, redis)) == "TCP 6379"
    assert contains(model.reach(limiter, Endpoint("internet", ip="203.0.113.10")), "TCP", 443)
    problems = invariants.network_baseline_problems(rendered[overlay], [limiter, redis])
    assert not problems, "\n".join(problems)
    # The workloads' namespace has no policies: the install does not isolate it.
    assert ns not in model.namespaces()


# --- one place: values.yaml -------------------------------------------------------------------

NEW_ISSUER = {"issuer": "https://login.example.net/tenant-7",
              "jwksUrl": "https://login.example.net/tenant-7/keys"}


def test_minimal_namespace_and_selector_are_set_in_one_place() -> None:
    labels = {"app.kubernetes.io/name": "my-model", "tier": "gpu"}
    docs = render.render_variant("minimal", {
        "namespace": "team-a", "workloadSelector": {"matchLabels": labels}, **NEW_ISSUER})
    custom = _custom(docs)
    assert custom["metadata"]["namespace"] == "team-a"
    assert custom["spec"]["selector"] == {"matchLabels": labels}
    ap = render.one(docs, "AuthorizationPolicy", "rate-limiter", "authz-system")
    assert ap["spec"]["rules"][0]["from"][0]["source"]["namespaces"] == ["team-a"]
    model = Model(docs)
    limiter = Endpoint("rl", namespace="authz-system", labels={"app": "rate-limiter"})
    assert format_ports(model.reach(Endpoint("w", namespace="team-a", labels=labels),
                                    limiter)) == "TCP 8000, 9000"
    assert not model.reach(Endpoint("w", namespace="ml-serving",
                                    labels={"app": "inference-service"}), limiter)
    settings, _ = authzconfig.settings_and_quota(docs)
    [issuer] = settings.auth.issuers
    assert (issuer.issuer, issuer.jwks_url) == (NEW_ISSUER["issuer"], NEW_ISSUER["jwksUrl"])
    # Nothing kept the old values (config.yaml's own comments aside).
    text = _text([d for d in docs if d["kind"] != "ConfigMap"])
    for old in ("ml-serving", "inference-service", "idp.example.com"):
        assert old not in text, old
    view = dataclasses.replace(authzconfig.view(docs), workload_namespace="team-a",
                               workload_labels=labels)
    assert not invariants.custom_coverage_problems(docs, view)


def test_ambient_namespace_and_waypoint_are_set_in_one_place() -> None:
    docs = render.render_variant("minimal-ambient", {"namespace": "team-b", "waypoint": "wp-1"})
    custom = _custom(docs)
    assert custom["metadata"]["namespace"] == "team-b"
    assert custom["spec"]["targetRefs"][0]["name"] == "wp-1"
    np = render.one(docs, "NetworkPolicy", "rate-limiter", "authz-system")
    assert np["spec"]["ingress"][0]["from"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "team-b"}},
        "podSelector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "wp-1"}}}]
    assert "ml-serving" not in _text(docs)


@pytest.mark.parametrize("overlay", render.FULL_OVERLAYS)
def test_full_overlays_take_the_issuer_from_one_place(overlay: str) -> None:
    docs = render.render_variant(overlay, NEW_ISSUER)
    view = authzconfig.view(docs)
    assert (view.issuer, view.jwks_url) == (NEW_ISSUER["issuer"], NEW_ISSUER["jwksUrl"])
    # The RequestAuthentication and the ALLOW policy's <issuer>/* follow (checked by the
    # invariants: they fail on any disagreement with the service config).
    problems = invariants.protected_path_problems(docs, view)
    assert not problems, "\n".join(problems)
    allow = render.one(docs, "AuthorizationPolicy", "inference-authz", "ml-serving")
    assert allow["spec"]["rules"][1]["from"][0]["source"]["requestPrincipals"] == \
        [NEW_ISSUER["issuer"] + "/*"]
    old = authzconfig.view(render.render(overlay)).issuer
    assert old not in _text([d for d in docs if d["kind"] != "ConfigMap"])


def test_every_overlay_sets_the_issuer_only_in_values_yaml() -> None:
    """No overlay file besides values.yaml names an issuer (the old three-file setup)."""
    for overlay in render.OVERLAYS:
        issuer = render.values(overlay)["issuer"]
        for path in (DEPLOY / "overlays" / overlay).rglob("*.yaml"):
            if path.name != "values.yaml":
                assert issuer not in path.read_text(), f"{path} repeats the issuer"


# --- the namespace policies as a component ---------------------------------------------------

@pytest.mark.parametrize("overlay", render.FULL_OVERLAYS)
def test_full_overlays_add_exactly_the_mesh_policies(rendered, overlay: str) -> None:
    mesh = {render.ref(d) for d in render.render(DEPLOY / "mesh")}
    managed = {render.ref(d) for d in rendered[overlay]
               if d["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by")
               == "ml-platform-policies"}
    assert managed == mesh


# --- the documented switch: an external Redis --------------------------------------------------

@pytest.mark.parametrize("overlay", render.MINIMAL_OVERLAYS)
def test_minimal_with_external_redis(rendered, overlay: str) -> None:
    docs = render.render_variant(overlay, {"redisSubnet": "10.44.0.0/16"},
                                 components={"redis": "external-redis"})
    assert not render.find(docs, "StatefulSet")
    egress = render.one(docs, "NetworkPolicy", "rate-limiter-to-redis", "authz-system")
    assert egress["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "10.44.0.0/16"}}]
    dep = render.one(docs, "Deployment", "rate-limiter", "authz-system")
    [env] = [e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
             if e["name"] == "AUTHZ_REDIS_URL"]
    assert env["valueFrom"]["secretKeyRef"]["optional"] is False
    assert len(docs) == len(rendered[overlay]) - 4  # StatefulSet, Service, 2 policies of Redis
    # The variant passes the same schema and istiod checks as the overlays.
    results = run_schema_check([(render.ref(d), d) for d in docs])
    errors = [f"{r['ref']}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    assert not istiod_problems(docs, authzconfig.provider_names())


def test_values_files_are_not_kubernetes_objects() -> None:
    for overlay in render.OVERLAYS:
        doc = yaml.safe_load((DEPLOY / "overlays" / overlay / "values.yaml").read_text())
        assert doc["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
