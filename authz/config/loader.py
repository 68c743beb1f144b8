"""Load and validate the service config file (YAML) into `Settings`.

Every problem raises `ConfigError` naming the file and the key; the service refuses to start
rather than run on a half-read config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from .errors import ConfigError
from .reader import Node, load_yaml
from .settings import (
    ASYMMETRIC_ALGORITHMS,
    AuthSettings,
    HeaderSettings,
    IssuerSettings,
    PathSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    TelemetrySettings,
)

# Reserved for the development signer (authz.tokens.devsigner). Refusing it in every config
# file is what guarantees the dev signer can only be switched on by `--dev` / `authz demo`.
DEV_ISSUER = "urn:authz:dev"

# Symmetric HS* algorithms are never accepted: a shared secret cannot be published in a JWKS,
# and accepting HS* is how tokens "signed" with an issuer's public key get through.
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS
# RFC 7230 token characters: what Envoy accepts in a header name (lower-case for HTTP/2).
_HEADER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.!#$%&'*+^`|~")


def load_settings(path: str | Path | None, *, env: dict[str, str] | None = None) -> Settings:
    """Read the config file (None: the embedded defaults) and apply environment overrides."""
    environ = os.environ if env is None else env
    if path is None:
        settings = Settings()
        file = "<defaults>"
    else:
        file = str(path)
        settings = parse_settings(load_yaml(path), file, base_dir=Path(path).parent)
    salt = environ.get("AUTHZ_SUBJECT_SALT")
    if salt:  # a secret: from the environment (a Kubernetes Secret), not the config file
        settings = _replace(settings, telemetry=_replace(settings.telemetry, subject_salt=salt))
    redis_url = environ.get("AUTHZ_REDIS_URL")
    if redis_url is not None:
        _check_redis_url(Node.root("AUTHZ_REDIS_URL", {}), "", redis_url)
        settings = _replace(settings, store=_replace(settings.store, redis_url=redis_url))
    del file
    return settings


def parse_settings(data: Any, file: str, *, base_dir: Path | None = None) -> Settings:
    root = Node.root(file, data)
    server = _server(root.section("server"))
    auth = _auth(root.section("auth"), base_dir)
    store = _store(root.section("store"))
    paths = _paths(root.section("paths"))
    headers = _headers(root.section("headers"))
    telemetry = _telemetry(root.section("telemetry"))
    quota_file = root.opt_str("quota_file")
    if quota_file is not None and base_dir is not None:
        quota_file = str(base_dir / quota_file)
    reload_interval = root.duration("quota_reload_interval", 10.0, allow_zero=True)
    internal = root.integer("internal_error_status", 500, minimum=500, maximum=599)
    root.done()
    return Settings(
        server=server, auth=auth, store=store, paths=paths, headers=headers,
        telemetry=telemetry, quota_file=quota_file, quota_reload_interval=reload_interval,
        internal_error_status=internal,
    )


def _server(n: Node) -> ServerSettings:
    d = ServerSettings()
    s = ServerSettings(
        host=n.text("host", d.host, allow_empty=False),
        grpc_port=n.integer("grpc_port", d.grpc_port, minimum=0, maximum=65535),
        metrics_port=n.integer("metrics_port", d.metrics_port, minimum=0, maximum=65535),
        workers=n.integer("workers", d.workers, minimum=0, maximum=256),
        drain_delay=n.duration("drain_delay", d.drain_delay, allow_zero=True),
        shutdown_grace=n.duration("shutdown_grace", d.shutdown_grace),
    )
    n.done()
    if s.metrics_port and s.metrics_port == s.grpc_port:
        raise n.error("metrics_port", "must differ from grpc_port")
    return s


def _auth(n: Node, base_dir: Path | None) -> AuthSettings:
    d = AuthSettings()
    issuers: list[IssuerSettings] = []
    seen: set[str] = set()
    for path, raw in n.items("issuers"):
        issuer = _issuer(n.child(path, raw), base_dir)
        if issuer.issuer in seen:
            raise ConfigError(n.file, f"{path}.issuer", f"issuer {issuer.issuer!r} listed twice")
        seen.add(issuer.issuer)
        issuers.append(issuer)
    s = AuthSettings(
        issuers=tuple(issuers),
        audience=_audience(n, d.audience),
        leeway=n.duration("leeway", d.leeway, allow_zero=True),
        max_token_bytes=n.integer("max_token_bytes", d.max_token_bytes, minimum=256),
        token_cache_size=n.integer("token_cache_size", d.token_cache_size, minimum=0),
        jwks_refresh_min_interval=n.duration(
            "jwks_refresh_min_interval", d.jwks_refresh_min_interval, allow_zero=True
        ),
        jwks_refresh_interval=n.duration("jwks_refresh_interval", d.jwks_refresh_interval),
        jwks_timeout=n.duration("jwks_timeout", d.jwks_timeout),
        on_jwks_unavailable=cast(
            Any, n.choice("on_jwks_unavailable", d.on_jwks_unavailable, ("fail", "retry"))
        ),
    )
    n.done()
    if s.leeway > 300:
        raise n.error("leeway", "more than 5 minutes of clock leeway keeps expired tokens alive")
    return s


def _audience(n: Node, default: str) -> str:
    value = n.text("audience", default, allow_empty=False)
    # It is quoted into WWW-Authenticate (realm="..."): keep it a plain visible-ASCII token.
    if not (value.isascii() and value.isprintable()) or any(c in value for c in '"\\ '):
        raise n.error("audience", f"expected visible ASCII without spaces or quotes, got {value!r}")
    return value


def _issuer(n: Node, base_dir: Path | None) -> IssuerSettings:
    issuer = n.text("issuer", allow_empty=False)
    if issuer == DEV_ISSUER:
        raise n.error(
            "issuer",
            f"{DEV_ISSUER!r} is reserved for the development signer, which only "
            "`authz serve --dev` / `authz demo` can enable",
        )
    jwks_url = n.opt_str("jwks_url")
    jwks_file = n.opt_str("jwks_file")
    pem_file = n.opt_str("pem_file")
    sources = [k for k, v in (("jwks_url", jwks_url), ("jwks_file", jwks_file),
                              ("pem_file", pem_file)) if v]
    if len(sources) != 1:
        raise n.error("", "needs exactly one key source: jwks_url, jwks_file or pem_file"
                      + (f" (got {', '.join(sources)})" if sources else ""))
    if jwks_url is not None:
        scheme = urlsplit(jwks_url).scheme
        if scheme not in ("https", "http"):
            raise n.error("jwks_url", f"expected an https:// URL, got {jwks_url!r}")
    if base_dir is not None:
        jwks_file = str(base_dir / jwks_file) if jwks_file else None
        pem_file = str(base_dir / pem_file) if pem_file else None
    algorithms = n.str_list("algorithms", ASYMMETRIC_ALGORITHMS)
    for alg in algorithms:
        if alg not in SUPPORTED_ALGORITHMS:
            raise n.error("algorithms", f"unsupported algorithm {alg!r}; expected some of "
                          f"{', '.join(SUPPORTED_ALGORITHMS)} ('none' and HS* are never accepted)")
    n.done()
    return IssuerSettings(issuer=issuer, jwks_url=jwks_url, jwks_file=jwks_file,
                          pem_file=pem_file, algorithms=algorithms)


def _store(n: Node) -> StoreSettings:
    d = StoreSettings()
    url = n.text("redis_url", d.redis_url)
    if url:
        _check_redis_url(n, "redis_url", url)
    s = StoreSettings(
        redis_url=url,
        key_prefix=n.text("key_prefix", d.key_prefix),
        timeout=n.duration("timeout", d.timeout),
        on_error=cast(Any, n.choice("on_error", d.on_error, ("deny", "allow"))),
        max_batch=n.integer("max_batch", d.max_batch, minimum=1, maximum=100_000),
    )
    n.done()
    if s.timeout > 10:
        raise n.error("timeout", "at most 10s: the store answer must come well before the "
                      "mesh's check timeout (0.5s recommended)")
    if any(c in s.key_prefix for c in "{}"):
        raise n.error("key_prefix", "must not contain { or } (they delimit the cluster hash tag)")
    return s


def _check_redis_url(n: Node, key: str, url: str) -> None:
    # The same parser the Redis store uses, so a URL that passes here also connects there.
    from ..buckets.base import StoreError
    from ..buckets.redis_url import parse_redis_url

    try:
        parse_redis_url(url)
    except StoreError as e:
        raise n.error(key, f"invalid Redis URL: {e}") from None


def _paths(n: Node) -> PathSettings:
    d = PathSettings()
    s = PathSettings(
        protected_prefixes=n.str_list("protected_prefixes", d.protected_prefixes),
        public_paths=n.str_list("public_paths", d.public_paths),
        other=cast(Any, n.choice("other", d.other, ("deny", "allow"))),
    )
    n.done()
    for key, values in (("protected_prefixes", s.protected_prefixes),
                        ("public_paths", s.public_paths)):
        for v in values:
            if not v.startswith("/") or "?" in v or "//" in v:
                raise n.error(key, f"expected absolute paths without query, got {v!r}")
    for prefix in s.protected_prefixes:
        if not prefix.endswith("/"):
            raise n.error("protected_prefixes", f"{prefix!r} must end with '/'")
        for public in s.public_paths:
            if public.startswith(prefix):
                raise n.error("public_paths", f"{public!r} lies under protected prefix {prefix!r}")
    return s


def _headers(n: Node) -> HeaderSettings:
    d = HeaderSettings()
    s = HeaderSettings(
        subject=_header_name(n, "subject", d.subject),
        issuer=_header_name(n, "issuer", d.issuer),
        plan=_header_name(n, "plan", d.plan),
        degraded=_header_name(n, "degraded", d.degraded),
    )
    n.done()
    names = [s.subject, s.issuer, s.plan, s.degraded]
    if len(set(names)) != len(names):
        raise n.error("", "header names must be distinct")
    return s


def _header_name(n: Node, key: str, default: str) -> str:
    value = n.text(key, default, allow_empty=False).lower()
    if not set(value) <= _HEADER_NAME_CHARS:
        raise n.error(key, f"{value!r} is not a valid HTTP header name")
    if value.startswith((":", "x-envoy-")) or value in ("host", "authorization"):
        raise n.error(key, f"{value!r} is reserved (Envoy refuses to let ext_authz set it)")
    return value


def _telemetry(n: Node) -> TelemetrySettings:
    d = TelemetrySettings()
    s = TelemetrySettings(
        subject_attribute=cast(
            Any, n.choice("subject_attribute", d.subject_attribute, ("none", "hashed"))
        ),
        subject_salt=n.text("subject_salt", d.subject_salt),
        deny_log_level=n.choice("deny_log_level", d.deny_log_level,
                                ("DEBUG", "INFO", "WARNING", "ERROR")),
        deny_log_rate=n.number("deny_log_rate", d.deny_log_rate, positive=False),
        log_level=n.choice("log_level", d.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=cast(Any, n.choice("log_format", d.log_format, ("json", "text"))),
    )
    n.done()
    return s


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
