"""Verification keys per issuer, and where they come from.

Sources: a JWKS document given in memory (the dev signer), a local JWKS file, a local PEM file
(one kid-less public key or certificate), or a JWKS URL. A URL source is fetched at start,
refreshed in the background, refetched (rate-limited) when a token names an unknown `kid`, and
keeps its last good key set whenever a fetch fails.

Only asymmetric public keys are ever loaded: symmetric (`oct`) JWKs and private keys are
skipped, so an HS* token can never be checked against a public key used as an HMAC secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from authz.errors import KeySourceError
from authz.jwa import ASYMMETRIC_ALGORITHMS
from authz.redact import redact_url as _redact_url

logger = logging.getLogger(__name__)
# A no-op tracer until authz.telemetry installs a TracerProvider.
_tracer = trace.get_tracer(__name__)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# RFC 7518 3.4: each ES* algorithm is bound to one curve.
_EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# NIST SP 800-131A: RSA below 2048 bits is disallowed for signatures (PyJWT warns on every
# verify below this; we refuse such keys once, at load time).
_MIN_RSA_BITS = 2048
# Real JWKS documents are 1-10 KB; 1 MiB bounds what a misbehaving endpoint can make us read.
_MAX_JWKS_BYTES = 1 << 20
# Background retries while an issuer has no keys yet: first after 1 s (an identity provider
# restarting or DNS settling takes seconds), doubling, capped at 30 s and at the refresh period.
_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    key: PublicKey
    # Token `alg` values this key may verify: its key type's algorithms, narrowed to the
    # JWK's own `alg` when it declares one.
    algorithms: frozenset[str]
    # DER SubjectPublicKeyInfo: tells whether a refresh removed a key.
    fingerprint: bytes


class KeyMiss:
    """Why `KeySet.select` found no key (the three singletons below)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"KeyMiss({self.name})"


UNKNOWN_KID = KeyMiss("unknown_kid")
# No kid in the token and the issuer has several keys: we do not try them one by one.
AMBIGUOUS = KeyMiss("ambiguous")
# The kid exists but its key cannot verify this alg (e.g. an RSA kid with alg ES256).
WRONG_ALGORITHM = KeyMiss("wrong_algorithm")


class KeySet:
    """An issuer's keys, looked up by `kid`."""

    __slots__ = ("_by_kid", "keys")

    def __init__(self, keys: tuple[VerificationKey, ...]) -> None:
        self.keys = keys
        by_kid: dict[str, list[VerificationKey]] = {}
        for k in keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        # Several keys may share a kid when their types differ (RFC 7517 4.5); the token's alg
        # picks among them.
        self._by_kid = {kid: tuple(ks) for kid, ks in by_kid.items()}

    def has_kid(self, kid: str) -> bool:
        return kid in self._by_kid

    def select(self, kid: str | None, alg: str) -> VerificationKey | KeyMiss:
        candidates: tuple[VerificationKey, ...]
        if kid is not None:
            found = self._by_kid.get(kid)
            if found is not None:
                candidates = found
            elif len(self.keys) == 1 and self.keys[0].kid is None:
                # A PEM issuer has one kid-less key; its tokens may still carry a kid.
                candidates = self.keys
            else:
                return UNKNOWN_KID
        elif len(self.keys) == 1:
            candidates = self.keys
        else:
            return AMBIGUOUS
        for k in candidates:
            if alg in k.algorithms:
                return k
        return WRONG_ALGORITHM

    def fingerprints(self) -> frozenset[bytes]:
        return frozenset(k.fingerprint for k in self.keys)


class _SkipKey(Exception):
    pass


def _key_algorithms(key: PublicKey) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise _SkipKey(f"RSA key of {key.key_size} bits (minimum {_MIN_RSA_BITS})")
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise _SkipKey(f"unsupported curve {key.curve.name}")
        return frozenset({alg})
    return frozenset({"EdDSA"})


def _public(key: object) -> PublicKey:
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        return key.public_key()
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return key
    raise _SkipKey(f"unsupported key type {type(key).__name__}")


def _verification_key(key: PublicKey, kid: str | None, alg: str | None) -> VerificationKey:
    algorithms = _key_algorithms(key)
    if alg is not None:
        if alg not in algorithms:
            raise _SkipKey(f"alg {alg} does not fit the key type")
        algorithms = frozenset({alg})
    fingerprint = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return VerificationKey(kid=kid, key=key, algorithms=algorithms, fingerprint=fingerprint)


def _parse_jwk(jwk: object) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise _SkipKey("not a JSON object")
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    alg = jwk.get("alg")
    use = jwk.get("use")
    key_ops = jwk.get("key_ops")
    if kid is not None and not isinstance(kid, str):
        raise _SkipKey("kid is not a string")
    if use is not None and use != "sig":
        raise _SkipKey(f"use {use!r}")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise _SkipKey("key_ops without 'verify'")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        raise _SkipKey(f"alg {alg!r} is not an asymmetric signature algorithm")
    if kty not in ("RSA", "EC", "OKP"):
        # "oct" included: symmetric keys are never used (see module docstring).
        raise _SkipKey(f"kty {kty!r} not supported")
    loaded: object
    try:
        if kty == "RSA":
            loaded = RSAAlgorithm.from_jwk(jwk)
        elif kty == "EC":
            loaded = ECAlgorithm.from_jwk(jwk)
        else:
            loaded = OKPAlgorithm.from_jwk(jwk)
    except Exception as exc:
        # PyJWT's messages quote the whole JWK (which could hold private parts): name the
        # exception type only.
        raise _SkipKey(f"invalid {kty} key ({type(exc).__name__})") from None
    return _verification_key(_public(loaded), kid, alg)


def parse_jwks(doc: object, origin: str) -> KeySet:
    """Usable signing keys of a JWKS document; unusable entries are skipped with a warning.

    Raises KeySourceError when the document is not a JWKS or holds no usable key.
    """
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise KeySourceError(f'{origin}: not a JWKS (expected an object with a "keys" list)')
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        try:
            keys.append(_parse_jwk(jwk))
        except _SkipKey as why:
            skipped.append(f"key #{i}: {why}")
    if not keys:
        detail = "; ".join(skipped) or "the key list is empty"
        raise KeySourceError(f"{origin}: no usable signing key ({detail})")
    if skipped:
        logger.warning("%s: skipped %d key(s): %s", origin, len(skipped), "; ".join(skipped))
    return KeySet(tuple(keys))


def parse_pem(data: bytes, origin: str) -> KeySet:
    """One kid-less key from a PEM public key or X.509 certificate."""
    if b"PRIVATE KEY" in data:
        raise KeySourceError(
            f"{origin}: holds a private key; give the issuer's public key or certificate"
        )
    try:
        if b"BEGIN CERTIFICATE" in data:
            loaded: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            loaded = load_pem_public_key(data)
        return KeySet((_verification_key(_public(loaded), None, None),))
    except _SkipKey as why:
        raise KeySourceError(f"{origin}: unusable key: {why}") from None
    except (ValueError, TypeError) as exc:
        raise KeySourceError(f"{origin}: not a PEM public key or certificate ({exc})") from None


def redact_url(url: str) -> str:
    """The URL without user:password, for messages and logs."""
    return _redact_url(url, drop_userinfo=True)


class KeySource:
    """Base: an issuer's current key set (None until first loaded)."""

    # True when an unknown kid is worth a refetch (only URL sources change at run time).
    refetchable = False

    def __init__(self, issuer: str, origin: str) -> None:
        self.issuer = issuer
        # "issuer '<iss>': <kind> <where>": the prefix of every message about this source.
        self.origin = origin
        self.keys: KeySet | None = None

    async def load(self) -> None:
        """Load the keys; raises KeySourceError."""

    async def refresh_for_unknown_kid(self, kid: str) -> bool:
        """Try to learn `kid`; True when a fetch was made or the kid appeared meanwhile."""
        return False

    async def run_background(self) -> None:
        """Periodic refresh; returns at once for sources that never change."""


class StaticKeySource(KeySource):
    """A JWKS given in memory (the development signer's)."""

    def __init__(self, issuer: str, jwks: Mapping[str, Any]) -> None:
        super().__init__(issuer, f"issuer {issuer!r}: static JWKS")
        self.keys = parse_jwks(jwks, self.origin)


class FileKeySource(KeySource):
    """A local JWKS file or PEM file, read once at start."""

    def __init__(self, issuer: str, path: str, *, pem: bool) -> None:
        kind = "PEM file" if pem else "JWKS file"
        super().__init__(issuer, f"issuer {issuer!r}: {kind} {path}")
        self._path = Path(path)
        self._pem = pem

    async def load(self) -> None:
        self.keys = await asyncio.to_thread(read_key_file, self._path, self.origin,
                                            pem=self._pem)


def read_key_file(path: str | Path, origin: str, *, pem: bool) -> KeySet:
    """The keys of a local JWKS or PEM file. Raises KeySourceError naming `origin`."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(_MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise KeySourceError(f"{origin}: cannot read ({exc.strerror})") from None
    if len(data) > _MAX_JWKS_BYTES:
        raise KeySourceError(f"{origin}: larger than {_MAX_JWKS_BYTES} bytes")
    if pem:
        return parse_pem(data, origin)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise KeySourceError(f"{origin}: not JSON ({exc})") from None
    return parse_jwks(doc, origin)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only, and never from https down to http (a downgrade would
    let anyone on the path substitute keys)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url).scheme
        new = urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise urllib.error.HTTPError(
                req.full_url, code, f"redirect to a {new} URL refused", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_HttpRedirectsOnly())


def _http_get(url: str, timeout: float) -> bytes:
    """Blocking GET of a JWKS (runs in a worker thread)."""
    req = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "authz-jwks"}
    )
    with _opener.open(req, timeout=timeout) as resp:
        status = getattr(resp, "status", 200)
        if status != 200:
            raise KeySourceError(f"HTTP {status}")
        body: bytes = resp.read(_MAX_JWKS_BYTES + 1)
    if len(body) > _MAX_JWKS_BYTES:
        raise KeySourceError(f"response larger than {_MAX_JWKS_BYTES} bytes")
    return body


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return f"no answer within the timeout ({type(exc).__name__})"
    if isinstance(exc, KeySourceError):
        return str(exc)
    if isinstance(exc, ValueError | RecursionError):
        return f"not JSON ({exc})"
    return f"{type(exc).__name__}: {exc}"


class UrlKeySource(KeySource):
    """A JWKS URL: fetched, cached, refreshed, refetched on unknown kids (rate-limited)."""

    refetchable = True

    def __init__(
        self,
        issuer: str,
        url: str,
        *,
        timeout: float,
        refresh_interval: float,
        refetch_min_interval: float,
        monotonic: Callable[[], float] = time.monotonic,
        on_keys_removed: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(issuer, f"issuer {issuer!r}: JWKS URL {redact_url(url)}")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise KeySourceError(f"{self.origin}: only http and https URLs are supported")
        self.url = url
        self._timeout = timeout
        self._interval = refresh_interval
        self._min_interval = refetch_min_interval
        self._monotonic = monotonic
        self._on_keys_removed = on_keys_removed
        # One fetch at a time per issuer: concurrent unknown-kid requests share it.
        self._lock = asyncio.Lock()
        # Only unknown-kid refetches count against the rate limit: a background refresh just
        # before a key rotation must not delay learning the new kid.
        self._last_kid_refetch: float | None = None
        # Telemetry reads these (plain ints: no dependency on the metrics SDK here).
        self.refreshes_ok = 0
        self.refreshes_failed = 0
        self.kid_refetches = 0
        self.last_error: str | None = None

    async def load(self) -> None:
        async with self._lock:
            await self._fetch()

    async def _fetch(self) -> None:
        """One fetch (the caller holds the lock). Keeps the last good keys on failure."""
        with _tracer.start_as_current_span(
            "jwks.fetch", attributes={"issuer": self.issuer}
        ) as span:
            try:
                # wait_for bounds our wait even when DNS or a slow-dripping server outlives
                # urllib's per-operation socket timeout; the thread then ends on its own.
                body = await asyncio.wait_for(
                    asyncio.to_thread(_http_get, self.url, self._timeout), self._timeout
                )
                keys = parse_jwks(json.loads(body), self.origin)
            except Exception as exc:
                self.refreshes_failed += 1
                self.last_error = _describe(exc).removeprefix(f"{self.origin}: ")
                span.set_status(Status(StatusCode.ERROR, self.last_error))
                raise KeySourceError(f"{self.origin}: {self.last_error}") from None
        old = self.keys
        self.keys = keys
        self.refreshes_ok += 1
        self.last_error = None
        if (
            old is not None
            and self._on_keys_removed is not None
            and old.fingerprints() - keys.fingerprints()
        ):
            self._on_keys_removed(self.issuer)

    async def refresh_for_unknown_kid(self, kid: str) -> bool:
        async with self._lock:
            if self.keys is not None and self.keys.has_kid(kid):
                return True  # fetched by a concurrent request while we waited
            now = self._monotonic()
            last = self._last_kid_refetch
            if last is not None and now - last < self._min_interval:
                return False
            self._last_kid_refetch = now
            self.kid_refetches += 1
            try:
                await self._fetch()
            except KeySourceError as exc:
                logger.warning("refetch for an unknown kid failed: %s", exc)
                return False
            return True

    def _next_delay(self, failures: int) -> float:
        if self.keys is not None:
            return self._interval
        # No keys yet: back off 1, 2, 4 ... s (exponent bounded so the float cannot overflow).
        return min(self._interval, _RETRY_MAX, _RETRY_FIRST * 2.0 ** min(failures, 32))

    async def run_background(self) -> None:
        """Refresh every `refresh_interval`; while no keys are loaded, retry with backoff.

        Never raises (except CancelledError, on close).
        """
        failures = 0
        while True:
            await asyncio.sleep(self._next_delay(failures))
            had_keys = self.keys is not None
            try:
                async with self._lock:
                    await self._fetch()
            except KeySourceError as exc:
                failures += 1
                kept = "keeping the last good keys" if self.keys else "no keys yet"
                logger.warning("%s (%s)", exc, kept)
            except Exception:
                # A bug must not end the refresh loop for the life of the process.
                failures += 1
                logger.exception("%s: unexpected error in the key refresh", self.origin)
            else:
                if not had_keys:
                    logger.info("%s: keys loaded", self.origin)
                failures = 0
