"""A test identity provider: an RSA key, its JWKS file, and tokens signed with it
(authz.tokens.signer.Signer, the project's one token minter)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from authz.tokens.signer import DEFAULT_AUDIENCE, Signer

AUDIENCE = DEFAULT_AUDIENCE


class TestIssuer(Signer):
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "https://idp.test", kid: str = "k1") -> None:
        generated = Signer.generate(name, kid=kid)
        super().__init__(name, generated.key, kid=kid)
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self.jwks_file = directory / f"jwks-{uuid.uuid4().hex[:8]}.json"
        self.jwks_file.write_text(json.dumps(self.jwks))

    def settings(self) -> dict[str, Any]:
        """This issuer as a config-file entry."""
        return {"issuer": self.name, "jwks_file": str(self.jwks_file), "algorithms": ["RS256"]}

    def mint(self, sub: str = "alice", *, ttl: float = 3600,  # type: ignore[override]
             audience: Any = AUDIENCE, headers: dict[str, Any] | None = None, key: Any = None,
             **claims: Any) -> str:
        """Extra claims as keywords (plan="pro", nbf=None to drop one)."""
        return self.sign(self.claims(sub, ttl=ttl, audience=audience, extra_claims=claims),
                         key=key, headers=headers)
