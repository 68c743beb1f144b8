"""The development-only signer and its use as a static issuer."""

from __future__ import annotations

import pytest
from tokens_testkit import FakeClock, KeyFiles, bearer, file_settings, started

from authz.config.settings import AuthSettings
from authz.tokens.devsigner import DEV_ISSUER, DevelopmentOnlySigner
from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.verifier import Authenticator


@pytest.fixture(scope="module", params=["ES256", "RS256"])
def signer(request: pytest.FixtureRequest) -> DevelopmentOnlySigner:
    return DevelopmentOnlySigner(request.param)


def test_jwks_is_public_only(signer: DevelopmentOnlySigner) -> None:
    [jwk] = signer.jwks["keys"]
    assert jwk["kid"] == signer.kid and jwk["alg"] == signer.algorithm and jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    # A copy: callers cannot alter the signer's JWKS.
    signer.jwks["keys"].clear()
    assert signer.jwks["keys"]


async def test_minted_tokens_verify(signer: DevelopmentOnlySigner) -> None:
    clock = FakeClock()
    dev = DevelopmentOnlySigner(signer.algorithm, clock=clock)
    auth = Authenticator(AuthSettings(), static_issuers={DEV_ISSUER: dev.jwks}, clock=clock)
    async with started(auth):
        identity = await auth.authenticate(bearer(dev.mint("alice", plan="free")))
        assert isinstance(identity, Identity)
        assert (identity.issuer, identity.subject) == (DEV_ISSUER, "alice")
        assert identity.claims["plan"] == "free"
        assert identity.expires_at == int(clock.now) + 3600

        extra = dev.mint("bob", ttl=60, extra_claims={"scope": "infer"})
        identity = await auth.authenticate(bearer(extra))
        assert isinstance(identity, Identity) and identity.claims["scope"] == "infer"
        assert "plan" not in identity.claims
        clock.advance(120)
        assert await auth.authenticate(bearer(extra)) is TokenFailure.EXPIRED

        other_audience = dev.mint("carol", audience="another-api")
        assert await auth.authenticate(bearer(other_audience)) is TokenFailure.WRONG_AUDIENCE


async def test_another_signers_tokens_are_refused(signer: DevelopmentOnlySigner) -> None:
    # Keys die with the signer: a token from another process's dev signer is worthless.
    ours = DevelopmentOnlySigner(signer.algorithm)
    auth = Authenticator(AuthSettings(), static_issuers={DEV_ISSUER: ours.jwks})
    async with started(auth):
        result = await auth.authenticate(bearer(signer.mint("alice")))
        assert result is TokenFailure.UNKNOWN_KEY


async def test_dev_issuer_unknown_without_the_static_issuer(
    signer: DevelopmentOnlySigner, key_files: KeyFiles
) -> None:
    async with started(Authenticator(file_settings(key_files))) as auth:
        assert await auth.authenticate(bearer(signer.mint("alice"))) is TokenFailure.UNKNOWN_ISSUER


def test_only_es256_and_rs256() -> None:
    with pytest.raises(ValueError, match="unsupported algorithm"):
        DevelopmentOnlySigner("HS256")  # type: ignore[arg-type]


def test_repr_names_it_development_only(signer: DevelopmentOnlySigner) -> None:
    assert repr(signer).startswith("DevelopmentOnlySigner(")
    assert DEV_ISSUER == "urn:authz:dev"
