"""Which buckets a request charges: identity + model -> grant (buckets, cost) or refusal.

Pure: no I/O, no clock. The bucket keys are built here so every store sees the same layout
(the store adds its prefix). The part in braces is a Redis Cluster hash tag, and every key of
one request carries the same one, so one script call charges them all on one shard:

- a plan without shared limits:  `{<identity hash>}:<plan>:<limit>`
- a plan with limits shared by a scope claim (e.g. `org`), for every one of its requests:
  `{<scope hash>}:<plan>:<limit>` for the shared limits and
  `{<scope hash>}:<plan>:<limit>:<identity hash>` for the caller's own. One organisation is
  then one slot: its busiest members are bounded by one shard (the price of charging the
  shared and the personal buckets atomically, in one call).

Hashes: the identity hash is SHA-256 of issuer NUL subject (tokens/verifier.py); the scope hash
is SHA-256 of issuer NUL claim NUL value, first 32 hex digits, so equal org names from two
issuers never share a bucket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..buckets.store import BucketSpec
from ..tokens.identity import Identity
from .model import BUILTIN_PLANS, CostRule, Limit, ModelRule, Plan, Quota

# Model names come from request paths, so a caller can invent any number of them; the
# per-plan model -> rule memo is bounded and simply stops memoizing past this size.
_MODEL_MEMO_MAX = 4096
# Grants per (identity, plan, model): rebuilt bucket specs cost ~5 us per request otherwise.
# ~400 bytes each; the memo is dropped whole when full (cheap, and it refills with who is active).
_GRANT_MEMO_MAX = 20_000


@dataclass(frozen=True, slots=True)
class Grant:
    plan: str
    rule: str  # label of the model rule that matched ("*" when the plan lists no models)
    cost: int
    buckets: tuple[BucketSpec, ...]  # empty: nothing to charge (unlimited)
    limits: tuple[Limit, ...] = ()  # the limits of `buckets`, same order (for headers)
    cost_rule: CostRule | None = None  # the cost comes from the body (quota/costs.py)
    on_error: str | None = None  # the plan's store failure policy; None: the service's
    # Shadow mode let a refusal through: its reason ("model_not_allowed", "blocked").
    shadowed: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    plan: str
    reason: str  # "blocked" | "model_not_allowed" | "scope_claim_missing"


@dataclass(frozen=True, slots=True)
class _Charge:
    rule: str
    cost: int
    limits: tuple[Limit, ...]
    cost_rule: CostRule | None = None


_NOT_ALLOWED = object()


class Resolver:
    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self._memo: dict[str, dict[str, _Charge | object]] = {name: {} for name in quota.plans}
        # (identity, plan, model, scope claim value) -> the answer
        self._grants: dict[tuple[str, str, str, object], Grant | Refusal] = {}

    def plan_for(self, identity: Identity) -> Plan:
        q = self.quota
        name = q.overrides.get((identity.issuer, identity.subject))
        if name is None:
            claimed = identity.claims.get(q.plan_claim)
            if isinstance(claimed, str) and claimed in q.plans and claimed not in BUILTIN_PLANS:
                name = claimed
            else:
                name = q.default_plan
        return q.plans[name]

    def resolve(self, identity: Identity, model: str) -> Grant | Refusal:
        plan = self.plan_for(identity)
        scope_value = identity.claims.get(plan.scope) if plan.scope else None
        key = (identity.key, plan.name, model, scope_value)
        found = self._grants.get(key)
        if found is None:
            found = self._resolve(identity, plan, model, scope_value)
            if len(self._grants) >= _GRANT_MEMO_MAX:
                self._grants.clear()
            self._grants[key] = found
        return found

    def _resolve(self, identity: Identity, plan: Plan, model: str,
                 scope_value: object) -> Grant | Refusal:
        if plan.blocked:
            if "blocked" in plan.shadow_refusals:  # shadow mode: through, marked
                return Grant(plan.name, "*", 1, (), shadowed="blocked")
            return Refusal(plan.name, "blocked")
        if plan.unlimited:
            return Grant(plan.name, "*", 1, ())
        charge = self._charge(plan, model)
        shadowed = ""
        if not isinstance(charge, _Charge):
            if "model_not_allowed" not in plan.shadow_refusals:
                return Refusal(plan.name, "model_not_allowed")
            # Shadow mode: through on the plan's own limits, at cost 1, marked.
            charge, shadowed = _Charge("*", 1, plan.limits), "model_not_allowed"
        scope_tag = None
        if plan.scope is not None:
            if not isinstance(scope_value, str) or not scope_value:
                # Charging such a caller as a scope of its own would hand it a whole
                # organisation's budget.
                return Refusal(plan.name, "scope_claim_missing")
            scope_tag = scope_key(identity.issuer, plan.scope, scope_value)
        buckets = tuple(
            BucketSpec(key=bucket_key(plan, lim, identity.key, scope_tag), name=lim.name,
                       capacity=lim.burst, rate=lim.rate, shadow=lim.shadow,
                       per_request=lim.unit == "requests")
            for lim in charge.limits
        )
        return Grant(plan.name, charge.rule, charge.cost, buckets, charge.limits,
                     charge.cost_rule, plan.on_error, shadowed)

    def _charge(self, plan: Plan, model: str) -> _Charge | object:
        memo = self._memo[plan.name]
        found = memo.get(model)
        if found is None:
            found = _match(plan, model)
            if len(memo) < _MODEL_MEMO_MAX:
                memo[model] = found
        return found


def bucket_key(plan: Plan, limit: Limit, identity_key: str, scope_tag: str | None) -> str:
    """A bucket's key without the store's prefix (the module docstring has the layout).
    `scope_tag`: the scope's hash when the plan has shared limits (required then)."""
    if plan.scope is None:
        return f"{{{identity_key}}}:{plan.name}:{limit.name}"
    assert scope_tag is not None
    own = "" if limit.scope else f":{identity_key}"
    return f"{{{scope_tag}}}:{plan.name}:{limit.name}{own}"


def scope_key(issuer: str, claim: str, value: str) -> str:
    """The hash tag of a shared scope: 128 bits of SHA-256 over issuer NUL claim NUL value."""
    data = f"{issuer}\0{claim}\0{value}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]


def _match(plan: Plan, model: str) -> _Charge | object:
    if plan.models is None:
        return _Charge("*", 1, plan.limits)
    rule: ModelRule
    for rule in plan.models:
        if fnmatchcase(model, rule.pattern):
            return _Charge(rule.pattern, rule.cost, plan.limits + rule.limits, rule.cost_rule)
    return _NOT_ALLOWED
