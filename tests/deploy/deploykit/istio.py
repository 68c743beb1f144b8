"""Rules istiod enforces (or that make a policy silently useless) which the CRD schemas miss,
and a small evaluator of AuthorizationPolicy for the invariants the deploy guide promises.

Sources: istio/istio pkg/config/validation (ServiceEntry, Sidecar, AuthorizationPolicy
validation), pilot/pkg/security/authz (how CUSTOM/ALLOW rules become Envoy RBAC), and the
notes in deploy/README.md. Each check returns a list of problems (strings naming the object),
so tests can assert both "our manifests have none" and "the design document's examples have
these".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .netpol import selector_matches

Doc = Mapping[str, Any]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_FQDN = re.compile(r"^(?=.{1,253}$)([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?\.)+"
                   r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?$")
# Rule fields that a CUSTOM policy may not use: the ext_authz filter runs before the sidecar
# authenticates anything, so these would be evaluated on nothing (istiod rejects them).
_CUSTOM_FORBIDDEN_SOURCE = ("principals", "notPrincipals", "requestPrincipals",
                            "notRequestPrincipals", "namespaces", "notNamespaces")
_CUSTOM_FORBIDDEN_CONDITIONS = ("source.principal", "source.namespace", "request.auth.")
_CONDITION_KEYS = re.compile(
    r"^(request\.headers\[[^\]]+\]|source\.ip|remote\.ip|source\.namespace|source\.principal"
    r"|request\.auth\.principal|request\.auth\.audiences|request\.auth\.presenter"
    r"|request\.auth\.claims(\[[^\]]+\])+|destination\.ip|destination\.port|connection\.sni"
    r"|experimental\.envoy\.filters\..+)$")


def _name(doc: Doc) -> str:
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')} {meta.get('namespace', '<no namespace>')}/{meta.get('name')}"


def _of(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def _valid_host(host: str, *, allow_wildcard: bool) -> bool:
    if host == "*":
        return allow_wildcard
    if host.startswith("*."):
        return allow_wildcard and bool(_FQDN.match(host[2:]))
    return bool(_FQDN.match(host))


# --- ServiceEntry ------------------------------------------------------------------------

def check_service_entries(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for se in _of(docs, "ServiceEntry"):
        spec = se.get("spec", {})
        resolution = spec.get("resolution", "NONE")
        for host in spec.get("hosts", []):
            if not _valid_host(host, allow_wildcard=True):
                problems.append(f"{_name(se)}: host {host!r} is not a DNS name")
            if (resolution in ("DNS", "DNS_ROUND_ROBIN") and "*" in host
                    and not spec.get("endpoints")):
                problems.append(
                    f"{_name(se)}: wildcard host {host!r} with resolution {resolution} and no "
                    "endpoints: istiod rejects it (hosts must be FQDN); put wildcards in a "
                    "separate entry with resolution NONE")
        if not se.get("metadata", {}).get("namespace"):
            problems.append(f"{_name(se)}: no namespace (lands wherever it is applied)")
    return problems


# --- Sidecar -----------------------------------------------------------------------------

def split_sidecar_host(host: str) -> tuple[str, str] | None:
    parts = host.split("/")
    if len(parts) != 2:
        return None
    return parts[0], parts[1]


def check_sidecars(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for sc in _of(docs, "Sidecar"):
        for listener in sc.get("spec", {}).get("egress", []):
            for host in listener.get("hosts", []):
                split = split_sidecar_host(host)
                if split is None:
                    problems.append(f"{_name(sc)}: egress host {host!r} is not namespace/dnsName")
                    continue
                ns, dns = split
                if ns not in ("*", ".", "~") and not _DNS1123_LABEL.match(ns):
                    problems.append(f"{_name(sc)}: {host!r}: {ns!r} is not a namespace")
                if not _valid_host(dns, allow_wildcard=True):
                    problems.append(
                        f"{_name(sc)}: {host!r}: {dns!r} is not a DNS name of a service "
                        "(a resource name matches no host)")
    return problems


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def sidecar_exposes(sc: Doc, namespace: str, host: str) -> bool:
    """Whether a Sidecar's egress lets its proxies see `host` of `namespace`."""
    own_ns = sc.get("metadata", {}).get("namespace")
    for listener in sc.get("spec", {}).get("egress", []):
        for entry in listener.get("hosts", []):
            split = split_sidecar_host(entry)
            if split is None:
                continue
            ns, dns = split
            ns_ok = ns == "*" or ns == namespace or (ns == "." and own_ns == namespace)
            if ns_ok and _host_matches(dns, host):
                return True
    return False


# --- AuthorizationPolicy / RequestAuthentication / PeerAuthentication --------------------

def _check_path_pattern(where: str, path: str) -> list[str]:
    if path == "*" or "*" not in path:
        return []
    if path.count("*") == 1 and (path.startswith("*") or path.endswith("*")):
        return []
    return [f"{where}: path {path!r}: only prefix, suffix or presence matches are supported"]


GATEWAY_API = "gateway.networking.k8s.io"
# What an AuthorizationPolicy may target (istio/istio pkg/config/validation, allowedTargetRefs,
# and pilot/pkg/model/authorization.go for HTTPRoute), as (group, kind).
_TARGET_KINDS = {("", "Service"), ("networking.istio.io", "ServiceEntry"),
                 (GATEWAY_API, "Gateway"), (GATEWAY_API, "GatewayClass"),
                 (GATEWAY_API, "HTTPRoute")}


def target_refs(policy: Doc) -> list[Mapping[str, Any]]:
    spec = policy.get("spec", {})
    return list(spec.get("targetRefs") or []) + ([spec["targetRef"]] if spec.get("targetRef")
                                                  else [])


def _target_ref_problems(ap: Doc, docs: Iterable[Doc]) -> list[str]:
    """The attachment rules (docs/research Q3): targetRefs or a selector, never both; no
    cross-namespace reference; a Gateway target only from the Gateway's namespace (the
    waypoint attaches policies of its own namespace only); CUSTOM never on an HTTPRoute (istiod
    indexes only ALLOW and DENY for HTTPRoute targets: the policy would silently do nothing)."""
    where, spec = _name(ap), ap.get("spec", {})
    refs = target_refs(ap)
    if not refs:
        return []
    problems = []
    namespace = ap.get("metadata", {}).get("namespace")
    if spec.get("selector"):
        problems.append(f"{where}: only one of targetRefs or selector can be set")
    for ref in refs:
        group, kind, name = ref.get("group", ""), ref.get("kind"), ref.get("name")
        if (group, kind) not in _TARGET_KINDS:
            problems.append(f"{where}: cannot target {kind} of group {group!r}")
        if ref.get("namespace"):
            problems.append(f"{where}: targetRef namespace must not be set; cross namespace "
                            "referencing is not supported")
        if kind == "HTTPRoute" and spec.get("action") == "CUSTOM":
            problems.append(f"{where}: CUSTOM cannot target an HTTPRoute (never enforced); "
                            "target the waypoint Gateway")
        if kind == "GatewayClass" and namespace != "istio-system":
            problems.append(f"{where}: a GatewayClass target applies only from the root "
                            "namespace")
        if (group, kind) == (GATEWAY_API, "Gateway"):
            elsewhere = [g for g in _of(docs, "Gateway")
                         if g.get("metadata", {}).get("name") == name
                         and g.get("metadata", {}).get("namespace") != namespace]
            if elsewhere:
                problems.append(f"{where}: targets Gateway {name!r} of namespace "
                                f"{elsewhere[0]['metadata'].get('namespace')}: a waypoint "
                                "attaches only policies of its own namespace")
    return problems


def check_authorization_policies(docs: Iterable[Doc], providers: Sequence[str]) -> list[str]:
    docs = list(docs)
    problems = []
    for ap in _of(docs, "AuthorizationPolicy"):
        where = _name(ap)
        spec = ap.get("spec", {})
        action = spec.get("action", "ALLOW")
        if action == "CUSTOM":
            name = (spec.get("provider") or {}).get("name")
            if not name:
                problems.append(f"{where}: CUSTOM without provider.name")
            elif name not in providers:
                problems.append(
                    f"{where}: provider {name!r} is not registered in meshConfig "
                    f"(registered: {', '.join(providers) or 'none'}): Istio denies the "
                    "matched requests with 403")
        elif spec.get("provider"):
            problems.append(f"{where}: provider is only valid with action CUSTOM")
        problems += _target_ref_problems(ap, docs)
        for i, rule in enumerate(spec.get("rules") or []):
            rwhere = f"{where} rule {i}"
            for src in rule.get("from") or []:
                source = src.get("source", {})
                if action == "CUSTOM":
                    for key in _CUSTOM_FORBIDDEN_SOURCE:
                        if source.get(key):
                            problems.append(f"{rwhere}: CUSTOM rules cannot use {key}")
            for op in rule.get("to") or []:
                operation = op.get("operation", {})
                for key in ("paths", "notPaths"):
                    for path in operation.get(key, []):
                        problems += _check_path_pattern(rwhere, path)
                for key in ("ports", "notPorts"):
                    for port in operation.get(key, []):
                        if not str(port).isdigit() or not 0 < int(port) < 65536:
                            problems.append(f"{rwhere}: port {port!r} is not a port number")
            for cond in rule.get("when") or []:
                key = cond.get("key", "")
                if not _CONDITION_KEYS.match(key):
                    problems.append(f"{rwhere}: unknown condition key {key!r}")
                if action == "CUSTOM" and key.startswith(_CUSTOM_FORBIDDEN_CONDITIONS):
                    problems.append(f"{rwhere}: CUSTOM rules cannot use condition {key!r}")
                if not cond.get("values") and not cond.get("notValues"):
                    problems.append(f"{rwhere}: condition {key!r} without values")
    return problems


def check_request_authentications(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for ra in _of(docs, "RequestAuthentication"):
        for rule in ra.get("spec", {}).get("jwtRules", []):
            if not rule.get("issuer"):
                problems.append(f"{_name(ra)}: jwtRule without issuer")
            uri = rule.get("jwksUri")
            if uri is not None and not str(uri).startswith("https://"):
                problems.append(f"{_name(ra)}: jwksUri {uri!r} is not https")
    return problems


def check_peer_authentications(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for pa in _of(docs, "PeerAuthentication"):
        spec = pa.get("spec", {})
        if spec.get("portLevelMtls") and not spec.get("selector"):
            problems.append(f"{_name(pa)}: portLevelMtls needs a workload selector")
    return problems


# --- Evaluating AuthorizationPolicy for a request ---------------------------------------

@dataclass(frozen=True)
class Request:
    method: str
    path: str
    port: int = 8080
    # Set only when a RequestAuthentication validated a token: "<iss>/<sub>".
    request_principal: str | None = None
    claims: Mapping[str, Sequence[str]] = field(default_factory=dict)
    source_namespace: str | None = None
    source_principal: str | None = None


def _match_value(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return pattern == value


def _field(values: Sequence[str] | None, not_values: Sequence[str] | None,
           actual: str | None) -> bool:
    if values and (actual is None or not any(_match_value(v, actual) for v in values)):
        return False
    if not_values and actual is not None:
        return not any(_match_value(v, actual) for v in not_values)
    return True


def _source_matches(source: Mapping[str, Any], req: Request) -> bool:
    return (_field(source.get("requestPrincipals"), source.get("notRequestPrincipals"),
                   req.request_principal)
            and _field(source.get("principals"), source.get("notPrincipals"),
                       req.source_principal)
            and _field(source.get("namespaces"), source.get("notNamespaces"),
                       req.source_namespace))


def _operation_matches(op: Mapping[str, Any], req: Request) -> bool:
    path = req.path.split("?", 1)[0]  # RBAC matches url_path: the query is excluded
    return (_field(op.get("methods"), op.get("notMethods"), req.method)
            and _field(op.get("paths"), op.get("notPaths"), path)
            and _field([str(p) for p in op.get("ports", [])] or None,
                       [str(p) for p in op.get("notPorts", [])] or None, str(req.port)))


def _condition_matches(cond: Mapping[str, Any], req: Request) -> bool:
    key = cond["key"]
    m = re.fullmatch(r"request\.auth\.claims\[([^\]]+)\]", key)
    if m:
        actual = list(req.claims.get(m.group(1), [])) if req.request_principal else []
    elif key == "request.auth.principal":
        actual = [req.request_principal] if req.request_principal else []
    elif key == "source.namespace":
        actual = [req.source_namespace] if req.source_namespace else []
    elif key == "destination.port":
        actual = [str(req.port)]
    else:
        raise ValueError(f"condition {key!r} is not modelled")
    values, not_values = cond.get("values"), cond.get("notValues")
    if values and not any(_match_value(v, a) for v in values for a in actual):
        return False
    return not (not_values and any(_match_value(v, a) for v in not_values for a in actual))


def rule_matches(rule: Mapping[str, Any], req: Request) -> bool:
    sources = rule.get("from") or []
    if sources and not any(_source_matches(s.get("source", {}), req) for s in sources):
        return False
    ops = rule.get("to") or []
    if ops and not any(_operation_matches(o.get("operation", {}), req) for o in ops):
        return False
    return all(_condition_matches(c, req) for c in rule.get("when") or [])


def policy_matches(policy: Doc, req: Request) -> bool:
    rules = policy.get("spec", {}).get("rules")
    if rules is None:
        # No rules: ALLOW matches nothing, DENY/CUSTOM match nothing.
        return False
    return any(rule_matches(r, req) for r in rules)


def selecting(docs: Iterable[Doc], kind: str, namespace: str,
              labels: Mapping[str, str], gateway: str | None = None) -> list[Doc]:
    """The objects of `kind` that apply to the pods with `labels` in `namespace` (selector, or
    namespace-wide), or with `gateway` to that namespace's waypoint Gateway (targetRefs). A
    policy with targetRefs never applies to the pods themselves, and under ambient the pods'
    selector policies are ztunnel's, never the waypoint's."""
    out = []
    for d in _of(docs, kind):
        if d.get("metadata", {}).get("namespace") != namespace:
            continue
        refs = target_refs(d)
        if gateway is not None or refs:
            if any(r.get("group") == GATEWAY_API and r.get("kind") == "Gateway"
                   and r.get("name") == gateway for r in refs):
                out.append(d)
            continue
        spec = d.get("spec", {})
        selector = spec.get("selector")
        if kind == "Sidecar":
            wl = spec.get("workloadSelector")
            selector = {"matchLabels": wl.get("labels", {})} if wl else None
        if selector_matches(selector, labels):
            out.append(d)
    return out


@dataclass(frozen=True)
class Verdict:
    custom_providers: tuple[str, ...]  # CUSTOM providers consulted for the request
    allowed: bool                      # after DENY and ALLOW policies (CUSTOM aside)


def evaluate(docs: Iterable[Doc], namespace: str, labels: Mapping[str, str],
             req: Request, gateway: str | None = None) -> Verdict:
    """The policies' verdict at the pods' sidecar, or with `gateway` at the waypoint."""
    docs = list(docs)
    policies = selecting(docs, "AuthorizationPolicy", namespace, labels, gateway)
    custom = tuple(p["spec"]["provider"]["name"] for p in policies
                   if p["spec"].get("action") == "CUSTOM" and policy_matches(p, req))
    if any(p["spec"].get("action") == "DENY" and policy_matches(p, req) for p in policies):
        return Verdict(custom, False)
    allows = [p for p in policies if p["spec"].get("action", "ALLOW") == "ALLOW"]
    allowed = not allows or any(policy_matches(p, req) for p in allows)
    return Verdict(custom, allowed)
