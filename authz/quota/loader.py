"""Read and validate a quota file. Every error names the file, the key and what was expected."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..config.yaml_reader import Node, parse_yaml, read_text
from ..errors import ConfigError
from .model import (
    BLOCKED,
    BUILTIN_PLANS,
    SHADOWABLE_REFUSALS,
    UNLIMITED,
    CostRule,
    Limit,
    ModelRule,
    Plan,
    Quota,
)

# Plan and limit names end up in Redis keys, metric labels and headers: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Claim names a limit can be scoped to (JWT claim names are strings; these are the plain ones).
_CLAIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.-]{0,63}$")
# Model patterns: KServe/OIP model names plus glob characters.
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]-][A-Za-z0-9_.*?\[\]-]{0,127}$")


# Bounds of a quota file's numbers (README "Quota file"). Bucket levels are doubles in Redis
# and in memory: at 1e12 tokens a double still resolves ~1/4000 of a token (2^53 / 1e12), and
# the largest LLM budgets (billions of tokens a month) fit a hundred times over.
MAX_TOKENS = 1e12
# A refill period from 1 ms (Redis TIME has microseconds, a period below a millisecond is a
# rate, better written per second) to a leap year (monthly and yearly budgets).
MIN_PER = 0.001
MAX_PER = 366 * 86400.0
# Time for an empty bucket to fill again, burst / (rate / per): it is the Redis key's TTL and
# the longest Retry-After. Ten years (3.2e11 ms) keeps the TTL a plain integer where Redis's
# Lua turns numbers into text (14 significant digits: 1e14 ms and more would be sent to PX as
# "1e+14", which Redis refuses) and Retry-After a reasonable integer.
MAX_TIME_TO_FULL = 10 * 365 * 86400.0
# A request's cost, in tokens (whole numbers: "one request" is the unit).
MAX_COST = 1_000_000
# Sizes: every limit of a request is one key in its single EVALSHA; plans and model rules are
# matched per request (memoized), so keep them to what a person writes by hand.
MAX_LIMITS_PER_REQUEST = 16
MAX_PLANS = 1000
MAX_MODEL_RULES = 1000
EMBEDDED = "<embedded default quota>"


def load_quota(path: str | Path | None, *, referrer: tuple[str, str] | None = None) -> Quota:
    """Load a quota file; None loads the embedded default (authz/quota/default.yaml).

    `referrer`: (config file, key) that names this file, so "cannot read" says where it came
    from (e.g. config.yaml: quota_file: cannot read /etc/authz/quota.yaml: No such file)."""
    if path is None:
        text = resources.files("authz.quota").joinpath("default.yaml").read_text("utf-8")
        return parse_quota(parse_yaml(text, EMBEDDED), EMBEDDED)
    if referrer is not None:
        text = read_text(path, file=referrer[0], key=referrer[1])
    else:
        text = read_text(path)
    return parse_quota(parse_yaml(text, str(path)), str(path))


def parse_quota(data: Any, file: str) -> Quota:
    """Every key checked; all problems raised together (`ConfigErrors`)."""
    if data is None or data == {}:
        # A ConfigMap that mounts empty must not become "everyone is blocked".
        raise ConfigError(file, "", "the quota file is empty (or only comments): it must "
                          "define plans and default_plan")
    root = Node.root(file, data)
    quota = read_quota(root)
    root.problems.raise_if_any()
    return quota


def read_quota(root: Node) -> Quota:
    """The quota from the file's top-level node, problems left in `root.problems`. Every key is
    read through a typed `Node` getter, so the same function, run through
    `authz.config.schema.SchemaRecorder`, is also the source of the JSON Schema."""
    problems = root.problems
    plan_claim = root.text("plan_claim", "plan", allow_empty=False)
    shadow = _Shadow(False, frozenset())
    with problems.part():
        shadow = _shadow(root, "shadow", shadow)
    plans: dict[str, Plan] = {UNLIMITED: Plan(UNLIMITED, unlimited=True),
                              BLOCKED: Plan(BLOCKED, blocked=True,
                                            shadow_refusals=shadow.refusals)}
    named = set(BUILTIN_PLANS)
    for name, plan_node in root.entries(
            "plans", pattern=_NAME, hint="plan names are letters, digits, '_', '.', '-' (<= 64)",
            limit=MAX_PLANS, what="plans", reserved=BUILTIN_PLANS,
            reserved_hint="is a built-in plan and cannot be redefined"):
        named.add(name)
        with problems.part():
            plans[name] = _plan(plan_node, name, shadow)
    default_plan = root.text("default_plan", BLOCKED, allow_empty=False)
    # Required once plans are defined (a rule across keys, which the schema does not carry):
    # everyone blocked must be said, not be what a forgotten key means.
    if len(named) > len(BUILTIN_PLANS) and not root.has("default_plan"):
        root.report("default_plan", "is required (a string) once plans are defined")
    elif default_plan not in named:
        root.report("default_plan", f"plan {default_plan!r} is not defined under plans "
                    f"(defined: {', '.join(sorted(named))})")
    overrides: dict[tuple[str, str], str] = {}
    for path, raw in root.items("overrides"):
        with problems.part():
            n = root.child(path, raw)
            issuer = n.text("issuer", allow_empty=False)
            subject = n.text("subject", allow_empty=False)
            plan = n.text("plan", allow_empty=False)
            n.done()
            if plan not in named:
                defined = ", ".join(sorted(named))
                n.report("plan", f"plan {plan!r} is not defined (defined: {defined})")
            if (issuer, subject) in overrides:
                n.report("subject", f"{subject!r} of {issuer!r} is overridden twice")
            overrides[(issuer, subject)] = plan
    root.done()
    return Quota(plan_claim=plan_claim, default_plan=default_plan, plans=plans,
                 overrides=overrides)


@dataclass(frozen=True, slots=True)
class _Shadow:
    rate_limits: bool  # every limit in shadow mode
    refusals: frozenset[str]  # refusals answered as marked allows


def _shadow(n: Node, key: str, inherited: _Shadow) -> _Shadow:
    """`shadow: true` (every limit), or `shadow: {rate_limits: bool, refusals: [...]}`; what a
    plan says adds to what the file says for all plans."""
    return n.either(
        # The flag is read first: `or` must not skip reading the key (it would be "unknown").
        key, lambda: _Shadow(n.flag(key, False) or inherited.rate_limits, inherited.refusals),
        lambda sn: _shadow_section(sn, inherited))


def _shadow_section(sn: Node, inherited: _Shadow) -> _Shadow:
    rate_limits = sn.flag("rate_limits", False)
    refusals = sn.str_list("refusals", (), choices=SHADOWABLE_REFUSALS, unknown="unknown refusal")
    sn.done()
    return _Shadow(inherited.rate_limits or rate_limits, inherited.refusals | set(refusals))


def _plan(n: Node, name: str, inherited: _Shadow) -> Plan:
    shadow = _shadow(n, "shadow", inherited)
    on_error = n.opt_choice("on_error", ("deny", "allow"))
    limits = _limits(n, "limits", shadow.rate_limits)
    models: tuple[ModelRule, ...] | None = None
    if n.has("models"):
        rules = []
        for pattern, rn in n.entries(
                "models", pattern=_PATTERN, limit=MAX_MODEL_RULES, what="model rules",
                hint="expected a model name or glob pattern (letters, digits, '_', '.', '-', "
                "'*', '?', '[]')",
                empty="is empty: no model would be allowed (use the built-in 'blocked' plan "
                "for that)"):
            with n.problems.part():
                cost, cost_rule = _model_cost(rn)
                rule = ModelRule(pattern=pattern, cost=cost,
                                 limits=_limits(rn, "limits", shadow.rate_limits),
                                 cost_rule=cost_rule)
                rn.done()
                every = (*limits, *rule.limits)
                if len(every) > MAX_LIMITS_PER_REQUEST:
                    rn.report("limits", f"{len(every)} limits apply to this model; at most "
                              f"{MAX_LIMITS_PER_REQUEST} (each is a key of the request's one "
                              "Redis call)")
                for limit in every:
                    if limit.unit == "cost" and cost > limit.burst:
                        rn.report("cost", f"cost {cost} exceeds the burst {limit.burst:g} of "
                                  f"limit {limit.name!r}: such a request could never pass")
                        break
                rules.append(rule)
        models = tuple(rules)
    n.done()
    if len(limits) > MAX_LIMITS_PER_REQUEST:
        n.report("limits", f"{len(limits)} limits; at most {MAX_LIMITS_PER_REQUEST} (each is a "
                 "key of the request's one Redis call)")
    # A plan that charges nothing is unlimited; that must be said explicitly (the built-in
    # `unlimited` plan), never the accident of a forgotten or mis-indented `limits:`.
    if not limits and not n.failed:
        if models is None:
            n.report("limits", "at least one limit is required (assign the built-in "
                     "'unlimited' plan for no limits)")
        for rule in models or ():
            if not rule.limits:
                n.problems.add(ConfigError(
                    n.file, n.key(f"models.{rule.pattern}.limits"),
                    "no limit applies to this model: give the plan `limits` or this rule its "
                    "own (or use the built-in 'unlimited' plan)"))
    names = [lim.name for lim in limits] + [lim.name for r in models or () for lim in r.limits]
    dupes = {x for x in names if names.count(x) > 1}
    if dupes:
        n.report("limits", f"limit name {sorted(dupes)[0]!r} used twice in plan {name!r} "
                 "(names key the buckets, so they must be unique within a plan)")
    # One scope claim per plan: all of a request's bucket keys carry that scope's hash tag
    # (so a Redis Cluster keeps them in one slot and charges them in one script call); two
    # scopes would need two tags.
    scopes = sorted({lim.scope for lim in (*limits, *(x for r in models or () for x in r.limits))
                     if lim.scope})
    if len(scopes) > 1:
        n.report("limits", f"shared limits use the scopes {', '.join(map(repr, scopes))}; a "
                 "plan's shared limits must all use one scope claim (every key of a request "
                 "must share one Redis Cluster hash tag)")
    return Plan(name=name, limits=limits, models=models, on_error=on_error,
                shadow_refusals=shadow.refusals, scope=scopes[0] if len(scopes) == 1 else None)


def _model_cost(rn: Node) -> tuple[int, CostRule | None]:
    """A model rule's `cost`: fixed (a whole number), or from the body (`{from: ...}`)."""
    return rn.either("cost", lambda: (rn.integer("cost", 1, minimum=1, maximum=MAX_COST), None),
                     lambda cn: (1, _cost_rule(cn)))


def _limits(n: Node, key: str, shadow: bool) -> tuple[Limit, ...]:
    out = []
    for path, raw in n.items(key):
        with n.problems.part():
            ln = n.child(path, raw)
            name = ln.text("name", pattern=_NAME,
                           hint="a limit name: letters, digits, '_', '.', '-' (<= 64)")
            count = ln.number("rate", maximum=MAX_TOKENS)
            per = ln.duration("per", 1.0, minimum=MIN_PER, maximum=MAX_PER)
            # The default, `rate`, is checked against 1 below (the schema cannot say it).
            burst = ln.number("burst", min(count, MAX_TOKENS), minimum=1.0, maximum=MAX_TOKENS)
            limit_shadow = ln.flag("shadow", False)
            scope = ln.opt_str("scope", pattern=_CLAIM,
                               hint="a claim name (letters, digits, '_', '-', ':', '.')")
            unit = ln.choice("unit", "cost", ("cost", "requests"))
            ln.done()
            if ln.failed:
                continue
            rate = count / per
            if not rate > 0:
                ln.report("per", f"rate {count:g} per {per:g}s rounds to no refill at all")
                continue
            if burst < 1:
                ln.report("burst", f"expected >= 1 (a bucket holds one request), got {burst:g}")
                continue
            if burst / rate > MAX_TIME_TO_FULL:
                ln.report("rate", f"an empty bucket would take {burst / rate:.3g} s to refill "
                          f"(burst {burst:g} at {count:g} per {per:g}s); at most 10 years "
                          f"({MAX_TIME_TO_FULL:g} s): raise rate or lower burst")
                continue
            out.append(Limit(name=name, rate=rate, burst=burst, count=count, per=per,
                             shadow=shadow or limit_shadow, scope=scope, unit=unit))
    return tuple(out)


# A body bigger than this is never read for its cost (Envoy's own default buffer limit for a
# connection is 1 MiB: Istio's maxRequestBytes cannot usefully go past it without raising that).
MAX_BODY_BYTES = 1 << 20
# Tokens an LLM request may reserve for its completion, at most (today's largest context
# windows are ~1M tokens).
MAX_COMPLETION_TOKENS = 1_000_000


def _cost_rule(n: Node) -> CostRule:
    """`cost: {from: instances | tokens, ...}`: the cost from the request's body."""
    rule = n.variant("from", {"instances": _instances_cost, "tokens": _tokens_cost})
    n.done()
    return rule


def _instances_cost(n: Node) -> CostRule:
    d = CostRule("instances")
    return CostRule("instances",
                    per_instance=n.integer("per_instance", d.per_instance, minimum=1,
                                           maximum=MAX_COST),
                    fallback=_fallback(n), max_body_bytes=_max_body_bytes(n, d))


def _tokens_cost(n: Node) -> CostRule:
    d = CostRule("tokens")
    rule = CostRule(
        "tokens",
        default_max_tokens=n.integer("default_max_tokens", d.default_max_tokens, minimum=1,
                                     maximum=MAX_COMPLETION_TOKENS),
        max_tokens=n.integer("max_tokens", d.max_tokens, minimum=1,
                             maximum=MAX_COMPLETION_TOKENS),
        bytes_per_token=n.number("bytes_per_token", d.bytes_per_token, minimum=1.0,
                                 maximum=64.0),
        fallback=_fallback(n), max_body_bytes=_max_body_bytes(n, d))
    if not n.failed and rule.default_max_tokens > rule.max_tokens:
        n.report("default_max_tokens", f"{rule.default_max_tokens} is above max_tokens "
                 f"{rule.max_tokens}")
    return rule


def _fallback(n: Node) -> int | None:
    # None: refuse a request whose body cannot say its cost (400 with the reason).
    return n.integer_or("fallback", "reject", minimum=1, maximum=MAX_COST)


def _max_body_bytes(n: Node, d: CostRule) -> int:
    return n.integer("max_body_bytes", d.max_body_bytes, minimum=64, maximum=MAX_BODY_BYTES)
