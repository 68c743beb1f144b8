"""Signature, algorithm, key and claim rules of the full verification path."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import jwt
import pytest
from tokens_testkit import (
    AUDIENCE,
    ISS_A,
    ISS_B,
    NOW,
    FakeClock,
    KeyFiles,
    Keys,
    bearer,
    claims,
    forge,
    forge_hs256,
    public_jwk,
    public_pem,
    sign,
    started,
)

from authz.config.settings import AuthSettings, IssuerSettings
from authz.errors import ConfigError
from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.verifier import Authenticator


async def accepted(auth: Authenticator, token: str) -> Identity:
    result = await auth.authenticate(bearer(token))
    assert isinstance(result, Identity), result
    return result


# -- valid tokens ------------------------------------------------------------------------------


async def test_rs256_with_audience_string(auth: Authenticator, keys: Keys) -> None:
    identity = await accepted(auth, sign(keys.rsa_a, claims()))
    assert identity.issuer == ISS_A
    assert identity.subject == "alice"
    assert identity.expires_at == NOW + 600
    assert identity.claims["plan"] == "pro"


async def test_audience_list_containing_ours(auth: Authenticator, keys: Keys) -> None:
    await accepted(auth, sign(keys.rsa_a, claims(aud=["other-api", AUDIENCE])))


@pytest.mark.parametrize(
    ("alg", "kid", "key_name"),
    [
        ("PS256", "a1", "rsa_a"),
        ("RS512", "a1", "rsa_a"),
        ("ES256", "a-ec", "ec_a"),
        ("EdDSA", "a-ed", "ed_a"),
    ],
)
async def test_other_asymmetric_algorithms(
    auth: Authenticator, keys: Keys, alg: str, kid: str, key_name: str
) -> None:
    await accepted(auth, sign(getattr(keys, key_name), claims(), alg=alg, kid=kid))


async def test_pem_issuer_kidless_token(auth: Authenticator, keys: Keys) -> None:
    identity = await accepted(auth, sign(keys.rsa_b, claims(iss=ISS_B), kid=None))
    assert identity.issuer == ISS_B
    # A token that carries a kid still finds the PEM issuer's only key.
    await accepted(auth, sign(keys.rsa_b, claims(iss=ISS_B, sub="bob"), kid="whatever"))


async def test_claims_are_read_only(auth: Authenticator, keys: Keys) -> None:
    identity = await accepted(auth, sign(keys.rsa_a, claims()))
    with pytest.raises(TypeError):
        identity.claims["plan"] = "enterprise"  # type: ignore[index]


# -- algorithm attacks -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none(auth: Authenticator, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": "a1"}, claims())
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNSUPPORTED_ALGORITHM


async def test_alg_missing_or_not_a_string(auth: Authenticator) -> None:
    for header in ({"typ": "JWT"}, {"alg": 256}, {"alg": None}):
        token = forge(header, claims(), b"x" * 32)
        assert await auth.authenticate(bearer(token)) is TokenFailure.MALFORMED


async def test_hs256_signed_with_the_public_key_pem(auth: Authenticator, keys: Keys) -> None:
    # The classic confusion: the RSA public key (PEM bytes, as an HMAC secret).
    for iss, key, kid in ((ISS_B, keys.rsa_b, None), (ISS_A, keys.rsa_a, "a1")):
        token = forge_hs256(claims(iss=iss), public_pem(key), kid=kid)
        assert await auth.authenticate(bearer(token)) is TokenFailure.UNSUPPORTED_ALGORITHM


async def test_hs256_refused_even_if_configured(
    key_files: KeyFiles, keys: Keys, clock: FakeClock
) -> None:
    settings = AuthSettings(
        issuers=(
            IssuerSettings(ISS_B, pem_file=str(key_files.pem_b), algorithms=("RS256", "HS256")),
        )
    )
    async with started(Authenticator(settings, clock=clock)) as auth:
        token = forge_hs256(claims(iss=ISS_B), public_pem(keys.rsa_b))
        assert await auth.authenticate(bearer(token)) is TokenFailure.UNSUPPORTED_ALGORITHM
        await accepted(auth, sign(keys.rsa_b, claims(iss=ISS_B), kid=None))


def test_issuer_with_only_symmetric_algorithms_is_refused(key_files: KeyFiles) -> None:
    settings = AuthSettings(
        issuers=(IssuerSettings(ISS_B, pem_file=str(key_files.pem_b), algorithms=("HS256",)),)
    )
    with pytest.raises(ConfigError, match="no asymmetric algorithm"):
        Authenticator(settings)


async def test_alg_outside_the_issuer_allow_list(
    key_files: KeyFiles, keys: Keys, clock: FakeClock
) -> None:
    settings = AuthSettings(
        issuers=(IssuerSettings(ISS_A, jwks_file=str(key_files.jwks_a), algorithms=("RS256",)),)
    )
    async with started(Authenticator(settings, clock=clock)) as auth:
        await accepted(auth, sign(keys.rsa_a, claims()))
        ps256 = sign(keys.rsa_a, claims(), alg="PS256")
        assert await auth.authenticate(bearer(ps256)) is TokenFailure.UNSUPPORTED_ALGORITHM


async def test_alg_that_does_not_fit_the_kids_key(auth: Authenticator, keys: Keys) -> None:
    # kid "a-ec" is an ES256 key: an RS256 token naming it is refused before any crypto.
    token = sign(keys.rsa_a, claims(), alg="RS256", kid="a-ec")
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNSUPPORTED_ALGORITHM


async def test_unsupported_crit_header(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_a, claims(), headers={"crit": ["exp"], "exp": 1})
    assert await auth.authenticate(bearer(token)) is TokenFailure.MALFORMED


# -- keys ----------------------------------------------------------------------------------------


async def test_unknown_kid(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_a, claims(), kid="not-there")
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNKNOWN_KEY


async def test_no_kid_with_several_keys(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_a, claims(), kid=None)
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNKNOWN_KEY


async def test_kid_not_a_string(auth: Authenticator, keys: Keys) -> None:
    token = forge({"alg": "RS256", "kid": 1}, claims(), b"x" * 256)
    assert await auth.authenticate(bearer(token)) is TokenFailure.MALFORMED


async def test_jku_x5u_jwk_headers_are_ignored(auth: Authenticator, keys: Keys) -> None:
    evil = public_jwk(keys.attacker, "evil")
    headers: dict[str, Any] = {
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "jwk": evil,
    }
    # Signed with our key: verifies, the extra headers change nothing.
    await accepted(auth, sign(keys.rsa_a, claims(), headers=headers))
    # Signed with the attacker's key advertised through those headers: refused.
    token = sign(keys.attacker, claims(), kid="evil", headers=headers)
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNKNOWN_KEY
    # ... also when it borrows our kid.
    token = sign(keys.attacker, claims(), kid="a1", headers={**headers, "jwk": evil})
    assert await auth.authenticate(bearer(token)) is TokenFailure.BAD_SIGNATURE


async def test_issuer_a_token_signed_with_issuer_b_key(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_b, claims(iss=ISS_A), kid="a1")
    assert await auth.authenticate(bearer(token)) is TokenFailure.BAD_SIGNATURE
    token = sign(keys.rsa_a, claims(iss=ISS_B), kid=None)
    assert await auth.authenticate(bearer(token)) is TokenFailure.BAD_SIGNATURE


async def test_tampered_payload(auth: Authenticator, keys: Keys) -> None:
    h, _, s = sign(keys.rsa_a, claims()).split(".")
    _, p, _ = sign(keys.rsa_a, claims(sub="mallory")).split(".")
    assert await auth.authenticate(bearer(f"{h}.{p}.{s}")) is TokenFailure.BAD_SIGNATURE


# -- claims ---------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["exp", "sub", "aud"])
async def test_required_claims(auth: Authenticator, keys: Keys, missing: str) -> None:
    token = sign(keys.rsa_a, claims(**{missing: None}))
    assert await auth.authenticate(bearer(token)) is TokenFailure.MISSING_CLAIM


async def test_missing_iss_is_an_unknown_issuer(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_a, claims(iss=None))
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNKNOWN_ISSUER


@pytest.mark.parametrize("iss", ["https://elsewhere.example", "", 42, ["https://issuer-a.example"]])
async def test_issuer_not_configured(auth: Authenticator, keys: Keys, iss: object) -> None:
    token = sign(keys.rsa_a, claims(iss=iss))
    assert await auth.authenticate(bearer(token)) is TokenFailure.UNKNOWN_ISSUER


@pytest.mark.parametrize(
    "aud", ["other-api", "", [], ["other-api"], ["other-api", "ML-INFERENCE-API"]]
)
async def test_wrong_audience(auth: Authenticator, keys: Keys, aud: object) -> None:
    token = sign(keys.rsa_a, claims(aud=aud))
    assert await auth.authenticate(bearer(token)) is TokenFailure.WRONG_AUDIENCE


@pytest.mark.parametrize("aud", [42, {"a": AUDIENCE}, [AUDIENCE, 1]])
async def test_audience_of_the_wrong_type(auth: Authenticator, keys: Keys, aud: object) -> None:
    token = sign(keys.rsa_a, claims(aud=aud))
    assert await auth.authenticate(bearer(token)) is TokenFailure.MISSING_CLAIM


@pytest.mark.parametrize("sub", ["", 42, ["alice"], "alice\r\nx-auth-plan: enterprise", "a\x00"])
async def test_bad_subject(auth: Authenticator, keys: Keys, sub: object) -> None:
    token = sign(keys.rsa_a, claims(sub=sub))
    assert await auth.authenticate(bearer(token)) is TokenFailure.MISSING_CLAIM


@pytest.mark.parametrize("exp", ["soon", str(int(NOW) + 600), True, float("nan"), 10**400])
async def test_exp_not_a_number(auth: Authenticator, keys: Keys, exp: object) -> None:
    token = sign(keys.rsa_a, claims(exp=exp))
    assert await auth.authenticate(bearer(token)) is TokenFailure.MISSING_CLAIM


async def test_expired(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_a, claims(exp=int(NOW) - 3600))
    assert await auth.authenticate(bearer(token)) is TokenFailure.EXPIRED


async def test_leeway_is_honoured(auth: Authenticator, keys: Keys, clock: FakeClock) -> None:
    # Default leeway: 5 s.
    token = sign(keys.rsa_a, claims(exp=int(NOW)))
    clock.now = NOW + 4
    await accepted(auth, token)
    clock.now = NOW + 5
    assert await auth.authenticate(bearer(token)) is TokenFailure.EXPIRED


async def test_nbf_in_the_future(auth: Authenticator, keys: Keys, clock: FakeClock) -> None:
    token = sign(keys.rsa_a, claims(nbf=int(NOW) + 60))
    assert await auth.authenticate(bearer(token)) is TokenFailure.NOT_YET_VALID
    within_leeway = sign(keys.rsa_a, claims(nbf=int(NOW) + 4))
    await accepted(auth, within_leeway)
    clock.advance(60)
    await accepted(auth, token)


async def test_iat_in_the_future(auth: Authenticator, keys: Keys) -> None:
    token = sign(keys.rsa_a, claims(iat=int(NOW) + 60))
    assert await auth.authenticate(bearer(token)) is TokenFailure.NOT_YET_VALID


@pytest.mark.parametrize("name", ["nbf", "iat"])
async def test_time_claims_of_the_wrong_type(auth: Authenticator, keys: Keys, name: str) -> None:
    token = sign(keys.rsa_a, claims(**{name: "yesterday"}))
    assert await auth.authenticate(bearer(token)) is TokenFailure.MISSING_CLAIM


# -- identity key ------------------------------------------------------------------------------


async def test_same_sub_at_two_issuers_gets_two_keys(auth: Authenticator, keys: Keys) -> None:
    a = await accepted(auth, sign(keys.rsa_a, claims(sub="same")))
    b = await accepted(auth, sign(keys.rsa_b, claims(iss=ISS_B, sub="same"), kid=None))
    assert a.subject == b.subject == "same"
    assert a.key != b.key
    assert a.key == hashlib.sha256(f"{ISS_A}\0same".encode()).hexdigest()[:32]
    assert len(b.key) == 32 and int(b.key, 16) >= 0


async def test_identity_key_is_stable_and_safe(auth: Authenticator, keys: Keys) -> None:
    weird = "ünï{cödé}:*/ \u2028"
    first = await accepted(auth, sign(keys.rsa_a, claims(sub=weird)))
    again = await accepted(auth, sign(keys.rsa_a, claims(sub=weird, plan="free")))
    assert first.key == again.key
    assert first.key.isalnum() and first.key == first.key.lower()


# -- robustness ----------------------------------------------------------------------------------


async def test_unexpected_exception_is_malformed_and_not_logged_with_the_token(
    auth: Authenticator,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = sign(keys.rsa_a, claims())

    def broken_decode(jwt_text: str, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"bug while handling {jwt_text}")

    monkeypatch.setattr(jwt, "decode", broken_decode)
    caplog.set_level(logging.DEBUG)
    assert await auth.authenticate(bearer(token)) is TokenFailure.MALFORMED
    assert "RuntimeError" in caplog.text
    assert token.split(".")[2] not in caplog.text


async def test_no_log_line_ever_holds_a_token(
    auth: Authenticator, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [
        sign(keys.rsa_a, claims()),
        sign(keys.attacker, claims(), kid="evil"),
        sign(keys.attacker, claims()),
        sign(keys.rsa_a, claims(aud="x")),
        sign(keys.rsa_a, claims(exp=1)),
        forge({"alg": "none"}, claims()),
    ]
    for token in tokens:
        await auth.authenticate(bearer(token))
        await auth.authenticate(bearer(token) + "," + bearer(token))
    for token in tokens:
        assert token not in caplog.text
        assert token.split(".")[1] not in caplog.text
