"""The decision: what the service answers, as plain values.

`authz.server` turns a `Decision` into a CheckResponse; telemetry reads its outcome, reason and
labels. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum

from .buckets.store import BucketState, ChargeResult
from .config.settings import Settings
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
    # store failed or not ready: 503, or allowed (degraded) under store.on_error: allow
    BACKEND_ERROR = "backend_error"
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
        self._remove_when_allowed = (h.degraded,)
        self._remove_when_public = (*self._identity_headers, h.degraded)
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

    def _identity(self, identity: Identity, plan: str) -> Headers:
        h = self._h
        return ((h.subject, header_value(identity.subject)),
                (h.issuer, header_value(identity.issuer)),
                (h.plan, plan))

    def unlimited(self, identity: Identity, grant: Grant,
                  cache_hit: bool | None = None) -> Decision:
        return Decision(True, 200, Outcome.ALLOWED, "ok",
                        upstream_headers=self._identity(identity, grant.plan),
                        remove_headers=self._remove_when_allowed,
                        plan=grant.plan, model=grant.rule, token_cache_hit=cache_hit)

    def store_failed(self, identity: Identity, grant: Grant,
                     cache_hit: bool | None = None) -> Decision:
        if self._store_policy == "allow":
            return Decision(True, 200, Outcome.BACKEND_ERROR, "store_unavailable",
                            upstream_headers=(*self._identity(identity, grant.plan),
                                              (self._h.degraded, "store-unavailable")),
                            plan=grant.plan, model=grant.rule, token_cache_hit=cache_hit)
        return Decision(False, 503, Outcome.BACKEND_ERROR, "store_unavailable",
                        response_headers=(*_JSON, ("retry-after", "1")),
                        body=_body(error="unavailable", reason="store_unavailable"),
                        plan=grant.plan, model=grant.rule, token_cache_hit=cache_hit)

    def charged(self, identity: Identity, grant: Grant, result: ChargeResult,
                cache_hit: bool | None = None) -> Decision:
        if result.allowed:
            # The most restrictive limit: fewest requests left, then the longest until full.
            b = min(result.buckets, key=lambda s: (s.remaining, -s.reset_after))
            return Decision(True, 200, Outcome.ALLOWED, "ok",
                            upstream_headers=self._identity(identity, grant.plan),
                            remove_headers=self._remove_when_allowed,
                            response_headers=_ratelimit(b),
                            plan=grant.plan, model=grant.rule, limit=b.name,
                            token_cache_hit=cache_hit)
        # The limit that decided: the one the caller must wait longest for.
        b = max(result.buckets, key=lambda s: s.retry_after)
        retry = max(1, math.ceil(result.retry_after))
        return Decision(False, 429, Outcome.RATE_LIMITED, "rate_limited",
                        response_headers=(("retry-after", str(retry)), *_ratelimit(b), *_JSON),
                        body=_body(error="rate_limited", reason="rate_limited", limit=b.name,
                                   plan=grant.plan, retry_after=retry),
                        plan=grant.plan, model=grant.rule, limit=b.name,
                        token_cache_hit=cache_hit)


def _ratelimit(b: BucketState) -> Headers:
    # IETF draft-ietf-httpapi-ratelimit-headers: limit, remaining (whole requests), and reset
    # (whole seconds until the bucket is full again, rounded up).
    return (("ratelimit-limit", str(int(b.capacity))),
            ("ratelimit-remaining", str(max(0, math.floor(b.remaining)))),
            ("ratelimit-reset", str(max(0, math.ceil(b.reset_after)))))
