"""The verified-claims cache: hits, expiry at exp, bound, counters."""

from __future__ import annotations

import pytest
from tokens_testkit import (
    NOW,
    FakeClock,
    KeyFiles,
    Keys,
    bearer,
    claims,
    file_settings,
    sign,
    started,
)

from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.verifier import Authenticator


async def test_cache_hit_returns_the_same_identity(auth: Authenticator, keys: Keys) -> None:
    header = bearer(sign(keys.rsa_a, claims()))
    assert auth.authenticate_cached(header) is None
    first = await auth.authenticate(header)
    assert isinstance(first, Identity)
    assert auth.cache_misses == 1 and auth.cache_size == 1
    assert auth.authenticate_cached(header) is first
    assert await auth.authenticate(header) is first
    assert auth.cache_hits == 2 and auth.cache_misses == 1


async def test_failures_are_not_cached(auth: Authenticator, keys: Keys) -> None:
    header = bearer(sign(keys.rsa_a, claims(aud="other")))
    for _ in range(3):
        assert await auth.authenticate(header) is TokenFailure.WRONG_AUDIENCE
    assert auth.cache_size == 0
    assert auth.cache_misses == 3
    assert auth.authenticate_cached(header) is None


async def test_entry_gone_at_exp(auth: Authenticator, keys: Keys, clock: FakeClock) -> None:
    header = bearer(sign(keys.rsa_a, claims(exp=int(NOW) + 60)))
    assert isinstance(await auth.authenticate(header), Identity)
    clock.now = NOW + 59.9
    assert auth.authenticate_cached(header) is not None
    # At exp the cache lets go, whatever the leeway ...
    clock.now = NOW + 60
    assert auth.authenticate_cached(header) is None
    assert auth.cache_size == 0
    # ... while the full path still accepts within the leeway, without caching again.
    assert isinstance(await auth.authenticate(header), Identity)
    assert auth.cache_size == 0
    clock.now = NOW + 65
    assert await auth.authenticate(header) is TokenFailure.EXPIRED


async def test_cache_is_bounded(key_files: KeyFiles, keys: Keys, clock: FakeClock) -> None:
    auth = Authenticator(file_settings(key_files, token_cache_size=3), clock=clock)
    async with started(auth):
        headers = [bearer(sign(keys.rsa_a, claims(sub=f"user{i}"))) for i in range(5)]
        for h in headers:
            assert isinstance(await auth.authenticate(h), Identity)
        assert auth.cache_size == 3
        # Oldest first out.
        assert [auth.authenticate_cached(h) is not None for h in headers] == [
            False,
            False,
            True,
            True,
            True,
        ]


async def test_cache_can_be_disabled(key_files: KeyFiles, keys: Keys, clock: FakeClock) -> None:
    auth = Authenticator(file_settings(key_files, token_cache_size=0), clock=clock)
    async with started(auth):
        header = bearer(sign(keys.rsa_a, claims()))
        assert isinstance(await auth.authenticate(header), Identity)
        assert auth.cache_size == 0
        assert auth.authenticate_cached(header) is None


async def test_cached_identity_is_per_token(auth: Authenticator, keys: Keys) -> None:
    a = bearer(sign(keys.rsa_a, claims(sub="alice")))
    b = bearer(sign(keys.rsa_a, claims(sub="bob")))
    ia, ib = await auth.authenticate(a), await auth.authenticate(b)
    assert isinstance(ia, Identity) and isinstance(ib, Identity)
    assert auth.authenticate_cached(a) is ia
    assert auth.authenticate_cached(b) is ib
    # A duplicated header holding a cached token is not a cache hit.
    assert auth.authenticate_cached(f"{a},{a}") is None


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic x", "B\udcffarer x", "Bearer \udcff\udcfe", "x" * 10**6],
)
def test_fast_path_never_raises(auth: Authenticator, header: str | None) -> None:
    assert auth.authenticate_cached(header) is None


# -- retained claims: what a cached identity keeps ----------------------------------------------

async def test_all_claims_are_kept_by_default(auth: Authenticator, keys: Keys) -> None:
    identity = await auth.authenticate(bearer(sign(keys.rsa_a, claims(plan="pro", email="e"))))
    assert isinstance(identity, Identity)
    assert auth.retained_claims is None
    assert identity.claims["email"] == "e" and identity.claims["plan"] == "pro"


async def test_retained_claims_keep_only_those_and_share_equal_ones(
        auth: Authenticator, keys: Keys) -> None:
    auth.retained_claims = frozenset({"plan", "team"})
    a = await auth.authenticate(bearer(sign(keys.rsa_a, claims(sub="a", plan="pro", jti="1",
                                                               email="a@x"))))
    b = await auth.authenticate(bearer(sign(keys.rsa_a, claims(sub="b", plan="pro", jti="2"))))
    c = await auth.authenticate(bearer(sign(keys.rsa_a, claims(sub="c", plan="free"))))
    d = await auth.authenticate(bearer(sign(keys.rsa_a, claims(sub="d", plan="pro",
                                                               team=["x", "y"]))))
    assert isinstance(a, Identity) and isinstance(b, Identity)
    assert isinstance(c, Identity) and isinstance(d, Identity)
    assert dict(a.claims) == {"plan": "pro"} and a.subject == "a"
    assert a.claims is b.claims  # one mapping for every caller with the same kept claims
    assert dict(c.claims) == {"plan": "free"} and c.claims is not a.claims
    assert dict(d.claims) == {"plan": "pro", "team": ["x", "y"]}  # unhashable: its own copy
    with pytest.raises(TypeError):
        a.claims["plan"] = "enterprise"  # type: ignore[index]


async def test_changing_the_retained_claims_empties_the_cache(auth: Authenticator,
                                                              keys: Keys) -> None:
    header = bearer(sign(keys.rsa_a, claims(plan="pro", tier="gold")))
    auth.retained_claims = frozenset({"plan"})
    first = await auth.authenticate(header)
    assert isinstance(first, Identity) and auth.cache_size == 1
    auth.retained_claims = frozenset({"plan"})  # the same set: nothing happens
    assert auth.authenticate_cached(header) is first
    auth.retained_claims = frozenset({"tier"})  # a new quota reads another claim
    assert auth.cache_size == 0 and auth.authenticate_cached(header) is None
    again = await auth.authenticate(header)
    assert isinstance(again, Identity) and dict(again.claims) == {"tier": "gold"}
