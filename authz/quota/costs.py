"""A request's cost from its body: batch size for predictive models, tokens for LLMs. Pure.

Read only what the count needs: msgspec decodes into small typed structs whose big parts
(the tensors, the messages) are `msgspec.Raw` -- checked to be JSON and skipped, never turned
into Python objects. A 20 KB KServe v1 body costs ~17 us this way against ~380 us for
json.loads (loadtests/README.md); the size is bounded first (`CostRule.max_body_bytes`), so
the time is too. Whatever the body holds, the answer is a cost or a named reason, never an
exception:

    body_missing     no body in the check (the provider does not include it)
    body_partial     Envoy cut it at maxRequestBytes (x-envoy-auth-partial-body: true)
    body_too_large   over the rule's max_body_bytes
    body_not_json    not JSON (or binary)
    body_bad_shape   JSON, but not the protocol's shape (no instances, no shape[0], ...)
    cost_out_of_range  a count or max_tokens below 1 or absurdly large
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from .model import CostRule

# Bodies' batch sizes and token counts beyond this are not requests, they are attacks: the
# cost is refused (or the fallback used) rather than charged.
MAX_COUNT = 10_000_000
_EMPTY = msgspec.Raw(b"")


class _V1(msgspec.Struct):
    """KServe v1: {"instances": [...]} or {"inputs": [...]}."""

    instances: list[msgspec.Raw] | None = None
    inputs: list[msgspec.Raw] | None = None


class _V2Input(msgspec.Struct):
    shape: list[int] = []


class _V2(msgspec.Struct):
    """Open Inference Protocol v2: {"inputs": [{"name", "shape": [N, ...], "data"}]}."""

    inputs: list[_V2Input] | None = None


class _Completion(msgspec.Struct):
    """OpenAI-compatible /completions and /chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    messages: msgspec.Raw = _EMPTY
    prompt: msgspec.Raw = _EMPTY


_V1_DECODER = msgspec.json.Decoder(_V1)
_V2_DECODER = msgspec.json.Decoder(_V2)
_COMPLETION_DECODER = msgspec.json.Decoder(_Completion)


@dataclass(frozen=True, slots=True)
class Priced:
    cost: int
    source: str  # how it was counted, for logs: "instances", "shape", "tokens", "fallback"


@dataclass(frozen=True, slots=True)
class Unpriced:
    reason: str  # one of the module docstring's reasons


def _problem(rule: CostRule, reason: str) -> Priced | Unpriced:
    if rule.fallback is not None:
        return Priced(rule.fallback, "fallback")
    return Unpriced(reason)


def price(rule: CostRule, body: bytes | None, *, partial: bool, protocol: str
          ) -> Priced | Unpriced:
    """The cost of a request under `rule`. `protocol`: "v1", "v2" (by the request path) or
    "openai" (an LLM route)."""
    if body is None or not body:
        return _problem(rule, "body_missing")
    if partial:
        return _problem(rule, "body_partial")
    if len(body) > rule.max_body_bytes:
        return _problem(rule, "body_too_large")
    if rule.source == "instances":
        count = _instances(body, protocol)
        if isinstance(count, Unpriced):
            return _problem(rule, count.reason)
        return _bounded(rule, count * rule.per_instance, "instances")
    return _tokens(rule, body)


def _instances(body: bytes, protocol: str) -> int | Unpriced:
    try:
        if protocol == "v2":
            v2 = _V2_DECODER.decode(body)
            if not v2.inputs or any(not i.shape for i in v2.inputs):
                return Unpriced("body_bad_shape")
            return max(i.shape[0] for i in v2.inputs)
        v1 = _V1_DECODER.decode(body)
    except msgspec.ValidationError:
        return Unpriced("body_bad_shape")
    except (msgspec.DecodeError, RecursionError):
        return Unpriced("body_not_json")
    items = v1.instances if v1.instances is not None else v1.inputs
    if items is None:
        return Unpriced("body_bad_shape")
    return len(items)


def _tokens(rule: CostRule, body: bytes) -> Priced | Unpriced:
    try:
        req = _COMPLETION_DECODER.decode(body)
    except msgspec.ValidationError:
        return _problem(rule, "body_bad_shape")
    except (msgspec.DecodeError, RecursionError):
        return _problem(rule, "body_not_json")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    if asked is None:
        asked = rule.default_max_tokens
    if asked < 1 or asked > MAX_COUNT:
        return _problem(rule, "cost_out_of_range")
    completion = min(asked, rule.max_tokens)
    prompt_bytes = len(req.messages) + len(req.prompt)
    prompt = math.ceil(prompt_bytes / rule.bytes_per_token)
    return _bounded(rule, completion + prompt, "tokens")


def _bounded(rule: CostRule, cost: int, source: str) -> Priced | Unpriced:
    if cost < 1 or cost > MAX_COUNT:
        return _problem(rule, "cost_out_of_range")
    return Priced(cost, source)


def model_of(body: bytes | None, *, max_bytes: int = 1 << 20) -> str | None:
    """The `model` field of an OpenAI-compatible body, or None when there is none to read."""
    if not body or len(body) > max_bytes:
        return None
    try:
        return _COMPLETION_DECODER.decode(body).model
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
