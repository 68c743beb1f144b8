"""Which buckets a request charges: identity + model -> grant (buckets, cost) or refusal.

Pure: no I/O, no clock. The bucket keys are built here so every store sees the same layout:
`{<identity hash>}:<plan>:<limit>` (the store adds its prefix). The braces are a Redis Cluster
hash tag: all of one identity's buckets live in one slot, so one script can charge them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..buckets.store import BucketSpec
from ..tokens.identity import Identity
from .model import BUILTIN_PLANS, Limit, ModelRule, Plan, Quota

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


@dataclass(frozen=True, slots=True)
class Refusal:
    plan: str
    reason: str  # "blocked" | "model_not_allowed"


@dataclass(frozen=True, slots=True)
class _Charge:
    rule: str
    cost: int
    limits: tuple[Limit, ...]


_NOT_ALLOWED = object()


class Resolver:
    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self._memo: dict[str, dict[str, _Charge | object]] = {name: {} for name in quota.plans}
        self._grants: dict[tuple[str, str, str], Grant | Refusal] = {}

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
        key = (identity.key, plan.name, model)
        found = self._grants.get(key)
        if found is None:
            found = self._resolve(identity, plan, model)
            if len(self._grants) >= _GRANT_MEMO_MAX:
                self._grants.clear()
            self._grants[key] = found
        return found

    def _resolve(self, identity: Identity, plan: Plan, model: str) -> Grant | Refusal:
        if plan.blocked:
            return Refusal(plan.name, "blocked")
        if plan.unlimited:
            return Grant(plan.name, "*", 1, ())
        charge = self._charge(plan, model)
        if not isinstance(charge, _Charge):
            return Refusal(plan.name, "model_not_allowed")
        prefix = f"{{{identity.key}}}:{plan.name}:"
        buckets = tuple(
            BucketSpec(key=prefix + lim.name, name=lim.name, capacity=lim.burst, rate=lim.rate)
            for lim in charge.limits
        )
        return Grant(plan.name, charge.rule, charge.cost, buckets)

    def _charge(self, plan: Plan, model: str) -> _Charge | object:
        memo = self._memo[plan.name]
        found = memo.get(model)
        if found is None:
            found = _match(plan, model)
            if len(memo) < _MODEL_MEMO_MAX:
                memo[model] = found
        return found


def _match(plan: Plan, model: str) -> _Charge | object:
    if plan.models is None:
        return _Charge("*", 1, plan.limits)
    rule: ModelRule
    for rule in plan.models:
        if fnmatchcase(model, rule.pattern):
            return _Charge(rule.pattern, rule.cost, plan.limits + rule.limits)
    return _NOT_ALLOWED
