"""What token verification produces: a verified identity, or a named reason for refusing.

The reason strings are part of the service's contract: they appear in 401 bodies, metrics and
logs (README "Status codes").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class TokenFailure(StrEnum):
    MISSING = "missing_token"  # no authorization header, or empty
    MALFORMED = "malformed_token"  # not "Bearer <jwt>", bad base64/JSON, several values
    TOO_LARGE = "token_too_large"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"  # alg none, HS* where not allowed, ...
    UNKNOWN_ISSUER = "unknown_issuer"  # iss not configured (or missing)
    UNKNOWN_KEY = "unknown_key"  # kid not in the issuer's key set (after a refetch)
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "token_expired"
    NOT_YET_VALID = "token_not_yet_valid"  # nbf (or iat) in the future
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"  # exp, sub, iss or aud absent / wrong type
    KEYS_UNAVAILABLE = "keys_unavailable"  # issuer's JWKS never loaded


@dataclass(frozen=True, slots=True)
class Identity:
    issuer: str
    subject: str
    # Hex digest of issuer + NUL + subject: the bucket identity. Two issuers' equal `sub`
    # values never share it; it is safe in Redis keys and logs whatever `sub` contains.
    key: str
    expires_at: float  # the token's exp (epoch seconds)
    # Verified claims, read-only: those the Authenticator's `retained_claims` names (the
    # quota's plan claim, in the server), or all of them.
    claims: Mapping[str, Any]
