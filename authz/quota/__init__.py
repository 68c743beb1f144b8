"""The quota file: who may call which model, and how often."""

from .loader import load_quota, parse_quota
from .model import BUILTIN_PLANS, Limit, ModelRule, Plan, Quota
from .resolve import Grant, Refusal, Resolver

__all__ = [
    "BUILTIN_PLANS", "Grant", "Limit", "ModelRule", "Plan", "Quota", "Refusal", "Resolver",
    "load_quota", "parse_quota",
]
