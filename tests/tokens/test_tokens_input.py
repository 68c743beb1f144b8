"""Bad Authorization headers: each is a clean TokenFailure, decided before any JWT work."""

from __future__ import annotations

import pytest
from tokens_testkit import (
    FakeClock,
    KeyFiles,
    Keys,
    b64json,
    b64url,
    bearer,
    claims,
    file_settings,
    sign,
    started,
)

from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.verifier import Authenticator


@pytest.fixture
def good(keys: Keys) -> str:
    return sign(keys.rsa_a, claims())


async def test_valid_token_is_accepted(auth: Authenticator, good: str) -> None:
    result = await auth.authenticate(bearer(good))
    assert isinstance(result, Identity)
    assert result.subject == "alice"


@pytest.mark.parametrize("header", [None, "", "   "])
async def test_missing_or_empty_header(auth: Authenticator, header: str | None) -> None:
    assert await auth.authenticate(header) is TokenFailure.MISSING


@pytest.mark.parametrize(
    "template",
    [
        "{h},{h}",  # two Authorization headers, joined by Envoy
        "{h}, {h}",
        "{h},",
        "{t}",  # no scheme
        "Bearer  {t}",  # two spaces
        "Bearer\t{t}",
        "Bearer",
        "Bearer ",
        "Token {t}",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer {t} extra",
        "Bearer {t}.x",  # four segments
    ],
)
async def test_malformed_header_shapes(auth: Authenticator, good: str, template: str) -> None:
    header = template.format(h=bearer(good), t=good)
    assert await auth.authenticate(header) is TokenFailure.MALFORMED
    assert auth.authenticate_cached(header) is None


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
async def test_scheme_is_case_insensitive(auth: Authenticator, good: str, scheme: str) -> None:
    assert isinstance(await auth.authenticate(f"{scheme} {good}"), Identity)
    # ... on the cached path too.
    assert auth.authenticate_cached(f"{scheme} {good}") is not None


async def test_64_kib_header_is_too_large(auth: Authenticator) -> None:
    header = "Bearer " + "a" * (64 * 1024)
    assert await auth.authenticate(header) is TokenFailure.TOO_LARGE
    assert auth.authenticate_cached(header) is None


async def test_1_mib_token_is_too_large(auth: Authenticator, good: str) -> None:
    # Shaped like a JWT so that only the size check can refuse it.
    h, p, s = good.split(".")
    huge = f"{h}.{p + 'A' * (1 << 20)}.{s}"
    assert await auth.authenticate(bearer(huge)) is TokenFailure.TOO_LARGE


async def test_size_limit_is_max_token_bytes(
    key_files: KeyFiles, clock: FakeClock, good: str
) -> None:
    exact = Authenticator(file_settings(key_files, max_token_bytes=len(good)), clock=clock)
    async with started(exact):
        assert isinstance(await exact.authenticate(bearer(good)), Identity)
    short = Authenticator(file_settings(key_files, max_token_bytes=len(good) - 1), clock=clock)
    async with started(short):
        assert await short.authenticate(bearer(good)) is TokenFailure.TOO_LARGE


async def test_envoy_replacement_char_for_non_utf8(auth: Authenticator, good: str) -> None:
    # Envoy turns non-UTF-8 header bytes into '!'.
    damaged = good[:20] + "!" + good[21:]
    assert await auth.authenticate(bearer(damaged)) is TokenFailure.MALFORMED


@pytest.mark.parametrize(
    "raw",
    [
        b"Bearer \xff\xfe\xfd",
        b"Bearer eyJ\xc3\x28.eyJ.sig",
        b"Bearer \x00\x01\x02",
    ],
)
async def test_non_utf8_bytes_decoded_leniently(auth: Authenticator, raw: bytes) -> None:
    # However a caller turned the bytes into str, the result is refused, never an exception.
    for header in (raw.decode("utf-8", "surrogateescape"), raw.decode("latin-1")):
        assert await auth.authenticate(header) is TokenFailure.MALFORMED
        assert auth.authenticate_cached(header) is None


async def test_non_ascii_token(auth: Authenticator) -> None:
    assert await auth.authenticate("Bearer ééé.ééé.ééé") is TokenFailure.MALFORMED


@pytest.mark.parametrize(
    "token",
    [
        "!!!.???.***",
        "a.b",
        "a.b.c.d",
        ".b.c",
        "a..c",
        "aaaa.bbbb.cccc",  # right charset, not base64 of JSON
        "a.bbbb.cccc",  # a 1-character segment is never valid base64
        b64json([1, 2]) + "." + b64json({"iss": "x"}) + ".c2ln",  # header not an object
        b64json({"alg": "RS256"}) + "." + b64json("text") + ".c2ln",  # payload not an object
    ],
)
async def test_garbage_tokens(auth: Authenticator, token: str) -> None:
    assert await auth.authenticate(bearer(token)) is TokenFailure.MALFORMED


async def test_truncated_tokens(auth: Authenticator, good: str) -> None:
    # Cut anywhere: always a refusal with a reason, never an exception or an identity.
    allowed = {TokenFailure.MALFORMED, TokenFailure.BAD_SIGNATURE}
    for cut in range(1, len(good), 7):
        result = await auth.authenticate(bearer(good[:cut]))
        assert result in allowed, (cut, result)


async def test_deeply_nested_json_header(auth: Authenticator) -> None:
    # Depth 2,000 (past the JSON decoder's recursion limit) still fits in 8 KB.
    nested = b64url(b"[" * 2000 + b"]" * 2000)
    token = f"{nested}.{b64json(claims())}.c2ln"
    assert len(token) < 8192
    assert await auth.authenticate(bearer(token)) is TokenFailure.MALFORMED
