"""Signing tokens: one private key for one issuer, its public JWKS, and tokens minted with it.

The one token minter of the project: the development signer (`authz serve --dev`, `authz
demo`), the tests' identity providers and the load tests' populations all use it. The service
itself only ever verifies (verifier.py); nothing on its request path signs anything.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
DEFAULT_AUDIENCE = "ml-inference-api"


class Signer:
    """Mints tokens for `issuer`, signed with `private_key` (RS256 for RSA, ES256 for P-256)."""

    def __init__(self, issuer: str, private_key: PrivateKey, *, kid: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self.kid = kid
        self.key = private_key
        self._clock = clock
        public: dict[str, Any]
        if isinstance(private_key, rsa.RSAPrivateKey):
            self.algorithm = "RS256"
            public = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        else:
            self.algorithm = "ES256"
            public = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        public.update(kid=kid, alg=self.algorithm, use="sig")
        self._jwks: dict[str, Any] = {"keys": [public]}

    @classmethod
    def generate(cls, issuer: str, *, kid: str, algorithm: str = "RS256",
                 clock: Callable[[], float] = time.time) -> Signer:
        """A fresh key pair, in memory only."""
        key: PrivateKey
        if algorithm == "RS256":
            # 2048 bits: the verifier's minimum (NIST SP 800-131A).
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r} (ES256 or RS256)")
        return cls(issuer, key, kid=kid, clock=clock)

    @classmethod
    def from_pem(cls, pem: bytes, issuer: str, *, kid: str) -> Signer:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise TypeError("expected an RSA or EC private key")
        return cls(issuer, key, kid=kid)

    def pem(self) -> bytes:
        """The private key (PKCS#8 PEM), e.g. for processes that mint in parallel."""
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS (a copy)."""
        return copy.deepcopy(self._jwks)

    def claims(self, sub: str, *, plan: str | None = None, ttl: float = 3600,
               audience: Any = DEFAULT_AUDIENCE,
               extra_claims: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """iss, sub, aud, iat, exp (+ plan); `extra_claims` last, a None value removes one."""
        now = int(self._clock())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": sub, "aud": audience,
                                  "iat": now, "exp": now + int(ttl)}
        if plan is not None:
            claims["plan"] = plan
        if extra_claims:
            claims.update(extra_claims)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: Mapping[str, Any], *, key: PrivateKey | None = None,
             headers: Mapping[str, Any] | None = None) -> str:
        """`claims` signed with this key (or `key`: a forgery the verifier must refuse)."""
        return jwt.encode(dict(claims), key or self.key, algorithm=self.algorithm,
                          headers={"kid": self.kid, **(headers or {})})

    def mint(self, sub: str, *, plan: str | None = None, ttl: float = 3600,
             audience: Any = DEFAULT_AUDIENCE, extra_claims: Mapping[str, Any] | None = None,
             key: PrivateKey | None = None, headers: Mapping[str, Any] | None = None) -> str:
        return self.sign(self.claims(sub, plan=plan, ttl=ttl, audience=audience,
                                     extra_claims=extra_claims), key=key, headers=headers)
