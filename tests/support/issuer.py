"""A test identity provider: an RSA key, its JWKS file, and tokens signed with it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

AUDIENCE = "ml-inference-api"


class TestIssuer:
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "https://idp.test", kid: str = "k1") -> None:
        self.name = name
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=kid, use="sig", alg="RS256")
        self.jwks = {"keys": [jwk]}
        directory.mkdir(parents=True, exist_ok=True)
        self.jwks_file = directory / f"jwks-{uuid.uuid4().hex[:8]}.json"
        self.jwks_file.write_text(json.dumps(self.jwks))

    def settings(self) -> dict[str, Any]:
        """This issuer as a config-file entry."""
        return {"issuer": self.name, "jwks_file": str(self.jwks_file), "algorithms": ["RS256"]}

    def mint(self, sub: str = "alice", *, ttl: float = 3600, audience: Any = AUDIENCE,
             headers: dict[str, Any] | None = None, key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.name, "sub": sub, "aud": audience,
                                   "iat": now, "exp": now + int(ttl)}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.key, algorithm="RS256",
                          headers={"kid": self.kid, **(headers or {})})
