"""JSON Web Algorithm names (RFC 7518) the token verifier accepts.

At the bottom of the package with `errors`: the config loader checks `algorithms` against it and
the verifier narrows every issuer to it; it imports nothing.
"""

from __future__ import annotations

# Asymmetric algorithms only. Symmetric (HS*) ones are never accepted: a verifier that accepts
# HS256 can be fooled by a token "signed" with the issuer's *public* key as the secret, and a
# shared secret cannot be published in a JWKS anyway. `none` is never accepted.
ASYMMETRIC_ALGORITHMS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)
