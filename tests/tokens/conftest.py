"""Fixtures for the token tests: keys generated once per session, key files per test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from tokens_testkit import FakeClock, KeyFiles, Keys, file_settings, jwks_a, public_pem

from authz.tokens.verifier import Authenticator


@pytest.fixture(scope="session")
def keys() -> Keys:
    # RSA generation costs ~0.1 s per key on this machine: once per session.
    return Keys(
        rsa_a=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_a=ec.generate_private_key(ec.SECP256R1()),
        ed_a=ed25519.Ed25519PrivateKey.generate(),
        rsa_b=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        attacker=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
def key_files(tmp_path: Path, keys: Keys) -> KeyFiles:
    a = tmp_path / "issuer-a.jwks.json"
    a.write_text(json.dumps(jwks_a(keys)))
    b = tmp_path / "issuer-b.pem"
    b.write_bytes(public_pem(keys.rsa_b))
    return KeyFiles(a, b)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def auth(key_files: KeyFiles, clock: FakeClock) -> AsyncIterator[Authenticator]:
    """Issuer A (JWKS file) and issuer B (PEM file), default settings, the fake clock."""
    authenticator = Authenticator(file_settings(key_files), clock=clock)
    await authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.close()
