"""DEVELOPMENT ONLY: a token signer for `authz serve --dev` and `authz demo`.

NEVER USE IN PRODUCTION. Anyone who can call `mint()` can impersonate any subject on any plan.
It exists so the service can be tried without an identity provider:
- the key pair is generated in memory at construction and never written anywhere; it dies
  with the process, so its tokens are worthless elsewhere;
- its issuer is the fixed `DEV_ISSUER`, which the config loader refuses in any config file:
  only the `--dev` flag (or the demo) can make an Authenticator trust it, via
  `Authenticator(settings, static_issuers={DEV_ISSUER: signer.jwks})`.
"""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

DEV_ISSUER = "urn:authz:dev"


class DevelopmentOnlySigner:
    """DEVELOPMENT ONLY. Mints tokens that only a `--dev` Authenticator accepts."""

    def __init__(
        self,
        algorithm: Literal["ES256", "RS256"] = "ES256",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.algorithm = algorithm
        self.issuer = DEV_ISSUER
        self.kid = f"dev-{secrets.token_hex(8)}"
        self._clock = clock
        public_jwk: dict[str, Any]
        if algorithm == "ES256":
            ec_key = ec.generate_private_key(ec.SECP256R1())
            self._private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec_key
            public_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
        elif algorithm == "RS256":
            # 2048 bits: the verifier's minimum (NIST SP 800-131A).
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._private_key = rsa_key
            public_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r} (ES256 or RS256)")
        public_jwk.update(kid=self.kid, alg=algorithm, use="sig")
        self._jwks: dict[str, Any] = {"keys": [public_jwk]}

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS (a copy), for `static_issuers={DEV_ISSUER: signer.jwks}`."""
        return copy.deepcopy(self._jwks)

    def mint(
        self,
        sub: str,
        *,
        plan: str | None = None,
        ttl: int = 3600,
        audience: str = "ml-inference-api",
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token for `sub`; `extra_claims` are applied last (they may override)."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": audience,
            "iat": now,
            "exp": now + ttl,
        }
        if plan is not None:
            claims["plan"] = plan
        if extra_claims:
            claims.update(extra_claims)
        return jwt.encode(
            claims, self._private_key, algorithm=self.algorithm, headers={"kid": self.kid}
        )

    def __repr__(self) -> str:
        return f"DevelopmentOnlySigner(algorithm={self.algorithm!r}, kid={self.kid!r})"
