"""Bearer JWT verification: key sources, the Authenticator and its verified-claims cache."""

from authz.errors import KeySourceError
from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.verifier import Authenticator, KeySourceStats, identity_key

__all__ = [
    "Authenticator",
    "Identity",
    "KeySourceError",
    "KeySourceStats",
    "TokenFailure",
    "identity_key",
]
