"""Bearer JWT verification: an Authorization header value -> Identity or TokenFailure.

Two entry points, neither of which raises for any input:
- `authenticate_cached()`: the synchronous hot path, a verified-claims cache lookup (~1 us);
  None means "not cached, call authenticate()".
- `authenticate()`: the full path: header rules, then the cache, then verification with PyJWT
  (with one rate-limited JWKS refetch when a URL issuer's token names an unknown `kid`).

Checks run cheapest first, and nothing is decoded before the size and charset checks:
  header shape -> size -> charset -> unverified header/payload JSON -> issuer (from `iss`) ->
  alg allow-list -> key by kid -> signature, required claims, iss, aud (PyJWT) ->
  exp / nbf / iat against our clock -> sub.
`jku`, `x5u`, `jwk` and `x5c` headers are never read: keys only come from configuration.
The token itself is never logged, echoed or put in an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt
from jwt.types import Options

from authz.config.settings import AuthSettings, IssuerSettings
from authz.errors import ConfigError, KeySourceError
from authz.jwa import ASYMMETRIC_ALGORITHMS
from authz.tokens.identity import Identity, TokenFailure
from authz.tokens.keys import (
    AMBIGUOUS,
    UNKNOWN_KID,
    WRONG_ALGORITHM,
    FileKeySource,
    KeySource,
    StaticKeySource,
    UrlKeySource,
    VerificationKey,
)

logger = logging.getLogger(__name__)
# Issuers reach the verifier already validated by the config loader; these checks catch the
# settings a caller builds by hand (the file is then unknown).
_SETTINGS = "<auth settings>"

_SCHEME = "bearer "
_SCHEME_LEN = len(_SCHEME)
# JWS compact serialization: three base64url segments. The signature may be empty here only so
# that an `alg: none` token is refused as unsupported_algorithm rather than malformed.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# C0/C1 control characters: a `sub` holding CR/LF would reach upstream headers (Envoy answers
# 503 for such header values) and log lines.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# PyJWT checks time claims against datetime.now(); we check exp/nbf/iat ourselves against the
# injectable clock, so the cache and the full path agree on the same "now".
_DECODE_OPTIONS: Options = {
    "require": ["exp", "sub", "iss", "aud"],
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    # sub is checked below (non-empty, no control characters); jti is not used.
    "verify_sub": False,
    "verify_jti": False,
    # Keys under 2048 bits are refused at load; never fall back to a per-request warning.
    "enforce_minimum_key_length": True,
}
_ALL_ASYMMETRIC = frozenset(ASYMMETRIC_ALGORITHMS)
# Distinct retained-claims mappings shared between cached identities (one per plan value, in
# practice); past this many, identities keep their own copy.
_SHARED_CLAIM_SETS_MAX = 1024


def _token_digest(token: str) -> bytes:
    # Cache key: 16 bytes of SHA-256 over the whole ~1 KB token (collision-free in practice and
    # small in memory). SHA-256 rather than BLAKE2b: with SHA extensions it measured 1.4 us vs
    # 2.1 us per 1 KB token here. surrogatepass: never raises, whatever the str holds.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()[:16]


def identity_key(issuer: str, subject: str) -> str:
    """The bucket identity: 128 bits of SHA-256 over issuer NUL subject, as hex."""
    data = f"{issuer}\0{subject}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]


def _json_segment(segment: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError included
        return None
    return doc if isinstance(doc, dict) else None


def _as_time(value: object) -> float | None:
    """A NumericDate claim as float, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return f if math.isfinite(f) else None


def _audience_failure(payload: Mapping[str, Any]) -> TokenFailure:
    aud = payload.get("aud")
    well_formed = isinstance(aud, str) or (
        isinstance(aud, list) and all(isinstance(a, str) for a in aud)
    )
    return TokenFailure.WRONG_AUDIENCE if well_formed else TokenFailure.MISSING_CLAIM


def _failure_for(exc: jwt.PyJWTError, payload: Mapping[str, Any]) -> TokenFailure:
    """Every PyJWT exception as a reason (order matters: subclasses first)."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return TokenFailure.BAD_SIGNATURE
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenFailure.EXPIRED
    if isinstance(exc, jwt.ImmatureSignatureError):
        return TokenFailure.NOT_YET_VALID
    if isinstance(exc, jwt.InvalidAudienceError) or (
        isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim == "aud"
    ):
        # Verification got past the signature, so the payload we parsed is the signed one.
        return _audience_failure(payload)
    if isinstance(exc, jwt.MissingRequiredClaimError | jwt.InvalidIssuedAtError):
        return TokenFailure.MISSING_CLAIM
    if isinstance(exc, jwt.InvalidIssuerError):
        return TokenFailure.UNKNOWN_ISSUER
    if isinstance(exc, jwt.InvalidAlgorithmError | jwt.InvalidKeyError):
        return TokenFailure.UNSUPPORTED_ALGORITHM
    return TokenFailure.MALFORMED  # DecodeError (bad signature encoding, crit, b64...) etc.


def _log_unexpected(exc: BaseException) -> None:
    # The exception's message may quote parts of the token: log its type and stack only.
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(
        "token verification failed unexpectedly (%s); refused as %s\n%s",
        type(exc).__name__,
        TokenFailure.MALFORMED.value,
        stack,
    )


@dataclass(frozen=True, slots=True)
class _Issuer:
    name: str
    source: KeySource
    # The configured allow-list, always narrowed to asymmetric algorithms: we never hold a
    # symmetric key, so `none` and HS* can never verify anything.
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Refetch:
    """Signal from `_verify`: unknown kid at a URL issuer; refetch and try once more."""

    source: KeySource
    kid: str


@dataclass(frozen=True, slots=True)
class KeySourceStats:
    issuer: str
    origin: str
    ready: bool
    key_count: int
    refreshes_ok: int
    refreshes_failed: int
    kid_refetches: int
    last_error: str | None


class Authenticator:
    """Verifies bearer JWTs for the configured issuers (plus static ones, e.g. the dev signer).

    Lifecycle: construct, `await start()` (loads keys), use, `await close()`.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        static_issuers: Mapping[str, Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._audience = settings.audience
        self._leeway = settings.leeway
        self._max_token = settings.max_token_bytes
        self._max_header = settings.max_token_bytes + _SCHEME_LEN
        self._cache_limit = settings.token_cache_size
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()
        # Which verified claims an Identity keeps (None: all). See `retained_claims`.
        self._retained: frozenset[str] | None = None
        self._claim_sets: dict[tuple[tuple[str, Any], ...], Mapping[str, Any]] = {}
        # Telemetry reads these. hits: answered from the cache; misses: tokens that needed a
        # full verification (whatever its outcome).
        self.cache_hits = 0
        self.cache_misses = 0
        self._issuers: dict[str, _Issuer] = {}
        for cfg in settings.issuers:
            self._add(cfg.issuer, self._source_for(cfg, monotonic), cfg.algorithms)
        for name, jwks in (static_issuers or {}).items():
            self._add(name, StaticKeySource(name, jwks), ASYMMETRIC_ALGORITHMS)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    def _source_for(self, cfg: IssuerSettings, monotonic: Callable[[], float]) -> KeySource:
        given = [v for v in (cfg.jwks_url, cfg.jwks_file, cfg.pem_file) if v]
        if len(given) != 1:
            raise ConfigError(_SETTINGS, "auth.issuers", f"issuer {cfg.issuer!r}: set exactly "
                              "one of jwks_url, jwks_file, pem_file")
        if cfg.jwks_url:
            s = self._settings
            return UrlKeySource(
                cfg.issuer,
                cfg.jwks_url,
                timeout=s.jwks_timeout,
                refresh_interval=s.jwks_refresh_interval,
                refetch_min_interval=s.jwks_refresh_min_interval,
                monotonic=monotonic,
                on_keys_removed=self._forget_issuer,
            )
        if cfg.jwks_file:
            return FileKeySource(cfg.issuer, cfg.jwks_file, pem=False)
        assert cfg.pem_file is not None
        return FileKeySource(cfg.issuer, cfg.pem_file, pem=True)

    def _add(self, name: str, source: KeySource, algorithms: tuple[str, ...]) -> None:
        if name in self._issuers:
            raise ConfigError(_SETTINGS, "auth.issuers", f"issuer {name!r} is configured twice")
        allowed = frozenset(algorithms) & _ALL_ASYMMETRIC
        if not allowed:
            raise ConfigError(_SETTINGS, "auth.issuers", f"issuer {name!r}: no asymmetric "
                              "algorithm allowed")
        self._issuers[name] = _Issuer(name, source, allowed)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every issuer's keys.

        Raises KeySourceError (naming the issuer and its file or URL) when a file cannot be
        used, or a URL cannot be fetched under `on_jwks_unavailable: fail`. Under "retry", an
        unreachable URL is retried in the background and `ready` stays False until it loads.
        """
        if self._started:
            raise RuntimeError("Authenticator.start() called twice")
        self._started = True
        sources = [i.source for i in self._issuers.values()]
        results = await asyncio.gather(*(s.load() for s in sources), return_exceptions=True)
        retry = self._settings.on_jwks_unavailable == "retry"
        for source, result in zip(sources, results, strict=True):
            if result is None:
                continue
            if not isinstance(result, Exception):
                raise result  # CancelledError and the like
            if isinstance(source, UrlKeySource) and retry:
                logger.warning("%s; retrying in the background, not ready until keys load", result)
                continue
            if isinstance(source, UrlKeySource):
                raise KeySourceError(f"{result} (auth.on_jwks_unavailable: fail)") from None
            raise result
        for source in sources:
            if source.refetchable:
                self._tasks.append(
                    asyncio.create_task(
                        source.run_background(), name=f"jwks-refresh {source.issuer}"
                    )
                )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @property
    def ready(self) -> bool:
        """True once started and every issuer has keys."""
        return self._started and all(i.source.keys is not None for i in self._issuers.values())

    # -- what an identity keeps ---------------------------------------------------------------

    @property
    def retained_claims(self) -> frozenset[str] | None:
        """The verified claims each Identity keeps in `claims`; None keeps all of them.

        The rest of a token's claims (jti, email, scope, ...) is verified and dropped: a cached
        identity then costs a few hundred bytes instead of ~2 KB, and identities whose kept
        claims are equal (every caller of one plan) share one mapping. The server sets it to
        what the quota reads (its `plan_claim`) at start and on every quota reload; whatever
        else comes to read claims adds its names here. Setting a different set empties the
        token cache: its identities were built under the old one."""
        return self._retained

    @retained_claims.setter
    def retained_claims(self, names: frozenset[str] | None) -> None:
        names = frozenset(names) if names is not None else None
        if names == self._retained:
            return
        self._retained = names
        self._claim_sets.clear()
        if self._cache:
            logger.info("token cache emptied: the retained claims changed (%d entries)",
                        len(self._cache))
            self._cache.clear()

    def _kept_claims(self, claims: dict[str, Any]) -> Mapping[str, Any]:
        names = self._retained
        if names is None:
            # Read-only: one cached Identity is shared by every request carrying the token.
            return MappingProxyType(claims)
        kept = {k: claims[k] for k in names if k in claims}
        try:
            key = tuple(sorted(kept.items()))  # names are distinct: values never compared
            shared = self._claim_sets.get(key)
        except TypeError:  # an unhashable value (a list, an object): not shared
            return MappingProxyType(kept)
        if shared is None:
            shared = MappingProxyType(kept)
            if len(self._claim_sets) < _SHARED_CLAIM_SETS_MAX:
                self._claim_sets[key] = shared
        return shared

    # -- introspection (telemetry, health) -----------------------------------------------------

    @property
    def issuers(self) -> tuple[str, ...]:
        return tuple(self._issuers)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def key_stats(self) -> list[KeySourceStats]:
        stats = []
        for issuer in self._issuers.values():
            src = issuer.source
            keys = src.keys
            url = src if isinstance(src, UrlKeySource) else None
            stats.append(
                KeySourceStats(
                    issuer=issuer.name,
                    origin=src.origin,
                    ready=keys is not None,
                    key_count=len(keys.keys) if keys is not None else 0,
                    refreshes_ok=url.refreshes_ok if url else 0,
                    refreshes_failed=url.refreshes_failed if url else 0,
                    kid_refetches=url.kid_refetches if url else 0,
                    last_error=url.last_error if url else None,
                )
            )
        return stats

    def jwks_refresh_counts(self) -> dict[tuple[str, str], int]:
        """(issuer, "ok" | "failed") -> JWKS fetches so far, URL issuers only.

        Plain reads of ints: safe to call from a metrics exporter thread.
        """
        counts: dict[tuple[str, str], int] = {}
        for issuer in self._issuers.values():
            src = issuer.source
            if isinstance(src, UrlKeySource):
                counts[(issuer.name, "ok")] = src.refreshes_ok
                counts[(issuer.name, "failed")] = src.refreshes_failed
        return counts

    # -- the hot path ----------------------------------------------------------------------------

    def authenticate_cached(self, authorization: str | None) -> Identity | None:
        """The identity of an already verified, unexpired token; else None (never raises)."""
        if not authorization or len(authorization) > self._max_header:
            return None
        # Exact-case "Bearer " first: it is what clients send, and it saves a lower().
        if not (
            authorization.startswith("Bearer ") or authorization[:_SCHEME_LEN].lower() == _SCHEME
        ):
            return None
        return self._cached(_token_digest(authorization[_SCHEME_LEN:]))

    def _cached(self, digest: bytes) -> Identity | None:
        """The cache's identity for a token digest, if it has not expired (counted as a hit)."""
        identity = self._cache.get(digest)
        if identity is None:
            return None
        # No leeway here: an entry lives no longer than the token's exp.
        if identity.expires_at <= self._clock():
            self._cache.pop(digest, None)
            return None
        self.cache_hits += 1
        return identity

    # -- the full path -----------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Identity | TokenFailure:
        """Verify the header's bearer token. Never raises (a bug is refused as malformed)."""
        try:
            token = self._extract(authorization)
            if isinstance(token, TokenFailure):
                return token
            digest = _token_digest(token)
            identity = self._cached(digest)
            if identity is not None:
                return identity
            self.cache_misses += 1
            result = self._verify(token, refetch_allowed=True)
            if isinstance(result, _Refetch):
                await result.source.refresh_for_unknown_kid(result.kid)
                result = self._verify(token, refetch_allowed=False)
            if isinstance(result, _Refetch):  # not reachable with refetch_allowed=False
                return TokenFailure.UNKNOWN_KEY
            if isinstance(result, Identity):
                self._remember(digest, result)
            return result
        except Exception as exc:
            _log_unexpected(exc)
            return TokenFailure.MALFORMED

    def _extract(self, authorization: str | None) -> str | TokenFailure:
        if not authorization:
            return TokenFailure.MISSING
        # Size first: a megabyte header costs nothing more than this comparison.
        if len(authorization) > self._max_header:
            return TokenFailure.TOO_LARGE
        if not authorization.strip():
            return TokenFailure.MISSING
        # Envoy joins repeated headers with ',' (never valid in a JWT): two Authorization
        # headers are refused rather than one of them picked.
        if "," in authorization:
            return TokenFailure.MALFORMED
        # Exactly "Bearer <token>": scheme case-insensitive (RFC 9110 11.1), one space.
        if authorization[:_SCHEME_LEN].lower() != _SCHEME:
            return TokenFailure.MALFORMED
        token = authorization[_SCHEME_LEN:]
        if len(token) > self._max_token:
            return TokenFailure.TOO_LARGE
        return token

    def _verify(self, token: str, *, refetch_allowed: bool) -> Identity | TokenFailure | _Refetch:
        # Charset before any decoding; also refuses non-ASCII and Envoy's '!' for non-UTF-8.
        if _COMPACT_JWS.fullmatch(token) is None:
            return TokenFailure.MALFORMED
        header_b64, payload_b64, _ = token.split(".")
        header = _json_segment(header_b64)
        payload = _json_segment(payload_b64)
        if header is None or payload is None:
            return TokenFailure.MALFORMED
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            return TokenFailure.MALFORMED

        # Unverified `iss` only picks which keys to try; PyJWT then checks the signed iss.
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            return TokenFailure.UNKNOWN_ISSUER
        if alg not in issuer.algorithms:
            return TokenFailure.UNSUPPORTED_ALGORITHM
        keys = issuer.source.keys
        if keys is None:
            return TokenFailure.KEYS_UNAVAILABLE
        found = keys.select(kid, alg)
        if found is UNKNOWN_KID:
            if refetch_allowed and issuer.source.refetchable and kid is not None:
                return _Refetch(issuer.source, kid)
            return TokenFailure.UNKNOWN_KEY
        if found is AMBIGUOUS:
            return TokenFailure.UNKNOWN_KEY
        if found is WRONG_ALGORITHM or not isinstance(found, VerificationKey):
            return TokenFailure.UNSUPPORTED_ALGORITHM

        try:
            claims = jwt.decode(
                token,
                key=found.key,
                algorithms=[alg],  # the one algorithm the key and the allow-list agreed on
                audience=self._audience,
                issuer=issuer.name,
                leeway=self._leeway,
                options=_DECODE_OPTIONS,
            )
        except jwt.PyJWTError as exc:
            return _failure_for(exc, payload)
        return self._check_claims(issuer.name, claims)

    def _check_claims(self, issuer: str, claims: dict[str, Any]) -> Identity | TokenFailure:
        now = self._clock()
        exp = _as_time(claims.get("exp"))
        if exp is None:
            return TokenFailure.MISSING_CLAIM
        if exp <= now - self._leeway:
            return TokenFailure.EXPIRED
        for name in ("nbf", "iat"):
            if name in claims:
                value = _as_time(claims[name])
                if value is None:
                    return TokenFailure.MISSING_CLAIM
                if value > now + self._leeway:
                    return TokenFailure.NOT_YET_VALID
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or _CONTROL_CHARS.search(sub):
            return TokenFailure.MISSING_CLAIM
        return Identity(
            issuer=issuer,
            subject=sub,
            key=identity_key(issuer, sub),
            expires_at=exp,
            claims=self._kept_claims(claims),
        )

    # -- the verified-claims cache ---------------------------------------------------------

    def _remember(self, digest: bytes, identity: Identity) -> None:
        # Tokens accepted only thanks to the leeway (exp already past) are not cached.
        if self._cache_limit <= 0 or identity.expires_at <= self._clock():
            return
        cache = self._cache
        cache[digest] = identity
        cache.move_to_end(digest)
        while len(cache) > self._cache_limit:
            cache.popitem(last=False)  # the oldest insertion

    def _forget_issuer(self, issuer: str) -> None:
        """A refresh removed some of the issuer's keys: drop what they verified."""
        stale = [k for k, ident in self._cache.items() if ident.issuer == issuer]
        for k in stale:
            del self._cache[k]
        if stale:
            logger.info("issuer %r: keys removed; dropped %d cached token(s)", issuer, len(stale))
