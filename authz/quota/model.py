"""Quota values: plans of token-bucket limits, per-model rules, per-subject overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Always defined; assignable by `default_plan` and `overrides` but never by a token's claim, so
# an issuer's `plan: unlimited` claim cannot lift every limit by accident.
UNLIMITED = "unlimited"
BLOCKED = "blocked"
BUILTIN_PLANS = (UNLIMITED, BLOCKED)


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    rate: float  # tokens added per second
    burst: float  # bucket capacity
    count: float  # as configured: `count` tokens ...
    per: float  # ... per `per` seconds


@dataclass(frozen=True, slots=True)
class ModelRule:
    pattern: str  # glob over the model name ("llama-*", "*")
    cost: int
    limits: tuple[Limit, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: tuple[Limit, ...] = ()
    # None: every model allowed at cost 1. Otherwise only models matching a rule (first match
    # wins, in file order); others are refused with 403.
    models: tuple[ModelRule, ...] | None = None
    unlimited: bool = False
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class Quota:
    plan_claim: str
    default_plan: str
    plans: Mapping[str, Plan]  # includes the built-ins
    overrides: Mapping[tuple[str, str], str]  # (issuer, subject) -> plan name
