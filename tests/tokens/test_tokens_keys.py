"""Key parsing and the local key sources (JWKS file, PEM file, static JWKS)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm
from tokens_testkit import ISS_A, ISS_B, FakeClock, KeyFiles, Keys, bearer, claims, public_jwk, sign

from authz.config.settings import AuthSettings, IssuerSettings
from authz.errors import ConfigError
from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.keys import (
    AMBIGUOUS,
    UNKNOWN_KID,
    WRONG_ALGORITHM,
    KeySourceError,
    UrlKeySource,
    VerificationKey,
    parse_jwks,
    parse_pem,
    redact_url,
)
from authz.tokens.verifier import Authenticator


def test_jwks_keys_and_their_algorithms(keys: Keys) -> None:
    ks = parse_jwks(
        {
            "keys": [
                public_jwk(keys.rsa_a, "r"),
                public_jwk(keys.ec_a, "e"),
                public_jwk(keys.ed_a, "d"),
            ]
        },
        "test",
    )
    rsa_key = ks.select("r", "PS384")
    assert isinstance(rsa_key, VerificationKey)
    assert isinstance(rsa_key.key, rsa.RSAPublicKey)
    assert ks.select("e", "ES256") is not None
    assert ks.select("e", "ES384") is WRONG_ALGORITHM
    assert ks.select("d", "EdDSA") is not None
    assert ks.select("zz", "RS256") is UNKNOWN_KID
    assert ks.select(None, "RS256") is AMBIGUOUS


def test_jwk_alg_narrows_the_key(keys: Keys) -> None:
    ks = parse_jwks({"keys": [public_jwk(keys.rsa_a, "r", alg="PS256")]}, "test")
    assert isinstance(ks.select("r", "PS256"), VerificationKey)
    assert ks.select("r", "RS256") is WRONG_ALGORITHM


def test_same_kid_for_two_key_types(keys: Keys) -> None:
    ks = parse_jwks({"keys": [public_jwk(keys.rsa_a, "k"), public_jwk(keys.ec_a, "k")]}, "test")
    rsa_pick, ec_pick = ks.select("k", "RS256"), ks.select("k", "ES256")
    assert isinstance(rsa_pick, VerificationKey) and isinstance(rsa_pick.key, rsa.RSAPublicKey)
    assert isinstance(ec_pick, VerificationKey)
    assert isinstance(ec_pick.key, ec.EllipticCurvePublicKey)


def test_unusable_keys_are_skipped(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_jwk = RSAAlgorithm.to_jwk(keys.rsa_b, as_dict=True) | {"kid": "private"}
    del private_jwk["key_ops"]  # PyJWT writes ["sign"], which would be skipped on its own
    doc = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            public_jwk(keys.rsa_a, "enc", use="enc"),
            public_jwk(keys.rsa_a, "ops", key_ops=["encrypt"]),
            public_jwk(small, "small"),
            public_jwk(keys.rsa_a, "mismatch", alg="ES256"),
            public_jwk(keys.rsa_a, "hs", alg="HS256"),
            public_jwk(keys.rsa_a, 7),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kty": "XYZ", "kid": "alien"},
            "not an object",
            public_jwk(keys.rsa_a, "good"),
            private_jwk,
        ]
    }
    caplog.set_level(logging.WARNING)
    ks = parse_jwks(doc, "issuer 'x': test")
    assert sorted(k.kid or "" for k in ks.keys) == ["good", "private"]
    # A JWK with private parts contributes its public key only.
    assert all(not hasattr(k.key, "private_numbers") for k in ks.keys)
    assert "skipped 10 key(s)" in caplog.text
    # The private exponent is never quoted in a log line.
    assert private_jwk["d"] not in caplog.text


@pytest.mark.parametrize("doc", [{"keys": []}, {"keys": [{"kty": "oct", "k": "eA"}]}])
def test_no_usable_key_is_an_error(doc: object) -> None:
    with pytest.raises(KeySourceError, match="issuer 'x': test: no usable signing key"):
        parse_jwks(doc, "issuer 'x': test")


@pytest.mark.parametrize("doc", [[], {"kids": []}, {"keys": {}}, "x", None])
def test_not_a_jwks(doc: object) -> None:
    with pytest.raises(KeySourceError, match="not a JWKS"):
        parse_jwks(doc, "test")


def _self_signed_cert_pem(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer-b")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


def test_pem_certificate(keys: Keys) -> None:
    ks = parse_pem(_self_signed_cert_pem(keys.rsa_b), "test")
    only = ks.select(None, "RS256")
    assert isinstance(only, VerificationKey) and only.kid is None


def test_pem_private_key_is_refused(keys: Keys) -> None:
    pem = keys.rsa_b.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(KeySourceError, match="private key"):
        parse_pem(pem, "test")


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"]
)
def test_pem_garbage(data: bytes) -> None:
    with pytest.raises(KeySourceError, match="not a PEM public key"):
        parse_pem(data, "test")


async def test_missing_file_stops_start_naming_issuer_and_path(
    tmp_path: Path, key_files: KeyFiles
) -> None:
    missing = tmp_path / "nope.json"
    # Files are configuration: refused even under on_jwks_unavailable "retry".
    settings = AuthSettings(
        issuers=(
            IssuerSettings(ISS_A, jwks_file=str(missing)),
            IssuerSettings(ISS_B, pem_file=str(key_files.pem_b)),
        ),
        on_jwks_unavailable="retry",
    )
    auth = Authenticator(settings)
    with pytest.raises(KeySourceError) as err:
        await auth.start()
    assert ISS_A in str(err.value) and str(missing) in str(err.value)
    assert not auth.ready
    await auth.close()


async def test_bad_jwks_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    auth = Authenticator(AuthSettings(issuers=(IssuerSettings(ISS_A, jwks_file=str(bad)),)))
    with pytest.raises(KeySourceError, match="not JSON"):
        await auth.start()


async def test_static_issuer(keys: Keys, clock: FakeClock) -> None:
    jwks = {"keys": [public_jwk(keys.rsa_a, "s1")]}
    auth = Authenticator(AuthSettings(), static_issuers={"urn:static": jwks}, clock=clock)
    assert not auth.ready  # not started
    await auth.start()
    try:
        assert auth.ready
        token = sign(keys.rsa_a, claims(iss="urn:static"), kid="s1")
        assert isinstance(await auth.authenticate(bearer(token)), Identity)
        assert await auth.authenticate(bearer(sign(keys.rsa_a, claims()))) is (
            TokenFailure.UNKNOWN_ISSUER
        )
    finally:
        await auth.close()


def test_configuration_errors(key_files: KeyFiles, keys: Keys) -> None:
    twice = AuthSettings(
        issuers=(
            IssuerSettings(ISS_A, jwks_file=str(key_files.jwks_a)),
            IssuerSettings(ISS_A, pem_file=str(key_files.pem_b)),
        )
    )
    with pytest.raises(ConfigError, match="configured twice"):
        Authenticator(twice)
    with pytest.raises(ConfigError, match="exactly one of"):
        Authenticator(AuthSettings(issuers=(IssuerSettings(ISS_A),)))
    both = IssuerSettings(ISS_A, jwks_file="a", pem_file="b")
    with pytest.raises(ConfigError, match="exactly one of"):
        Authenticator(AuthSettings(issuers=(both,)))
    with pytest.raises(KeySourceError, match="only http and https"):
        Authenticator(AuthSettings(issuers=(IssuerSettings(ISS_A, jwks_url="file:///etc/passwd"),)))
    clash = {ISS_A: {"keys": [public_jwk(keys.rsa_a, "x")]}}
    settings = AuthSettings(issuers=(IssuerSettings(ISS_A, jwks_file=str(key_files.jwks_a)),))
    with pytest.raises(ConfigError, match="configured twice"):
        Authenticator(settings, static_issuers=clash)


def test_redact_url() -> None:
    assert (
        redact_url("https://u:secret@idp.example:8443/jwks?x=1")
        == "https://idp.example:8443/jwks?x=1"
    )
    assert redact_url("https://idp.example/jwks") == "https://idp.example/jwks"
    source = UrlKeySource(
        ISS_A,
        "https://u:secret@idp.example/jwks",
        timeout=1,
        refresh_interval=1,
        refetch_min_interval=1,
    )
    assert "secret" not in source.origin
