"""Load and validate the service config file (YAML) into `Settings`.

Every problem is a `ConfigError` naming the file and the key, and all of a file's problems are
reported together (`ConfigErrors`); the service refuses to start rather than run on a half-read
config. The bounds of every number are here, each with where it comes from (README
"Configuration reference" lists them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from ..errors import ConfigError, InvalidValue
from ..jwa import ASYMMETRIC_ALGORITHMS
from .redis_url import parse_endpoint, parse_redis_url
from .settings import (
    DEV_ISSUER,
    AuthSettings,
    HeaderSettings,
    IssuerSettings,
    PathSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    TelemetrySettings,
)
from .yaml_reader import Node, load_yaml

# Symmetric HS* algorithms are never accepted: a shared secret cannot be published in a JWKS,
# and accepting HS* is how tokens "signed" with an issuer's public key get through.
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS
# RFC 7230 token characters: what Envoy accepts in a header name (lower-case for HTTP/2).
_HEADER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.!#$%&'*+^`|~")


def load_settings(path: str | Path | None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Read the config file (None: the embedded defaults) and apply environment overrides."""
    if path is None:
        settings = Settings()
    else:
        settings = parse_settings(load_yaml(path), str(path), base_dir=Path(path).parent)
    return apply_environment(settings, os.environ if env is None else env)


def apply_environment(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """The `AUTHZ_*` overrides of a parsed config (README "Configuration reference")."""
    salt = environ.get("AUTHZ_SUBJECT_SALT")
    if salt:  # a secret: from the environment (a Kubernetes Secret), not the config file
        settings = _replace(settings, telemetry=_replace(settings.telemetry, subject_salt=salt))
    redis_url = environ.get("AUTHZ_REDIS_URL")
    if redis_url is not None:
        env_node = Node.root("AUTHZ_REDIS_URL", {})
        _check_redis_url(env_node, "", redis_url)
        env_node.problems.raise_if_any()
        settings = _replace(settings, store=_replace(settings.store, redis_url=redis_url))
        for key, problem in redis_topology_problems(settings.store):
            raise ConfigError("AUTHZ_REDIS_URL", f"store.{key}", problem)
    sentinel_password = environ.get("AUTHZ_REDIS_SENTINEL_PASSWORD")
    if sentinel_password:  # a secret, like the URL's password: from a Kubernetes Secret
        settings = _replace(settings, store=_replace(settings.store,
                                                     sentinel_password=sentinel_password))
    issuer, jwks_url = environ.get("AUTHZ_ISSUER"), environ.get("AUTHZ_JWKS_URL")
    if issuer is not None or jwks_url is not None:
        settings = _replace(settings, auth=_override_issuer(settings.auth, issuer, jwks_url))
    return settings


def _override_issuer(auth: AuthSettings, issuer: str | None,
                     jwks_url: str | None) -> AuthSettings:
    """AUTHZ_ISSUER / AUTHZ_JWKS_URL replace the issuer and JWKS URL of the config's one
    issuer, so a deployment can set them in the same place as the mesh policies that repeat
    them (deploy/README.md, "Values to set"). With several issuers it would be a guess which
    one is meant: refused."""
    name = "AUTHZ_ISSUER" if issuer is not None else "AUTHZ_JWKS_URL"
    if len(auth.issuers) != 1:
        raise ConfigError(name, "auth.issuers", "overrides the config's only issuer, but the "
                          f"config lists {len(auth.issuers)}: list exactly one (the override "
                          "replaces its issuer and jwks_url) or unset the variable")
    [current] = auth.issuers
    if issuer is not None:
        if not issuer.strip() or issuer != issuer.strip():
            raise ConfigError("AUTHZ_ISSUER", "auth.issuers[0].issuer",
                              f"expected the issuer (the tokens' iss), got {issuer!r}")
        if issuer == DEV_ISSUER:
            raise ConfigError("AUTHZ_ISSUER", "auth.issuers[0].issuer",
                              f"{DEV_ISSUER!r} is reserved for the development signer")
        current = _replace(current, issuer=issuer)
    if jwks_url is not None:
        if urlsplit(jwks_url).scheme not in ("https", "http") or not urlsplit(jwks_url).netloc:
            raise ConfigError("AUTHZ_JWKS_URL", "auth.issuers[0].jwks_url",
                              f"expected an https:// URL, got {jwks_url!r}")
        # The URL becomes the key source: one source per issuer, as in the file.
        current = _replace(current, jwks_url=jwks_url, jwks_file=None, pem_file=None)
    updated: AuthSettings = _replace(auth, issuers=(current,))
    return updated


def parse_settings(data: Any, file: str, *, base_dir: Path | None = None) -> Settings:
    """Every key checked; all problems raised together (`ConfigErrors`), never a partial
    Settings."""
    root = Node.root(file, data)
    settings = read_settings(root, base_dir)
    root.problems.raise_if_any()
    return settings


def read_settings(root: Node, base_dir: Path | None) -> Settings:
    """The settings from the file's top-level node, problems left in `root.problems`. Every key
    is read through a typed `Node` getter, so the same function, run through
    `authz.config.schema.SchemaRecorder`, is also the source of the JSON Schema."""
    problems = root.problems
    d = Settings()
    server, auth, store = d.server, d.auth, d.store
    paths, headers, telemetry = d.paths, d.headers, d.telemetry
    with problems.part():
        server = _server(root.section("server"))
    with problems.part():
        auth = _auth(root.section("auth"), base_dir)
    with problems.part():
        store = _store(root.section("store"))
    with problems.part():
        paths = _paths(root.section("paths"))
    with problems.part():
        headers = _headers(root.section("headers"))
    with problems.part():
        telemetry = _telemetry(root.section("telemetry"))
    quota_file = root.opt_str("quota_file")
    if quota_file is not None and base_dir is not None:
        quota_file = str(base_dir / quota_file)
    reload_interval = root.duration(
        "quota_reload_interval", d.quota_reload_interval, allow_zero=True,
        minimum=QUOTA_RELOAD_INTERVAL_MIN, maximum=QUOTA_RELOAD_INTERVAL_MAX)
    internal = root.integer("internal_error_status", d.internal_error_status, minimum=500,
                            maximum=599)
    root.done()
    return Settings(
        server=server, auth=auth, store=store, paths=paths, headers=headers,
        telemetry=telemetry, quota_file=quota_file, quota_reload_interval=reload_interval,
        internal_error_status=internal,
    )


# Bounds of every duration, in seconds (README "Configuration reference" lists them). Each
# keeps the value inside what asyncio's timers and the deployment around us can use.
# After SIGTERM, Kubernetes waits terminationGracePeriodSeconds (30 s by default) before it
# kills: delays beyond a few minutes only postpone that kill.
DRAIN_DELAY_MAX = 300.0
SHUTDOWN_GRACE_MIN = 0.001
SHUTDOWN_GRACE_MAX = 600.0
# Every second of leeway is a second an expired token still works.
LEEWAY_MAX = 300.0
# A JWKS fetch longer than a minute is a dead identity provider, not a slow one.
JWKS_TIMEOUT_MIN = 0.001
JWKS_TIMEOUT_MAX = 60.0
# Refreshing more often than every second would be a request flood; less often than daily
# leaves rotated-out keys trusted too long.
JWKS_REFRESH_INTERVAL_MIN = 1.0
JWKS_REFRESH_INTERVAL_MAX = 86400.0
JWKS_REFRESH_MIN_INTERVAL_MAX = 86400.0
# Below 1 ms a Redis call cannot even be written; above 10 s the mesh's own check timeout
# (0.5 s recommended) has long answered.
STORE_TIMEOUT_MIN = 0.001
STORE_TIMEOUT_MAX = 10.0
# Polling faster than once a second gains nothing (Kubernetes updates a mounted ConfigMap
# within about a minute); 0 turns polling off (SIGHUP only).
QUOTA_RELOAD_INTERVAL_MIN = 1.0
QUOTA_RELOAD_INTERVAL_MAX = 86400.0
# Envoy's default limit on a request's headers is 60 KiB: no longer token can arrive.
MAX_TOKEN_BYTES = 65536
# ~2 KB per entry (loadtests --rss-only): a million entries is ~2 GB, more than any pod has.
MAX_TOKEN_CACHE = 1_000_000
# Deny log lines per second: beyond this the log is a flood that the sampling exists to stop.
MAX_DENY_LOG_RATE = 10_000.0


def _server(n: Node) -> ServerSettings:
    d = ServerSettings()
    s = ServerSettings(
        host=n.text("host", d.host, allow_empty=False),
        grpc_port=n.integer("grpc_port", d.grpc_port, minimum=0, maximum=65535),
        metrics_port=n.integer("metrics_port", d.metrics_port, minimum=0, maximum=65535),
        http_port=n.integer("http_port", d.http_port, minimum=0, maximum=65535),
        http_path_prefix=_path_prefix(n, "http_path_prefix", d.http_path_prefix),
        workers=n.integer("workers", d.workers, minimum=0, maximum=256),
        drain_delay=n.duration("drain_delay", d.drain_delay, allow_zero=True,
                               maximum=DRAIN_DELAY_MAX),
        shutdown_grace=n.duration("shutdown_grace", d.shutdown_grace,
                                  minimum=SHUTDOWN_GRACE_MIN, maximum=SHUTDOWN_GRACE_MAX),
    )
    n.done()
    if not n.failed:
        for problem in server_port_problems(s):
            n.report(*problem)
    return s


def server_port_problems(s: ServerSettings) -> list[tuple[str, str]]:
    """(key, problem) for ports that would collide: checked for the file's values and again
    after the command line's overrides (`--grpc-port`, `--http-port`, `--metrics-port`)."""
    out: list[tuple[str, str]] = []
    if s.metrics_port and s.metrics_port == s.grpc_port:
        out.append(("metrics_port", "must differ from grpc_port"))
    if s.http_port and s.http_port == s.grpc_port:
        out.append(("http_port", "must differ from grpc_port"))
    if s.http_port and s.http_port == s.metrics_port:
        out.append(("http_port", "must differ from metrics_port"))
    return out


# Istio requires pathPrefix to start with '/' and parse as a URL path; the prefix is compared
# byte for byte with the check request's path, so nothing a proxy could re-encode is allowed.
# 256 bytes: a prefix is a short route ("/check"); the path after it keeps its own 4 KiB bound.
MAX_PATH_PREFIX = 256
_PATH_PREFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                         "-._~/!$&'()*+,;=:@")


def _path_prefix(n: Node, key: str, default: str) -> str:
    value = n.text(key, default)
    if not value:
        return value
    if not value.startswith("/"):
        n.report(key, f"expected a path starting with '/' (as Istio's pathPrefix), got {value!r}")
        return default
    if len(value) > MAX_PATH_PREFIX or not set(value) <= _PATH_PREFIX_CHARS:
        n.report(key, f"expected at most {MAX_PATH_PREFIX} characters of a URL path (no "
                 f"query, fragment, percent-encoding or spaces), got {value[:80]!r}")
        return default
    return value


def _auth(n: Node, base_dir: Path | None) -> AuthSettings:
    d = AuthSettings()
    issuers: list[IssuerSettings] = []
    seen: set[str] = set()
    for path, raw in n.items("issuers"):
        with n.problems.part():
            issuer = _issuer(n.child(path, raw), base_dir)
            if issuer.issuer in seen:
                raise ConfigError(n.file, f"{path}.issuer",
                                  f"issuer {issuer.issuer!r} listed twice")
            seen.add(issuer.issuer)
            issuers.append(issuer)
    s = AuthSettings(
        issuers=tuple(issuers),
        audience=_audience(n, d.audience),
        leeway=n.duration("leeway", d.leeway, allow_zero=True, maximum=LEEWAY_MAX,
                          above="more than 5 minutes of clock leeway keeps expired tokens "
                          "alive"),
        max_token_bytes=n.integer("max_token_bytes", d.max_token_bytes, minimum=256,
                                  maximum=MAX_TOKEN_BYTES),
        token_cache_size=n.integer("token_cache_size", d.token_cache_size, minimum=0,
                                   maximum=MAX_TOKEN_CACHE),
        jwks_refresh_min_interval=n.duration(
            "jwks_refresh_min_interval", d.jwks_refresh_min_interval, allow_zero=True,
            maximum=JWKS_REFRESH_MIN_INTERVAL_MAX,
        ),
        jwks_refresh_interval=n.duration(
            "jwks_refresh_interval", d.jwks_refresh_interval,
            minimum=JWKS_REFRESH_INTERVAL_MIN, maximum=JWKS_REFRESH_INTERVAL_MAX),
        jwks_timeout=n.duration("jwks_timeout", d.jwks_timeout, minimum=JWKS_TIMEOUT_MIN,
                                maximum=JWKS_TIMEOUT_MAX),
        on_jwks_unavailable=cast(
            Any, n.choice("on_jwks_unavailable", d.on_jwks_unavailable, ("fail", "retry"))
        ),
    )
    n.done()
    return s


def _audience(n: Node, default: str) -> str:
    value = n.text("audience", default, allow_empty=False)
    # It is quoted into WWW-Authenticate (realm="..."): keep it a plain visible-ASCII token.
    if not (value.isascii() and value.isprintable()) or any(c in value for c in '"\\ '):
        n.report("audience", f"expected visible ASCII without spaces or quotes, got {value!r}")
        return default
    return value


def _issuer(n: Node, base_dir: Path | None) -> IssuerSettings:
    issuer = n.text("issuer", allow_empty=False)
    if issuer == DEV_ISSUER:
        n.report(
            "issuer",
            f"{DEV_ISSUER!r} is reserved for the development signer, which only "
            "`authz serve --dev` / `authz demo` can enable",
        )
    jwks_url = n.opt_str("jwks_url")
    jwks_file = n.opt_str("jwks_file")
    pem_file = n.opt_str("pem_file")
    algorithms = n.str_list("algorithms", ASYMMETRIC_ALGORITHMS, choices=SUPPORTED_ALGORITHMS,
                            unknown="unsupported algorithm",
                            note=" ('none' and HS* are never accepted)")
    # Unknown keys first: `jwks_uri` (the OIDC discovery spelling) is a typo for `jwks_url`,
    # which "needs exactly one key source" would only obscure.
    unknown = n.has_unknown_keys
    n.done()
    sources = [k for k, v in (("jwks_url", jwks_url), ("jwks_file", jwks_file),
                              ("pem_file", pem_file)) if v]
    if len(sources) != 1 and not unknown:
        n.report("", "needs exactly one key source: jwks_url, jwks_file or pem_file"
                 + (f" (got {', '.join(sources)})" if sources else ""))
    if jwks_url is not None:
        scheme = urlsplit(jwks_url).scheme
        if scheme not in ("https", "http"):
            n.report("jwks_url", f"expected an https:// URL, got {jwks_url!r}")
    if base_dir is not None:
        jwks_file = str(base_dir / jwks_file) if jwks_file else None
        pem_file = str(base_dir / pem_file) if pem_file else None
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
        timeout=n.duration("timeout", d.timeout, minimum=STORE_TIMEOUT_MIN,
                           maximum=STORE_TIMEOUT_MAX,
                           above="at most 10s: the store answer must come well before the "
                           "mesh's check timeout (0.5s recommended)"),
        on_error=cast(Any, n.choice("on_error", d.on_error, ("deny", "allow"))),
        max_batch=n.integer("max_batch", d.max_batch, minimum=1, maximum=100_000),
        redis_mode=cast(Any, n.choice("redis_mode", d.redis_mode,
                                      ("standalone", "sentinel", "cluster"))),
        redis_nodes=_endpoints(n, "redis_nodes"),
        sentinel_master=n.text("sentinel_master", d.sentinel_master),
        sentinel_username=n.text("sentinel_username", d.sentinel_username),
        sentinel_password=n.text("sentinel_password", d.sentinel_password),
        # Every replica of a shard at most; more than a handful makes every write wait on the
        # slowest of them.
        replica_acks=n.integer("replica_acks", d.replica_acks, minimum=0, maximum=5),
    )
    n.done()
    if not n.failed:
        for key, problem in redis_topology_problems(s):
            n.report(key, problem)
    if any(c in s.key_prefix for c in "{}"):
        n.report("key_prefix", "must not contain { or } (they delimit the cluster hash tag)")
    elif len(s.key_prefix) > 64 or not s.key_prefix.isprintable() or " " in s.key_prefix:
        n.report("key_prefix", "expected at most 64 printable characters without spaces")
    return s


def _endpoints(n: Node, key: str) -> tuple[str, ...]:
    nodes = n.str_list(key, ())
    for value in nodes:
        try:
            parse_endpoint(value)
        except InvalidValue as e:
            n.report(key, str(e))
            return ()
    return nodes


def redis_topology_problems(s: StoreSettings) -> list[tuple[str, str]]:
    """(key, problem) for a store topology that cannot work: checked for the file's values
    and again once AUTHZ_REDIS_URL has replaced the URL."""
    out: list[tuple[str, str]] = []
    mode = s.redis_mode
    if mode == "standalone":
        for key, value in (("redis_nodes", s.redis_nodes), ("sentinel_master", s.sentinel_master),
                           ("replica_acks", s.replica_acks)):
            if value:
                out.append((key, "only for redis_mode sentinel or cluster"))
        return out
    if not s.redis_url:
        return [("redis_url", f"redis_mode {mode} needs redis_url: a node's (or sentinel's) "
                 "redis:// or rediss:// URL, carrying the data nodes' credentials and TLS")]
    try:
        address = parse_redis_url(s.redis_url)
    except InvalidValue:
        return out  # reported where the URL is read
    if address.path:
        out.append(("redis_url", f"redis_mode {mode} needs a redis:// or rediss:// host:port, "
                    "not a unix socket"))
    if mode == "cluster":
        if address.db:
            out.append(("redis_url", "Redis Cluster has only database 0"))
        for key in ("sentinel_master", "sentinel_username", "sentinel_password"):
            if getattr(s, key):
                out.append((key, "only for redis_mode sentinel"))
    elif not s.sentinel_master:
        out.append(("sentinel_master", "is required with redis_mode sentinel: the name the "
                    "sentinels monitor the master under"))
    return out


def _check_redis_url(n: Node, key: str, url: str) -> None:
    # The same parser the Redis store's address comes from, so a URL that passes here also
    # connects there.
    try:
        parse_redis_url(url)
    except InvalidValue as e:
        n.report(key, f"invalid Redis URL: {e}")


def _paths(n: Node) -> PathSettings:
    d = PathSettings()
    s = PathSettings(
        protected_prefixes=n.str_list("protected_prefixes", d.protected_prefixes),
        public_paths=n.str_list("public_paths", d.public_paths),
        other=cast(Any, n.choice("other", d.other, ("deny", "allow"))),
        llm_routes=n.str_list("llm_routes", d.llm_routes),
    )
    n.done()
    for key, values in (("protected_prefixes", s.protected_prefixes),
                        ("public_paths", s.public_paths), ("llm_routes", s.llm_routes)):
        bad = [v for v in values if not v.startswith("/") or "?" in v or "//" in v]
        if bad:
            n.report(key, f"expected absolute paths without query, got {bad[0]!r}")
    for prefix in s.protected_prefixes:
        if not prefix.endswith("/"):
            n.report("protected_prefixes", f"{prefix!r} must end with '/'")
        for public in s.public_paths:
            if public.startswith(prefix):
                n.report("public_paths", f"{public!r} lies under protected prefix {prefix!r}")
        for route in s.llm_routes:
            if route.startswith(prefix):
                n.report("llm_routes", f"{route!r} lies under protected prefix {prefix!r}, "
                         "whose first segment is the model")
    for route in s.llm_routes:
        if route in s.public_paths:
            n.report("llm_routes", f"{route!r} is also a public path")
    return s


def _headers(n: Node) -> HeaderSettings:
    d = HeaderSettings()
    s = HeaderSettings(
        subject=_header_name(n, "subject", d.subject),
        issuer=_header_name(n, "issuer", d.issuer),
        plan=_header_name(n, "plan", d.plan),
        degraded=_header_name(n, "degraded", d.degraded),
        shadow=_header_name(n, "shadow", d.shadow),
        ratelimit_style=cast(Any, n.choice("ratelimit_style", d.ratelimit_style,
                                           ("triple", "structured"))),
    )
    n.done()
    names = [s.subject, s.issuer, s.plan, s.degraded, s.shadow]
    if not n.failed and len(set(names)) != len(names):
        n.report("", "header names must be distinct")
    return s


def _header_name(n: Node, key: str, default: str) -> str:
    value = n.text(key, default, allow_empty=False).lower()
    if not set(value) <= _HEADER_NAME_CHARS:
        n.report(key, f"{value!r} is not a valid HTTP header name")
        return default
    if value.startswith((":", "x-envoy-")) or value in ("host", "authorization"):
        n.report(key, f"{value!r} is reserved (Envoy refuses to let ext_authz set it)")
        return default
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
        deny_log_rate=n.number("deny_log_rate", d.deny_log_rate, positive=False,
                               maximum=MAX_DENY_LOG_RATE),
        log_level=n.choice("log_level", d.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=cast(Any, n.choice("log_format", d.log_format, ("json", "text"))),
    )
    n.done()
    return s


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
