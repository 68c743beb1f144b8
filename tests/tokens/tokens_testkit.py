"""Helpers for the token tests: keys, JWKS documents, signed and hand-forged tokens, a clock."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from authz.config.settings import AuthSettings, IssuerSettings
from authz.tokens.verifier import Authenticator

NOW = 1_800_000_000.0  # the fake clock's start (2027-01-15)
AUDIENCE = "ml-inference-api"
ISS_A = "https://issuer-a.example"  # JWKS file: RSA kid "a1", EC kid "a-ec", Ed25519 "a-ed"
ISS_B = "https://issuer-b.example"  # PEM file: one kid-less RSA key


class FakeClock:
    """A callable clock that only moves when told to."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(doc: Any) -> str:
    return b64url(json.dumps(doc).encode())


def public_jwk(private_key: Any, kid: object, **extra: Any) -> dict[str, Any]:
    pub = private_key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for issuer A at NOW; a value of None removes the claim."""
    base: dict[str, Any] = {
        "iss": ISS_A,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "plan": "pro",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    private_key: Any,
    payload: Mapping[str, Any],
    *,
    alg: str = "RS256",
    kid: str | None = "a1",
    headers: Mapping[str, Any] | None = None,
) -> str:
    hdrs: dict[str, Any] = dict(headers or {})
    if kid is not None:
        hdrs["kid"] = kid
    # PyJWS, not jwt.encode: the tests need payloads jwt.encode refuses (a non-string iss).
    return jwt.PyJWS().encode(json.dumps(dict(payload)).encode(), private_key, alg, headers=hdrs)


def forge(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand (for what PyJWT refuses to produce)."""
    return f"{b64json(header)}.{b64json(payload)}.{b64url(signature)}"


def forge_hs256(payload: Mapping[str, Any], secret: bytes, kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def bearer(token: str) -> str:
    return f"Bearer {token}"


@contextlib.asynccontextmanager
async def started(auth: Authenticator) -> AsyncIterator[Authenticator]:
    await auth.start()
    try:
        yield auth
    finally:
        await auth.close()


@dataclass(frozen=True)
class Keys:
    rsa_a: rsa.RSAPrivateKey
    ec_a: ec.EllipticCurvePrivateKey
    ed_a: ed25519.Ed25519PrivateKey
    rsa_b: rsa.RSAPrivateKey
    attacker: rsa.RSAPrivateKey


def jwks_a(keys: Keys) -> dict[str, Any]:
    return {
        "keys": [
            public_jwk(keys.rsa_a, "a1", use="sig"),
            public_jwk(keys.ec_a, "a-ec", alg="ES256"),
            public_jwk(keys.ed_a, "a-ed"),
        ]
    }


@dataclass(frozen=True)
class KeyFiles:
    jwks_a: Path
    pem_b: Path


def file_settings(files: KeyFiles, **overrides: Any) -> AuthSettings:
    issuers = (
        IssuerSettings(issuer=ISS_A, jwks_file=str(files.jwks_a)),
        IssuerSettings(issuer=ISS_B, pem_file=str(files.pem_b)),
    )
    return AuthSettings(**{"issuers": issuers, **overrides})
