"""A model of Kubernetes NetworkPolicy semantics, to compute who may reach whom.

Semantics (kubernetes.io/docs/concepts/services-networking/network-policies):
- A pod is isolated for ingress (egress) if some policy in its namespace selects it and lists
  Ingress (Egress) in policyTypes; then only the union of those policies' rules is allowed.
  policyTypes defaults to [Ingress] plus Egress when `egress` is present.
- A connection needs the source's egress AND the destination's ingress to allow it.
- A peer with podSelector only means pods of the policy's namespace; namespaceSelector only
  means all pods of the selected namespaces; both means both; ipBlock means addresses outside
  the cluster (we never let an ipBlock match a pod: for pod IPs the behaviour depends on the
  CNI, and our policies must not rely on it).
- Empty `from`/`to` (or absent) means every peer; empty `ports` means every port and protocol.

Ports are sets of inclusive (low, high) ranges per protocol.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("TCP", "UDP", "SCTP")
ALL_PORTS = ((1, 65535),)
PortSet = dict[str, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class Endpoint:
    """A labelled pod (namespace + labels) or an address outside the cluster (ip)."""

    name: str
    namespace: str | None = None
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None

    def all_namespace_labels(self) -> dict[str, str]:
        assert self.namespace is not None
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


class ModelError(ValueError):
    """A policy uses something this model does not handle (so the result would be a guess)."""


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != str(value):
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], [str(v) for v in expr.get("values", [])]
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ModelError(f"unknown selector operator {op!r}")
    return True


def _normalize(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def union(a: PortSet, b: PortSet) -> PortSet:
    return {p: _normalize([*a.get(p, ()), *b.get(p, ())]) for p in PROTOCOLS
            if a.get(p) or b.get(p)}


def intersect(a: PortSet, b: PortSet) -> PortSet:
    out: PortSet = {}
    for p in PROTOCOLS:
        ranges = [(max(lo1, lo2), min(hi1, hi2))
                  for lo1, hi1 in a.get(p, ()) for lo2, hi2 in b.get(p, ())
                  if max(lo1, lo2) <= min(hi1, hi2)]
        if ranges:
            out[p] = _normalize(ranges)
    return out


def everything() -> PortSet:
    return {p: ALL_PORTS for p in PROTOCOLS}


def rule_ports(ports: list[Mapping[str, Any]] | None) -> PortSet:
    if not ports:
        return everything()
    out: PortSet = {}
    for entry in ports:
        proto = entry.get("protocol", "TCP")
        port = entry.get("port")
        if port is None:
            rng = ALL_PORTS
        elif isinstance(port, int):
            rng = ((port, int(entry.get("endPort", port))),)
        else:
            raise ModelError(f"named port {port!r}: the model needs numeric ports")
        out = union(out, {proto: rng})
    return out


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.is_pod or other.ip is None:
            return False
        addr = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        if addr not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(addr in ipaddress.ip_network(e) for e in block.get("except", []))
    if not other.is_pod:
        return False
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None and other.namespace != policy_ns:
        return False
    if ns_sel is not None and not selector_matches(ns_sel, other.all_namespace_labels()):
        return False
    return selector_matches(pod_sel, other.labels)


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


class Model:
    def __init__(self, policies: Iterable[Mapping[str, Any]]) -> None:
        self.policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]

    def namespaces(self) -> set[str]:
        return {p["metadata"]["namespace"] for p in self.policies}

    def _selecting(self, pod: Endpoint, direction: str) -> list[Mapping[str, Any]]:
        return [p for p in self.policies
                if p["metadata"]["namespace"] == pod.namespace
                and direction in policy_types(p["spec"])
                and selector_matches(p["spec"].get("podSelector") or {}, pod.labels)]

    def _allowed(self, pod: Endpoint, other: Endpoint, direction: str) -> PortSet:
        """Ports `pod` admits (Ingress, other = source) or may open (Egress, other = dest)."""
        if not pod.is_pod:
            return everything()  # outside the cluster: not ours to restrict
        selecting = self._selecting(pod, direction)
        if not selecting:
            return everything()
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        out: PortSet = {}
        for policy in selecting:
            ns = policy["metadata"]["namespace"]
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peers_key) or []
                if peers and not any(_peer_matches(peer, ns, other) for peer in peers):
                    continue
                out = union(out, rule_ports(rule.get("ports")))
        return out

    def reach(self, src: Endpoint, dst: Endpoint) -> PortSet:
        """Protocols/ports on which a connection from src to dst is allowed."""
        if not src.is_pod and not dst.is_pod:
            return {}
        return intersect(self._allowed(src, dst, "Egress"), self._allowed(dst, src, "Ingress"))


def format_ports(ports: PortSet) -> str:
    if not ports:
        return ""
    if all(ports.get(p) == ALL_PORTS for p in PROTOCOLS):
        return "any"
    parts = []
    for proto in PROTOCOLS:
        ranges = ports.get(proto)
        if not ranges:
            continue
        if ranges == ALL_PORTS:
            parts.append(f"{proto} any")
        else:
            parts.append(proto + " " + ", ".join(
                str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges))
    return "; ".join(parts)


def contains(ports: PortSet, proto: str, port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in ports.get(proto, ()))
