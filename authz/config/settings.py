"""The service's settings as typed, immutable values.

`authz.config.service_file` builds these from a YAML file (see README "Configuration reference");
everything else in the package receives them already validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..jwa import ASYMMETRIC_ALGORITHMS

# The development signer's issuer (authz/tokens/devsigner.py). Reserved: the config loader
# refuses it in every config file, which is what guarantees the dev signer can only be
# switched on by `--dev` / `authz demo`.
DEV_ISSUER = "urn:authz:dev"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    # 9000: the port Istio's ext-authz samples use for the gRPC provider.
    grpc_port: int = 9000
    # 9464: the OpenTelemetry Prometheus exporter's customary port. 0 disables the endpoint.
    metrics_port: int = 9464
    # Envoy's HTTP ext_authz protocol (Istio `envoyExtAuthzHttp`) on its own port, beside gRPC.
    # 0 (the default): off, so an existing deployment opens no new port on an upgrade. 8000 is
    # the port Istio's ext-authz sample serves HTTP checks on.
    http_port: int = 0
    # What the provider's `pathPrefix` puts before every check request's path: removed before
    # the path is classified. Empty: the check path is the request's path as it is.
    http_path_prefix: str = ""
    # 0 means one worker process per CPU.
    workers: int = 0
    # After SIGTERM: health turns NOT_SERVING at once; new connections are refused only after
    # this delay so readiness probes and Envoy's outlier detection can move traffic away.
    drain_delay: float = 2.0
    # In-flight checks get this long to finish (keep below terminationGracePeriodSeconds).
    shutdown_grace: float = 20.0


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    issuer: str
    jwks_url: str | None = None
    jwks_file: str | None = None
    pem_file: str | None = None
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS


@dataclass(frozen=True, slots=True)
class AuthSettings:
    issuers: tuple[IssuerSettings, ...] = ()
    audience: str = "ml-inference-api"
    # Clock skew tolerated for exp/nbf/iat. Small on purpose: every second of leeway is a
    # second an expired token still works.
    leeway: float = 5.0
    # A real RS256 access token is ~0.8-2 KB; 8 KB leaves room for fat claims while refusing
    # megabyte "tokens" before any base64 or JSON work is done on them.
    max_token_bytes: int = 8192
    # Verified-claims cache entries. Each holds the identity and its verified claims: ~2 KB
    # measured (loadtests --rss-only), so the default bounds the cache near 100 MB per process.
    token_cache_size: int = 50_000
    # An unknown `kid` triggers a JWKS refetch at most this often per issuer, so a flood of
    # forged kids cannot turn into a flood of requests to the identity provider.
    jwks_refresh_min_interval: float = 30.0
    # Keys are also refreshed on this period in the background (key rotation without new kids).
    jwks_refresh_interval: float = 300.0
    jwks_timeout: float = 2.0
    # At startup, an unreachable JWKS either stops the process ("fail") or leaves it
    # NOT_SERVING while it retries ("retry").
    on_jwks_unavailable: Literal["fail", "retry"] = "fail"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    # Empty: the in-memory store (one replica, development). Env AUTHZ_REDIS_URL overrides.
    redis_url: str = ""
    key_prefix: str = "authz:"
    # Every Redis call is bounded. 50 ms is well under the 200 ms-1 s check timeout we
    # recommend for the mesh provider, so a slow Redis yields our answer, not Envoy's.
    timeout: float = 0.05
    # What a decision is when the store fails: "deny" (503) or "allow" (marked with a header).
    on_error: Literal["deny", "allow"] = "deny"
    # Upper bound on decisions coalesced into one pipelined write.
    max_batch: int = 512
    # How the Redis nodes are found: "standalone" (redis_url is the server, or a proxy),
    # "sentinel" (redis_url's host:port and redis_nodes are sentinels watching
    # sentinel_master) or "cluster" (redis_url's host:port and redis_nodes are seed nodes, e.g.
    # a managed service's configuration endpoint). redis_url's user, password, TLS options
    # (and database, not in cluster mode) apply to the data nodes in every mode.
    redis_mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    redis_nodes: tuple[str, ...] = ()
    sentinel_master: str = ""
    # The sentinels' own credentials, when they differ from the data nodes' (requirepass on
    # the sentinels). Env AUTHZ_REDIS_SENTINEL_PASSWORD overrides the password.
    sentinel_username: str = ""
    sentinel_password: str = ""
    # Replicas that must have a write before its decisions are answered (sentinel, cluster):
    # one WAIT per pipelined write. 0: answer at once; an admission then lives only on the
    # master until replication (well under a millisecond), and a failover in that window can
    # forget it. 1: no admitted request is lost in a failover, for one replication round trip.
    replica_acks: int = 0


@dataclass(frozen=True, slots=True)
class PathSettings:
    protected_prefixes: tuple[str, ...] = ("/v1/models/", "/v2/models/")
    public_paths: tuple[str, ...] = (
        "/health", "/ready", "/v2/health/live", "/v2/health/ready",
        "/v1/health", "/healthz", "/readyz",
    )
    # Any other path: "deny" (403) or "allow" (no token needed, nothing charged).
    other: Literal["deny", "allow"] = "deny"
    # OpenAI-compatible LLM routes (exact paths, e.g. /v1/chat/completions or, under KServe's
    # prefix, /openai/v1/chat/completions): protected like the model paths, the model named
    # by the body's `model` field.
    llm_routes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderSettings:
    # Identity headers set for the upstream on allow; client-sent copies are overwritten.
    subject: str = "x-auth-subject"
    issuer: str = "x-auth-issuer"
    plan: str = "x-auth-plan"
    # Set on requests let through because the store failed under on_error: allow.
    degraded: str = "x-authz-degraded"
    # Set on requests shadow mode let through: what enforcement would have answered
    # ("rate_limited", "model_not_allowed", "blocked").
    shadow: str = "x-authz-shadow"
    # The RateLimit fields for the client: "triple" (RateLimit-Limit / -Remaining / -Reset, the
    # older drafts' form) or "structured" (RateLimit-Policy and RateLimit, structured fields of
    # draft-ietf-httpapi-ratelimit-headers-08 and later).
    ratelimit_style: Literal["triple", "structured"] = "triple"


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    # Span attribute for the subject: "none" or "hashed" (salted SHA-256, first 16 hex chars).
    subject_attribute: Literal["none", "hashed"] = "hashed"
    subject_salt: str = ""
    # Log level of the one-line-per-deny log, and at most this many deny lines per second.
    deny_log_level: str = "INFO"
    deny_log_rate: float = 20.0
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    headers: HeaderSettings = field(default_factory=HeaderSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    # Path of the quota file (resolved relative to the config file), or None for the embedded
    # default quota.
    quota_file: str | None = None
    # The quota file is re-read on SIGHUP and whenever its modification time changes (checked
    # this often; 0 = only on SIGHUP). Kubernetes updates a mounted ConfigMap within about a
    # minute, so a few seconds of polling is not what limits how fast a change lands.
    quota_reload_interval: float = 10.0
    # Internal failures (a bug) get this status; never an allow.
    internal_error_status: int = 500
