"""The reachability table in deploy/README.md is what the NetworkPolicies allow: a change that
opens or closes a path fails here until the table (the reviewed intent) says so too."""

from __future__ import annotations

import pytest
from deploykit import doctables, render
from deploykit.netpol import Endpoint, Model, format_ports, intersect, union


def test_reachability_table_matches_the_policies(rendered, readme) -> None:
    """The table is that of the full overlays (test_deploy_install checks the minimal ones:
    they add no NetworkPolicy outside authz-system)."""
    endpoints = doctables.endpoints(readme)
    models = {overlay: Model(rendered[overlay]) for overlay in render.FULL_OVERLAYS}
    computed = doctables.computed_rows(endpoints, models)
    documented = doctables.documented_rows(readme)
    opened = sorted(computed - documented)
    closed = sorted(documented - computed)
    assert not opened and not closed, (
        f"allowed by the policies but not in the table: {opened}\n"
        f"in the table but not allowed: {closed}\n"
        "If the change is intended, replace the table in deploy/README.md with:\n"
        + doctables.as_markdown(computed))


def test_endpoint_names_are_unique(readme) -> None:
    names = [e.name for e in doctables.endpoints(readme)]
    assert len(names) == len(set(names))


# --- the model itself ---------------------------------------------------------------------

def _np(ns: str, spec: dict) -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": ns}, "spec": spec}


A = Endpoint("a", namespace="n1", labels={"app": "a"})
B = Endpoint("b", namespace="n2", labels={"app": "b"})
OUT = Endpoint("out", ip="198.51.100.7")
META = Endpoint("meta", ip="169.254.169.254")


def test_unselected_pods_are_open_and_default_deny_closes() -> None:
    assert format_ports(Model([]).reach(A, B)) == "any"
    deny = _np("n2", {"podSelector": {}, "policyTypes": ["Ingress"]})
    assert Model([deny]).reach(A, B) == {}
    assert format_ports(Model([deny]).reach(B, A)) == "any"  # egress of n2 not isolated


def test_both_ends_must_allow() -> None:
    egress = _np("n1", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "n2"}}}],
        "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 90,
                                                    "endPort": 95}]}]})
    ingress = _np("n2", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{
        "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}],
        "ports": [{"port": 93}, {"protocol": "UDP", "port": 80}]}]})
    assert format_ports(Model([egress]).reach(A, B)) == "TCP 80, 90-95"
    assert format_ports(Model([egress, ingress]).reach(A, B)) == "TCP 93"


def test_pod_selector_without_namespace_selector_is_same_namespace() -> None:
    ingress = _np("n2", {"podSelector": {}, "ingress": [{
        "from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]})
    assert Model([ingress]).reach(A, B) == {}
    same_ns = Endpoint("a2", namespace="n2", labels={"app": "a"})
    assert format_ports(Model([ingress]).reach(same_ns, B)) == "any"


def test_ip_blocks_and_excepts() -> None:
    egress = _np("n1", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}],
        "ports": [{"protocol": "TCP", "port": 443}]}]})
    model = Model([egress])
    assert format_ports(model.reach(A, OUT)) == "TCP 443"
    assert model.reach(A, META) == {}
    assert model.reach(A, B) == {}  # ipBlock never matches pods in this model


def test_match_expressions() -> None:
    ingress = _np("n2", {"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["b", "c"]}]}, "ingress": []})
    assert Model([ingress]).reach(A, B) == {}
    other = Endpoint("c", namespace="n2", labels={"app": "z"})
    assert format_ports(Model([ingress]).reach(A, other)) == "any"


@pytest.mark.parametrize(("a", "b", "both", "either"), [
    ({"TCP": ((1, 10),)}, {"TCP": ((5, 20),)}, "TCP 5-10", "TCP 1-20"),
    ({"TCP": ((1, 1),)}, {"UDP": ((1, 1),)}, "", "TCP 1; UDP 1"),
])
def test_port_set_algebra(a, b, both, either) -> None:
    assert format_ports(intersect(a, b)) == both
    assert format_ports(union(a, b)) == either


def test_rendered_overlays_are_modelled_without_guessing(rendered) -> None:
    """No named ports or unknown selector operators anywhere (the model would raise)."""
    for docs in rendered.values():
        model = Model(docs)
        for policy in render.find(docs, "NetworkPolicy"):
            for key in ("ingress", "egress"):
                for rule in policy["spec"].get(key) or []:
                    for port in rule.get("ports") or []:
                        assert isinstance(port.get("port", 0), int), policy["metadata"]
        assert model.namespaces()
