"""Quota values: plans of token-bucket limits, per-model rules, per-subject overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Always defined; assignable by `default_plan` and `overrides` but never by a token's claim, so
# an issuer's `plan: unlimited` claim cannot lift every limit by accident.
UNLIMITED = "unlimited"
BLOCKED = "blocked"
BUILTIN_PLANS = (UNLIMITED, BLOCKED)


# Refusals that shadow mode can turn into marked allows (the quota file's `shadow.refusals`).
SHADOWABLE_REFUSALS = ("model_not_allowed", "blocked")


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    rate: float  # tokens added per second
    burst: float  # bucket capacity
    count: float  # as configured: `count` tokens ...
    per: float  # ... per `per` seconds
    # Shadow mode: a request this limit alone would refuse is allowed (and marked); the bucket
    # is charged only when enforcement would have admitted the request.
    shadow: bool = False
    # A verified claim (e.g. "org"): the bucket is shared by every caller carrying the same
    # value of it (from the same issuer), instead of being the caller's own.
    scope: str | None = None
    # "cost": charged the request's cost (a model rule's fixed `cost`, or what its body says:
    # instances, tokens); "requests": charged 1 per request whatever its cost.
    unit: str = "cost"


@dataclass(frozen=True, slots=True)
class CostRule:
    """A request's cost from its body (the model rule's `cost: {from: ...}`).

    from "instances": KServe v1 `instances` / `inputs` (their count), Open Inference Protocol v2
    `inputs[].shape[0]` (the batch dimension, the largest), x `per_instance`.
    from "tokens": OpenAI-compatible completions and chat: `max_completion_tokens` or
    `max_tokens` (else `default_max_tokens`), at most `max_tokens`, plus the prompt's estimate,
    its bytes (`messages` or `prompt`) / `bytes_per_token`, rounded up.
    `fallback`: the cost when the body cannot say (missing, partial, not JSON, wrong shape,
    out of range); None: refuse such a request with 400 and the reason.
    """

    source: str  # "instances" | "tokens"
    per_instance: int = 1
    default_max_tokens: int = 256
    max_tokens: int = 4096
    bytes_per_token: float = 4.0
    fallback: int | None = None
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class ModelRule:
    pattern: str  # glob over the model name ("llama-*", "*")
    cost: int  # the fixed cost (when `cost_rule` is None)
    limits: tuple[Limit, ...]
    cost_rule: CostRule | None = None  # the cost comes from the request's body


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: tuple[Limit, ...] = ()
    # None: every model allowed at cost 1. Otherwise only models matching a rule (first match
    # wins, in file order); others are refused with 403.
    models: tuple[ModelRule, ...] | None = None
    unlimited: bool = False
    blocked: bool = False
    # What a store failure means for this plan's requests: "deny" (503) or "allow" (marked);
    # None: the service's store.on_error.
    on_error: str | None = None
    # Refusals answered as marked allows (shadow mode): some of SHADOWABLE_REFUSALS.
    shadow_refusals: frozenset[str] = frozenset()
    # The claim this plan's shared limits are scoped to (one per plan: every key of a request
    # must share one Redis Cluster hash tag), or None when all its limits are the caller's own.
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Quota:
    plan_claim: str
    default_plan: str
    plans: Mapping[str, Plan]  # includes the built-ins
    overrides: Mapping[tuple[str, str], str]  # (issuer, subject) -> plan name

    @property
    def claims_used(self) -> frozenset[str]:
        """The verified claims decisions read: the plan claim and every scope claim (the token
        cache keeps these and drops the rest)."""
        return frozenset({self.plan_claim, *(p.scope for p in self.plans.values() if p.scope)})
