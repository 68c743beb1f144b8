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

import secrets
import time
from collections.abc import Callable
from typing import Literal

from ..config.settings import DEV_ISSUER
from .signer import Signer

__all__ = ["DEV_ISSUER", "DevelopmentOnlySigner"]


class DevelopmentOnlySigner(Signer):
    """DEVELOPMENT ONLY. Mints tokens that only a `--dev` Authenticator accepts."""

    def __init__(
        self,
        algorithm: Literal["ES256", "RS256"] = "ES256",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        generated = Signer.generate(DEV_ISSUER, kid=f"dev-{secrets.token_hex(8)}",
                                    algorithm=algorithm, clock=clock)
        super().__init__(DEV_ISSUER, generated.key, kid=generated.kid, clock=clock)

    def __repr__(self) -> str:
        return f"DevelopmentOnlySigner(algorithm={self.algorithm!r}, kid={self.kid!r})"
