"""Read and validate a quota file. Every error names the file, the key and what was expected."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..config.errors import ConfigError
from ..config.reader import Node, load_yaml, parse_yaml
from .model import BLOCKED, BUILTIN_PLANS, UNLIMITED, Limit, ModelRule, Plan, Quota

# Plan and limit names end up in Redis keys, metric labels and headers: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Model patterns: KServe/OIP model names plus glob characters.
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]-][A-Za-z0-9_.*?\[\]-]{0,127}$")


def load_quota(path: str | Path | None) -> Quota:
    """Load a quota file; None loads the embedded default (authz/quota/default.yaml)."""
    if path is None:
        text = resources.files("authz.quota").joinpath("default.yaml").read_text("utf-8")
        return parse_quota(parse_yaml(text, "<embedded default quota>"), "<embedded default quota>")
    return parse_quota(load_yaml(path), str(path))


def parse_quota(data: Any, file: str) -> Quota:
    root = Node.root(file, data)
    plan_claim = root.text("plan_claim", "plan", allow_empty=False)
    plans: dict[str, Plan] = {UNLIMITED: Plan(UNLIMITED, unlimited=True),
                              BLOCKED: Plan(BLOCKED, blocked=True)}
    plans_node = root.section("plans")
    for name in plans_node.data:
        key = plans_node.key(str(name))
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(file, key, "plan names are letters, digits, '_', '.', '-' (<= 64)")
        if name in BUILTIN_PLANS:
            raise ConfigError(file, key, f"{name!r} is a built-in plan and cannot be redefined")
        plans[name] = _plan(plans_node.child(key, plans_node.raw(name) or {}), name)
    default_plan = root.text("default_plan", allow_empty=False) if plans_node.data else \
        root.text("default_plan", BLOCKED)
    if default_plan not in plans:
        raise root.error("default_plan", f"plan {default_plan!r} is not defined under plans "
                         f"(defined: {', '.join(sorted(plans))})")
    overrides: dict[tuple[str, str], str] = {}
    for path, raw in root.items("overrides"):
        n = root.child(path, raw)
        issuer = n.text("issuer", allow_empty=False)
        subject = n.text("subject", allow_empty=False)
        plan = n.text("plan", allow_empty=False)
        n.done()
        if plan not in plans:
            defined = ", ".join(sorted(plans))
            raise n.error("plan", f"plan {plan!r} is not defined (defined: {defined})")
        if (issuer, subject) in overrides:
            raise n.error("subject", f"{subject!r} of {issuer!r} is overridden twice")
        overrides[(issuer, subject)] = plan
    root.done()
    return Quota(plan_claim=plan_claim, default_plan=default_plan, plans=plans,
                 overrides=overrides)


def _plan(n: Node, name: str) -> Plan:
    limits = _limits(n, "limits")
    models: tuple[ModelRule, ...] | None = None
    if n.has("models"):
        models_node = n.section("models")
        rules = []
        for pattern in models_node.data:
            key = models_node.key(str(pattern))
            if not isinstance(pattern, str) or not _PATTERN.match(pattern):
                raise ConfigError(n.file, key, "expected a model name or glob pattern "
                                  "(letters, digits, '_', '.', '-', '*', '?', '[]')")
            rn = models_node.child(key, models_node.raw(pattern) or {})
            cost = rn.integer("cost", 1, minimum=1, maximum=1_000_000)
            rule = ModelRule(pattern=pattern, cost=cost, limits=_limits(rn, "limits"))
            rn.done()
            for limit in (*limits, *rule.limits):
                if cost > limit.burst:
                    raise rn.error("cost", f"cost {cost} exceeds the burst {limit.burst:g} of "
                                   f"limit {limit.name!r}: such a request could never pass")
            rules.append(rule)
        models = tuple(rules)
        if not rules:
            raise n.error("models", "is empty: no model would be allowed (use the built-in "
                          "'blocked' plan for that)")
    n.done()
    # A plan that charges nothing is unlimited; that must be said explicitly (the built-in
    # `unlimited` plan), never the accident of a forgotten or mis-indented `limits:`.
    if not limits:
        if models is None:
            raise n.error("limits", "at least one limit is required (assign the built-in "
                          "'unlimited' plan for no limits)")
        for rule in models:
            if not rule.limits:
                raise ConfigError(n.file, n.key(f"models.{rule.pattern}.limits"),
                                  "no limit applies to this model: give the plan `limits` or "
                                  "this rule its own (or use the built-in 'unlimited' plan)")
    names = [lim.name for lim in limits] + [lim.name for r in models or () for lim in r.limits]
    dupes = {x for x in names if names.count(x) > 1}
    if dupes:
        raise n.error("limits", f"limit name {sorted(dupes)[0]!r} used twice in plan {name!r} "
                      "(names key the buckets, so they must be unique within a plan)")
    return Plan(name=name, limits=limits, models=models)


def _limits(n: Node, key: str) -> tuple[Limit, ...]:
    out = []
    for path, raw in n.items(key):
        ln = n.child(path, raw)
        name = ln.text("name", allow_empty=False)
        if not _NAME.match(name):
            raise ln.error("name", "limit names are letters, digits, '_', '.', '-' (<= 64)")
        count = ln.number("rate")
        per = ln.duration("per", 1.0)
        burst = ln.number("burst", count)
        ln.done()
        if not count / per > 0:
            raise ln.error("per", f"rate {count:g} per {per:g}s rounds to no refill at all")
        if burst < 1:
            raise ln.error("burst", f"expected >= 1 (a bucket holds one request), got {burst:g}")
        out.append(Limit(name=name, rate=count / per, burst=burst, count=count, per=per))
    return tuple(out)
