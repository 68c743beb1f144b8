"""The decision: what the service answers, as plain values.

`authz.server` turns a `Decision` into a CheckResponse; telemetry reads its outcome, reason and
labels. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from .buckets.store import BucketState, ChargeResult
from .config.settings import Settings
from .quota.model import Limit
from .quota.resolve import Grant, Refusal
from .tokens.identity import Identity, TokenFailure


class Outcome(StrEnum):
    ALLOWED = "allowed"
    # allowed without a token (public path, or an uncovered path under paths.other: allow)
    PUBLIC_PATH = "public_path"
    UNAUTHENTICATED = "unauthenticated"  # 401
    FORBIDDEN = "forbidden"  # 403
    RATE_LIMITED = "rate_limited"  # 429
    INVALID_REQUEST = "invalid_request"  # 400
    # 413: the request's cost (from its body) is more than a limit's burst: it could never pass
    TOO_LARGE = "too_large"
    # store failed or not ready: 503, or allowed (degraded) under store.on_error: allow
    BACKEND_ERROR = "backend_error"
    # allowed by shadow mode: enforcement would have refused it (the reason says how)
    SHADOW = "shadow"
    INTERNAL_ERROR = "internal_error"  # 500: a bug, answered explicitly


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # HTTP status the client gets: 200 when allowed, else the deny status.
    status: int
    outcome: Outcome
    # Machine-readable reason: "ok", a TokenFailure value, "model_not_allowed", "blocked",
    # "rate_limited", "store_unavailable", "invalid_path", "path_not_covered", ...
    reason: str
    # Allowed: headers set (overwritten) on the request to the upstream.
    upstream_headers: Headers = ()
    # Allowed: request headers removed before the upstream sees them.
    remove_headers: tuple[str, ...] = ()
    # Headers for the client: response_headers_to_add when allowed, denied_response headers
    # otherwise.
    response_headers: Headers = ()
    # Deny body (JSON); empty when allowed.
    body: str = ""
    # Bounded-cardinality labels for telemetry (never the subject).
    plan: str = ""
    model: str = ""  # the quota rule that matched the model ("*" etc.), not the raw name
    limit: str = ""  # the limit that decided (the most restrictive one)
    token_cache_hit: bool | None = None


# ---------------------------------------------------------------------------------------------
# Building decisions. Everything below is pure: plain values in, a Decision out.
# ---------------------------------------------------------------------------------------------

_JSON = (("content-type", "application/json"), ("cache-control", "no-store"))


def header_value(value: str) -> str:
    """Make a value safe for an HTTP header: visible ASCII and inner spaces only.

    Envoy passes ext_authz header values to the upstream codec unchecked; a CR or LF there
    becomes a 503 (or worse, a split header). Anything outside 0x20-0x7E is percent-encoded
    (UTF-8), and so is '%' itself, so the encoding is unambiguous.
    """
    if value.isascii() and value.isprintable() and "%" not in value and value == value.strip():
        return value
    out: list[str] = []
    for ch in value:
        o = ord(ch)
        if (0x21 <= o <= 0x7E and ch != "%") or (ch == " " and out):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    text = "".join(out)
    return text[:-1] + "%20" if text.endswith(" ") else text


def _body(**fields: object) -> str:
    return json.dumps(fields, separators=(",", ":"), sort_keys=False)


def _number(x: float) -> int | float:
    return int(x) if x == int(x) else x


class Answers:
    """The answer to each step's outcome (a Decision with its status, headers and body).

    Answers that do not depend on the caller are built once here.
    """

    def __init__(self, settings: Settings) -> None:
        h = settings.headers
        self._h = h
        self._audience = settings.auth.audience
        self._identity_headers = (h.subject, h.issuer, h.plan)
        # Client-sent copies of headers we do not set on this request are removed; the ones we
        # set are overwritten (Envoy applies removals after sets, so never list both).
        self._remove_when_allowed = (h.degraded, h.shadow)
        self._remove_when_shadowed = (h.degraded,)
        self._remove_when_degraded = (h.shadow,)
        self._remove_when_public = (*self._identity_headers, h.degraded, h.shadow)
        self._ratelimit = (_structured_ratelimit if h.ratelimit_style == "structured"
                           else _triple_ratelimit)
        self._public = Decision(True, 200, Outcome.PUBLIC_PATH, "public_path",
                                remove_headers=self._remove_when_public)
        self._other = (
            Decision(True, 200, Outcome.PUBLIC_PATH, "path_not_covered",
                     remove_headers=self._remove_when_public)
            if settings.paths.other == "allow"
            else Decision(False, 403, Outcome.FORBIDDEN, "path_not_covered",
                          response_headers=_JSON,
                          body=_body(error="forbidden", reason="path_not_covered"))
        )
        self._internal = Decision(False, settings.internal_error_status, Outcome.INTERNAL_ERROR,
                                  "internal_error", response_headers=_JSON,
                                  body=_body(error="internal_error"))
        self._not_ready = Decision(False, 503, Outcome.BACKEND_ERROR, "not_ready",
                                   response_headers=(*_JSON, ("retry-after", "1")),
                                   body=_body(error="unavailable", reason="not_ready"))
        self._store_policy = settings.store.on_error
        self._invalid: dict[str, Decision] = {}
        self._unauth: dict[TokenFailure, Decision] = {
            f: self._build_unauthenticated(f) for f in TokenFailure
        }

    def public(self) -> Decision:
        return self._public

    def other_path(self) -> Decision:
        return self._other

    def internal_error(self) -> Decision:
        return self._internal

    def not_ready(self) -> Decision:
        return self._not_ready

    def invalid_request(self, reason: str) -> Decision:
        d = self._invalid.get(reason)
        if d is None:
            d = Decision(False, 400, Outcome.INVALID_REQUEST, reason, response_headers=_JSON,
                         body=_body(error="invalid_request", reason=reason))
            self._invalid[reason] = d
        return d

    def unauthenticated(self, failure: TokenFailure) -> Decision:
        return self._unauth[failure]

    def _build_unauthenticated(self, failure: TokenFailure) -> Decision:
        # RFC 6750 section 3: the challenge names the error; the JSON body names the reason.
        # The token itself is never echoed.
        challenge = (f'Bearer realm="{self._audience}", error="invalid_token", '
                     f'error_description="{failure.value}"')
        return Decision(False, 401, Outcome.UNAUTHENTICATED, failure.value,
                        response_headers=(("www-authenticate", header_value(challenge)), *_JSON),
                        body=_body(error="invalid_token", reason=failure.value))

    def refused(self, identity: Identity, refusal: Refusal, model_rule: str = "") -> Decision:
        return Decision(False, 403, Outcome.FORBIDDEN, refusal.reason, response_headers=_JSON,
                        body=_body(error="forbidden", reason=refusal.reason, plan=refusal.plan),
                        plan=refusal.plan, model=model_rule)

    def unpriced(self, grant: Grant, reason: str) -> Decision:
        """400: the body cannot say what the request costs (quota/costs.py's reasons) and the
        model rule has no fallback."""
        return Decision(False, 400, Outcome.INVALID_REQUEST, reason, response_headers=_JSON,
                        body=_body(error="invalid_request", reason=reason, plan=grant.plan),
                        plan=grant.plan, model=grant.rule)

    def too_large(self, grant: Grant, cost: int, limit: Limit) -> Decision:
        """413: the request costs more than `limit` can ever hold. Not a 429: waiting would not
        help, and a Retry-After would have the client retry forever."""
        return Decision(False, 413, Outcome.TOO_LARGE, "cost_exceeds_burst",
                        response_headers=_JSON,
                        body=_body(error="too_large", reason="cost_exceeds_burst",
                                   limit=limit.name, plan=grant.plan, cost=cost,
                                   burst=_number(limit.burst)),
                        plan=grant.plan, model=grant.rule, limit=limit.name)

    def _identity(self, identity: Identity, plan: str) -> Headers:
        h = self._h
        return ((h.subject, header_value(identity.subject)),
                (h.issuer, header_value(identity.issuer)),
                (h.plan, plan))

    def _allowed(self, identity: Identity, grant: Grant, would_be: str, limit: str,
                 response_headers: Headers, cache_hit: bool | None) -> Decision:
        """An allow; with `would_be` (shadow mode) marked for the upstream with what
        enforcement would have answered, and counted as such."""
        if not would_be:
            return Decision(True, 200, Outcome.ALLOWED, "ok",
                            upstream_headers=self._identity(identity, grant.plan),
                            remove_headers=self._remove_when_allowed,
                            response_headers=response_headers, plan=grant.plan,
                            model=grant.rule, limit=limit, token_cache_hit=cache_hit)
        return Decision(True, 200, Outcome.SHADOW, would_be.partition(",")[0],
                        upstream_headers=(*self._identity(identity, grant.plan),
                                          (self._h.shadow, would_be)),
                        remove_headers=self._remove_when_shadowed,
                        response_headers=response_headers, plan=grant.plan, model=grant.rule,
                        limit=limit, token_cache_hit=cache_hit)

    def unlimited(self, identity: Identity, grant: Grant,
                  cache_hit: bool | None = None) -> Decision:
        return self._allowed(identity, grant, grant.shadowed, "", (), cache_hit)

    def store_failed(self, identity: Identity, grant: Grant,
                     cache_hit: bool | None = None) -> Decision:
        if (grant.on_error or self._store_policy) == "allow":
            return Decision(True, 200, Outcome.BACKEND_ERROR, "store_unavailable",
                            upstream_headers=(*self._identity(identity, grant.plan),
                                              (self._h.degraded, "store-unavailable")),
                            remove_headers=self._remove_when_degraded,
                            plan=grant.plan, model=grant.rule, token_cache_hit=cache_hit)
        return Decision(False, 503, Outcome.BACKEND_ERROR, "store_unavailable",
                        response_headers=(*_JSON, ("retry-after", "1")),
                        body=_body(error="unavailable", reason="store_unavailable"),
                        plan=grant.plan, model=grant.rule, token_cache_hit=cache_hit)

    def charged(self, identity: Identity, grant: Grant, result: ChargeResult,
                cache_hit: bool | None = None) -> Decision:
        states = result.buckets
        limits = grant.limits if len(grant.limits) == len(states) else (None,) * len(states)
        if result.allowed:
            # The most restrictive limit: fewest tokens left, then the longest until full.
            i = min(range(len(states)),
                    key=lambda j: (states[j].remaining, -states[j].reset_after))
            would_be = grant.shadowed
            limit = states[i].name
            if result.shadow_refused:
                # The shadow limit enforcement would have refused on: the longest wait.
                shadows = [j for j, spec in enumerate(grant.buckets) if spec.shadow]
                w = max(shadows or range(len(states)), key=lambda j: states[j].retry_after)
                limit = states[w].name
                would_be = ",".join(filter(None, (grant.shadowed, "rate_limited")))
            return self._allowed(identity, grant, would_be, limit,
                                 self._ratelimit(states, limits, i), cache_hit)
        # The limit that decided: the enforced one the caller must wait longest for.
        enforced = [j for j, spec in enumerate(grant.buckets) if not spec.shadow]
        i = max(enforced or range(len(states)), key=lambda j: states[j].retry_after)
        retry = max(1, math.ceil(result.retry_after))
        name = states[i].name
        return Decision(False, 429, Outcome.RATE_LIMITED, "rate_limited",
                        response_headers=(("retry-after", str(retry)),
                                          *self._ratelimit(states, limits, i), *_JSON),
                        body=_body(error="rate_limited", reason="rate_limited", limit=name,
                                   plan=grant.plan, retry_after=retry),
                        plan=grant.plan, model=grant.rule, limit=name,
                        token_cache_hit=cache_hit)


def _triple_ratelimit(states: Sequence[BucketState], limits: Sequence[Limit | None],
                      i: int) -> Headers:
    # The older drafts' three fields, for the limit that decides: its capacity, the whole
    # tokens left, and the whole seconds until the bucket is full again (rounded up).
    b = states[i]
    return (("ratelimit-limit", str(int(b.capacity))),
            ("ratelimit-remaining", str(max(0, math.floor(b.remaining)))),
            ("ratelimit-reset", str(max(0, math.ceil(b.reset_after)))))


def _structured_ratelimit(states: Sequence[BucketState], limits: Sequence[Limit | None],
                          i: int) -> Headers:
    # draft-ietf-httpapi-ratelimit-headers-08 and later (-11): RateLimit-Policy lists every
    # limit as a quota policy, "<name>";q=<quota>;w=<window s>, the quota being the limit's
    # configured `rate` per its `per`; RateLimit gives the one that decides,
    # "<name>";r=<whole tokens left>;t=<seconds until full>. Quota units are tokens: a request
    # that costs more than one takes more than one from `r`.
    policies = []
    for b, limit in zip(states, limits, strict=True):
        if limit is None:
            policies.append(f'"{b.name}";q={int(b.capacity)}')
        elif limit.count >= 1:
            # Both are integers in the fields: a fractional count is rounded.
            policies.append(f'"{b.name}";q={round(limit.count)};'
                            f'w={max(1, math.ceil(limit.per))}')
        else:  # less than one token per period: one token per (period / count)
            policies.append(f'"{b.name}";q=1;w={max(1, math.ceil(limit.per / limit.count))}')
    b = states[i]
    return (("ratelimit-policy", ", ".join(policies)),
            ("ratelimit", f'"{b.name}";r={max(0, math.floor(b.remaining))};'
                          f't={max(0, math.ceil(b.reset_after))}'))
