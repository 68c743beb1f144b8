"""The quota file's JSON Schema, recorded from `read_quota` (see authz/config/schema.py)."""

from __future__ import annotations

from typing import Any

from ..config.schema import build
from .loader import read_quota


def quota_schema() -> dict[str, Any]:
    # parse_quota refuses an empty file before reading a key (an empty ConfigMap must not
    # block everyone).
    return build(read_quota, title="authz quota file",
                 description="Plans, limits and overrides (README \"Quota file\"). Generated "
                 "from authz/quota/loader.py by `authz schema quota`: do not edit.",
                 docs=QUOTA_DOCS, empty_file=False)


# A limit's keys, the same under a plan's and a model rule's `limits` (one function reads both).
_LIMIT_DOCS = {
    "name": "The limit's name, unique within the plan (it keys the bucket).",
    "rate": "Tokens added per `per`.",
    "per": "The refill period.",
    "burst": "The bucket's capacity (default: rate).",
    "shadow": "This limit in shadow mode.",
    "scope": "A verified claim (e.g. org): the bucket is shared by every caller with the same "
             "value of it. One scope claim per plan.",
    "unit": "cost: charged the request's cost; requests: 1 per request.",
}

_SHADOW = ("Shadow mode: true (every limit), or {rate_limits, refusals}. What it would refuse "
           "is allowed and marked x-authz-shadow.")

QUOTA_DOCS: dict[str, str] = {
    "plan_claim": "The JWT claim that names the caller's plan.",
    "shadow": _SHADOW + " For every plan.",
    "shadow.rate_limits": "Every limit in shadow mode.",
    "shadow.refusals": "Refusals answered as marked allows.",
    "plans": "Plans by name. The built-in plans unlimited and blocked cannot be redefined.",
    "plans.*": "A plan: the limits every request charges, and optionally the models it allows.",
    "plans.*.shadow": _SHADOW + " For this plan, added to the file's.",
    "plans.*.shadow.rate_limits": "Every limit of this plan in shadow mode.",
    "plans.*.shadow.refusals": "Refusals answered as marked allows for this plan.",
    "plans.*.on_error": "This plan's answer when the store fails (default: store.on_error).",
    "plans.*.limits": "Token buckets every request of this plan charges (all or none).",
    "plans.*.models": "Only these models (glob patterns, first match wins); others are "
                      "refused with 403 model_not_allowed.",
    "plans.*.models.*": "A model rule: its cost and its own limits.",
    "plans.*.models.*.cost": "A fixed cost (at most every applicable burst), or "
                             "{from: instances | tokens, ...}: the cost read from the body.",
    "plans.*.models.*.cost.from": "instances: the batch size x per_instance; tokens: the "
                                  "completion tokens reserved plus the prompt's estimate.",
    "plans.*.models.*.cost.per_instance": "Cost of one instance of the batch.",
    "plans.*.models.*.cost.default_max_tokens": "Completion tokens reserved when the request "
                                                "names none (at most max_tokens).",
    "plans.*.models.*.cost.max_tokens": "Completion tokens reserved at most.",
    "plans.*.models.*.cost.bytes_per_token": "Prompt bytes per estimated token.",
    "plans.*.models.*.cost.fallback": "The cost when the body cannot say, or reject (400 "
                                      "with the reason).",
    "plans.*.models.*.cost.max_body_bytes": "The body is read up to this many bytes.",
    "plans.*.models.*.limits": "More limits for this model, charged with the plan's.",
    **{f"{where}[].{key}": text for where in ("plans.*.limits", "plans.*.models.*.limits")
       for key, text in _LIMIT_DOCS.items()},
    "default_plan": "The plan when the claim is absent or names no plan (required once plans "
                    "are defined).",
    "overrides": "Plans per subject (issuer + sub), e.g. unlimited or blocked.",
    "overrides[].issuer": "The token's iss.",
    "overrides[].subject": "The token's sub.",
    "overrides[].plan": "The plan (a defined one, or unlimited / blocked).",
}
