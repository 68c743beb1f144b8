"""The decision: what the service answers, as plain values.

`authz.server` turns a `Decision` into a CheckResponse; telemetry reads its outcome, reason and
labels. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    ALLOWED = "allowed"
    PUBLIC_PATH = "public_path"  # allowed without a token (public or uncovered-but-allowed path)
    UNAUTHENTICATED = "unauthenticated"  # 401
    FORBIDDEN = "forbidden"  # 403
    RATE_LIMITED = "rate_limited"  # 429
    INVALID_REQUEST = "invalid_request"  # 400
    BACKEND_ERROR = "backend_error"  # store failed: 503, or allowed (degraded) under on_error: allow
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
