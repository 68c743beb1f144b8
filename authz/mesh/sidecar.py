"""Render the Envoy bootstrap an Istio sidecar runs for `action: CUSTOM, provider: rate-limiter`.

This reproduces, for one inbound port, what istiod generates (pilot/pkg/security/authz/builder/
extauthz.go and builder.go, Istio 1.30) when a mesh has

    meshConfig.extensionProviders:
    - name: rate-limiter
      envoyExtAuthzGrpc: {service: <fqdn>, port: 9000, timeout: 500ms, statusOnError: "503"}

or, with `protocol="http"`, the HTTP provider (`generateHTTPConfig`):

    - name: rate-limiter-http
      envoyExtAuthzHttp: {service: <fqdn>, port: 8000, timeout: 500ms, statusOnError: "503",
                          pathPrefix: /check, includeRequestHeadersInCheck: [...],
                          headersToUpstreamOnAllow: [...], headersToDownstreamOnAllow: [...],
                          headersToDownstreamOnDeny: [...]}

which istiod turns into an `http_service`: `server_uri` {cluster, `uri: http://<fqdn>`,
timeout}, `path_prefix`, `authorization_request.allowed_headers` (plus `headers_to_add` from
includeAdditionalHeadersInCheck) and `authorization_response` {allowed_upstream_headers,
allowed_client_headers (OnDeny), allowed_client_headers_on_success (OnAllow)}, only when one of
the three lists is set. Each header becomes an `ignore_case` matcher: exact, `prefix` for
`name*`, `suffix` for `*name`. Newer istiod versions put the request headers in the filter's
own `allowed_headers` (the default here; Envoy 1.40 calls the older field deprecated); Envoy
accepts either, not both: `allowed_headers_on_filter=False` renders the older shape.

and an AuthorizationPolicy `action: CUSTOM, provider: {name: rate-limiter}` with
`to: [{operation: {paths: ["/v1/models/*", "/v2/models/*"]}}]`:

- an RBAC filter holding the CUSTOM rules as *shadow* rules (it never denies by itself);
- the ext_authz filter, gated by `filter_enabled_metadata` on RBAC's shadow effective policy id,
  so requests outside the rules never reach the service;
- the provider's cluster `outbound|<port>||<fqdn>`, HTTP/2, with `authority` set;
- the sidecar's path normalization (normalize_path, no slash merging, escaped slashes kept).

Istio's own filters (metadata exchange, stats, jwt_authn) are left out: they are not in upstream
Envoy and do not change what the ext_authz provider sees. Istio uses EDS; here endpoints are
static so the file runs by hand: `envoy -c envoy.yaml`.

The messages are built from `envoy-data-plane`'s typed classes, so a misspelled field or a wrong
type fails when the config is built, not when Envoy loads it. That library is far too slow for the
request path (its betterproto2 codec parses a CheckRequest ~185x slower than the upb classes the
server uses: proto/README.md); it is only used here, offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from ..errors import SidecarConfigError

# envoy-data-plane's generated modules trip pydantic deprecation warnings at import time
# (decorator style, not behaviour); they would drown every caller's output.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import betterproto2
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Admin,
        Bootstrap,
        BootstrapStaticResources,
    )
    from envoy_data_plane.envoy.config.cluster.v3 import (
        CircuitBreakers,
        CircuitBreakersThresholds,
        Cluster,
        ClusterDiscoveryType,
        ClusterLbPolicy,
    )
    from envoy_data_plane.envoy.config.core.v3 import (
        Address,
        ApiVersion,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HeaderValue,
        Http1ProtocolOptions,
        Http2ProtocolOptions,
        HttpUri,
        Node,
        RoutingPriority,
        SocketAddress,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.rbac.v3 import (
        Permission,
        PermissionSet,
        Policy,
        Principal,
        PrincipalSet,
        Rbac,
        RbacAction,
    )
    from envoy_data_plane.envoy.config.route.v3 import (
        Decorator,
        Route,
        RouteAction,
        RouteActionMaxStreamDuration,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
        AuthorizationRequest,
        AuthorizationResponse,
        BufferSettings,
        ExtAuthz,
        HttpService,
    )
    from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerPathWithEscapedSlashesAction,
        HttpConnectionManagerUpgradeConfig,
        HttpFilter,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import (
        ListStringMatcher,
        MetadataMatcher,
        MetadataMatcherPathSegment,
        PathMatcher,
        StringMatcher,
        ValueMatcher,
    )
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
    from envoy_data_plane.google.protobuf import Any as AnyProto

# Names istiod uses (pilot/pkg/security/authz/model/generator.go, builder/extauthz.go).
RBAC_FILTER = "envoy.filters.http.rbac"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
SHADOW_STAT_PREFIX = "istio_ext_authz_"
# RBAC writes the id of the matched shadow policy under <stat prefix>shadow_effective_policy_id.
SHADOW_POLICY_KEY = SHADOW_STAT_PREFIX + "shadow_effective_policy_id"
EXT_AUTHZ_POLICY_PREFIX = "istio-ext-authz"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Istio's default cluster connectTimeout (meshConfig.connectTimeout).
ISTIO_CONNECT_TIMEOUT = timedelta(seconds=10)
# Istio lifts Envoy's circuit-breaker defaults (1024 pending/active requests) to "unlimited";
# keeping Envoy's defaults here would make a load test hit 503 overflows no sidecar would show.
UNLIMITED = 4294967295

# Recommended statusOnError: 503 tells clients and retry policies "try again", and is what the
# service itself answers when its store fails under `store.on_error: deny`. Istio's default (unset)
# is 403, which a client cannot tell apart from a policy decision.
RECOMMENDED_STATUS_ON_ERROR = 503
# Recommended check timeout: above the service's p99 with a 50 ms Redis bound, far below Istio's
# 600 s default, which would hold every request hostage to a hung provider.
RECOMMENDED_TIMEOUT = 0.5


_STATUS_CODES = frozenset(code.value for code in StatusCode if code.value >= 100)
# The connection manager buffers at most this much of a request by default (Envoy's
# per_connection_buffer_limit_bytes, which Istio keeps): a larger maxRequestBytes never
# fills and the client gets 413 (istio/istio PR #49452). Raise the buffer limit first.
MAX_BUFFERED_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class RequestBody:
    """The provider's includeRequestBodyInCheck (Envoy's ext_authz with_request_body)."""

    max_request_bytes: int = 65536
    # true: a longer body is checked cut, with x-envoy-auth-partial-body: true; false: Envoy
    # answers 413 itself (even with failOpen) and never asks the provider.
    allow_partial_message: bool = True
    # true: raw_body (bytes, any encoding); false: body, which must be UTF-8 or the check
    # fails to decode (binary tensors do not pass).
    pack_as_bytes: bool = True

# The shipped envoyExtAuthzHttp registration's header lists (deploy/istio/), for the service's
# default header names. Request: Envoy always sends authorization (and the method, path and
# Host); the trace headers let the check span join the caller's trace.
HTTP_INCLUDE_REQUEST_HEADERS = ("traceparent", "tracestate", "b3", "x-b3-*")
# To the model server on allow: the identity headers, which Envoy then *sets* (overwriting any
# client-sent copy), and the degraded and shadow markers. A header missing here never reaches
# the model server from us, and a client's forged copy of it stays: keep the list complete.
HTTP_HEADERS_TO_UPSTREAM = ("x-auth-subject", "x-auth-issuer", "x-auth-plan", "x-authz-degraded",
                            "x-authz-shadow")
# To the client: the RateLimit headers on allow ("ratelimit*": every form of the draft); on
# deny also the challenge, Retry-After and the JSON body's headers.
HTTP_HEADERS_TO_DOWNSTREAM_ON_ALLOW = ("ratelimit*",)
HTTP_HEADERS_TO_DOWNSTREAM_ON_DENY = ("www-authenticate", "retry-after", "ratelimit*",
                                      "content-type", "cache-control")
# Istio's sample ext-authz server serves HTTP checks on 8000 (gRPC on 9000).
HTTP_SERVICE_PORT = 8000
HTTP_PATH_PREFIX = "/check"
PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    """What the generated sidecar connects and how the provider is configured."""

    # Where Envoy accepts client traffic (Istio: 15006 with iptables; here a plain listener).
    # Port 0 lets the kernel choose; read it back from the admin endpoint's /listeners.
    listener_address: str = "127.0.0.1"
    listener_port: int = 15006
    # Envoy's admin endpoint (Istio: 15000 on localhost). Never expose it beyond loopback.
    admin_address: str = "127.0.0.1"
    admin_port: int = 15000
    # The application behind the sidecar: the model server.
    app_address: str = "127.0.0.1"
    app_port: int = 8080
    # The ext_authz provider: mesh service name, its port, and the addresses that serve it
    # (Istio discovers these through EDS; several entries = several replicas).
    provider: str = "rate-limiter"
    service_fqdn: str = "rate-limiter.authz.svc.cluster.local"
    service_port: int = 9000
    endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", 9000),)
    # "grpc": envoyExtAuthzGrpc; "http": envoyExtAuthzHttp (the fields below).
    protocol: str = "grpc"
    # envoyExtAuthzHttp.pathPrefix, includeRequestHeadersInCheck, the three header lists and
    # includeAdditionalHeadersInCheck. Patterns as Istio takes them: "name", "prefix*", "*suffix".
    path_prefix: str = ""
    include_request_headers: tuple[str, ...] = HTTP_INCLUDE_REQUEST_HEADERS
    headers_to_upstream_on_allow: tuple[str, ...] = HTTP_HEADERS_TO_UPSTREAM
    headers_to_downstream_on_allow: tuple[str, ...] = HTTP_HEADERS_TO_DOWNSTREAM_ON_ALLOW
    headers_to_downstream_on_deny: tuple[str, ...] = HTTP_HEADERS_TO_DOWNSTREAM_ON_DENY
    include_additional_headers: tuple[tuple[str, str], ...] = ()
    # The request headers in ExtAuthz.allowed_headers, as newer istiod versions emit them
    # (Envoy 1.40 warns that http_service.authorization_request.allowed_headers, where older
    # ones put them, is deprecated); False: the older shape.
    allowed_headers_on_filter: bool = True
    timeout: float = RECOMMENDED_TIMEOUT
    fail_open: bool = False
    # An HTTP status code, or None for Envoy's (and Istio's) default, 403.
    status_on_error: int | None = RECOMMENDED_STATUS_ON_ERROR
    policy_name: str = "ml-inference-rate-limit"
    policy_namespace: str = "ml-serving"
    paths: tuple[str, ...] = ("/v1/models/*", "/v2/models/*")
    # Istio's default load balancing is LEAST_REQUEST; ROUND_ROBIN is deterministic for tests.
    lb_policy: str = "LEAST_REQUEST"
    # meshConfig.pathNormalization.normalization: NONE, BASE (Istio's default), MERGE_SLASHES
    # or DECODE_AND_MERGE_SLASHES.
    path_normalization: str = "BASE"
    # Access log to stdout (Istio: meshConfig.accessLogFile: /dev/stdout).
    access_log: bool = False
    # None: checks carry headers only (the provider without includeRequestBodyInCheck).
    request_body: RequestBody | None = None
    node_id: str = "sidecar~127.0.0.1~model-server.ml-serving~ml-serving.svc.cluster.local"

    @property
    def outbound_cluster(self) -> str:
        # model.BuildSubsetKey(TrafficDirectionOutbound, "", host, port)
        return f"outbound|{self.service_port}||{self.service_fqdn}"

    @property
    def inbound_cluster(self) -> str:
        return f"inbound|{self.app_port}||"

    def rule_policy_id(self, index: int) -> str:
        # Istio 1.30+ names shadow policies per provider; up to 1.29 it was
        # istio-ext-authz-ns[<ns>]-policy[<name>]-rule[<i>]. Both start with the gate prefix.
        return (
            f"{EXT_AUTHZ_POLICY_PREFIX}-{self.provider}-ns[{self.policy_namespace}]"
            f"-policy[{self.policy_name}]-rule[{index}]"
        )


def _check(spec: SidecarSpec) -> None:
    ports = {
        "listener_port": spec.listener_port,
        "admin_port": spec.admin_port,
        "app_port": spec.app_port,
        "service_port": spec.service_port,
    }
    for name, port in ports.items():
        if not 0 <= port <= 65535:
            raise SidecarConfigError(f"{name} must be in 0..65535, got {port}")
    if spec.app_port == 0 or spec.service_port == 0:
        raise SidecarConfigError("app_port and service_port must be real ports, not 0")
    if not spec.endpoints:
        raise SidecarConfigError("endpoints must name at least one address:port of the service")
    for host, port in spec.endpoints:
        if not host or not 1 <= port <= 65535:
            raise SidecarConfigError(f"bad endpoint {host}:{port}")
    # Istio validates provider names as DNS labels (mesh config validation).
    if not spec.provider or len(spec.provider) > 63 or spec.provider.lower() != spec.provider:
        raise SidecarConfigError(f"provider {spec.provider!r} must be a lower-case DNS label")
    if not 0 < spec.timeout <= 600:
        raise SidecarConfigError(f"timeout must be in (0, 600] seconds, got {spec.timeout}")
    # Proto3 enums are open (StatusCode(299) "works"), so check against the named codes.
    if spec.status_on_error is not None and spec.status_on_error not in _STATUS_CODES:
        raise SidecarConfigError(
            f"status_on_error {spec.status_on_error} is not an Envoy StatusCode "
            "(a 4xx or 5xx code such as 503)"
        )
    if spec.lb_policy not in ClusterLbPolicy.__members__:
        raise SidecarConfigError(f"lb_policy {spec.lb_policy!r} is not an Envoy lb policy")
    if spec.path_normalization not in PATH_NORMALIZATIONS:
        raise SidecarConfigError(
            f"path_normalization {spec.path_normalization!r} is not one of "
            f"{', '.join(PATH_NORMALIZATIONS)}"
        )
    if not spec.paths:
        raise SidecarConfigError("paths must list at least one AuthorizationPolicy path")
    body = spec.request_body
    if body is not None and not 1 <= body.max_request_bytes <= MAX_BUFFERED_BODY:
        raise SidecarConfigError(
            f"max_request_bytes must be in 1..{MAX_BUFFERED_BODY} (the connection manager's "
            f"buffer), got {body.max_request_bytes}")
    if spec.protocol not in PROTOCOLS:
        raise SidecarConfigError(f"protocol {spec.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if spec.path_prefix and (not spec.path_prefix.startswith("/") or spec.protocol != "http"):
        # istiod: "pathPrefix must begin with `/`"; gRPC providers have no pathPrefix.
        raise SidecarConfigError(f"path_prefix {spec.path_prefix!r}: an HTTP provider's, "
                                 "starting with '/'")
    for name, patterns in (("include_request_headers", spec.include_request_headers),
                           ("headers_to_upstream_on_allow", spec.headers_to_upstream_on_allow),
                           ("headers_to_downstream_on_allow",
                            spec.headers_to_downstream_on_allow),
                           ("headers_to_downstream_on_deny", spec.headers_to_downstream_on_deny)):
        for pattern in patterns:
            if pattern == "*" or not pattern:
                # istiod: 'a single wildcard ("*") is not supported'
                raise SidecarConfigError(f"{name}: {pattern!r} is not a header pattern (a name, "
                                         "'prefix*' or '*suffix')")


def path_permission(path: str) -> Permission:
    """One AuthorizationPolicy `paths` entry as Istio translates it (builder/matcher)."""
    if not path.startswith(("/", "*")):
        raise SidecarConfigError(f"path {path!r} must start with '/' or '*'")
    if path == "*":
        # Istio: presence match on the path.
        matcher = StringMatcher(prefix="/")
    elif path.endswith("*") and "*" not in path[:-1]:
        matcher = StringMatcher(prefix=path[:-1])
    elif path.startswith("*") and "*" not in path[1:]:
        matcher = StringMatcher(suffix=path[1:])
    elif "*" in path or "{" in path:
        # Istio 1.22+ path templates ({*}, {**}) are not reproduced here.
        raise SidecarConfigError(f"path {path!r}: only exact, 'prefix*' and '*suffix' supported")
    else:
        matcher = StringMatcher(exact=path)
    # url_path matches :path without the query string.
    return Permission(url_path=PathMatcher(path=matcher))


def rbac_shadow_filter(spec: SidecarSpec) -> HttpFilter:
    # One rule with one `to.operation.paths` list: AND(OR(paths)) as builder.go nests it.
    any_path = Permission(or_rules=PermissionSet(rules=[path_permission(p) for p in spec.paths]))
    rule = Permission(and_rules=PermissionSet(rules=[any_path]))
    policy = Policy(
        permissions=[rule],
        principals=[Principal(and_ids=PrincipalSet(ids=[Principal(any=True)]))],
    )
    config = RbacFilter(
        # CUSTOM rules are DENY-shaped shadow rules: "matched" means "ask the provider".
        shadow_rules=Rbac(action=RbacAction.DENY, policies={spec.rule_policy_id(0): policy}),
        shadow_rules_stat_prefix=SHADOW_STAT_PREFIX,
    )
    return HttpFilter(name=RBAC_FILTER, typed_config=AnyProto.pack(config))


def header_matchers(patterns: Sequence[str]) -> ListStringMatcher | None:
    """Istio's generateHeaders: ignore_case matchers, `*x` a suffix, `x*` a prefix, else exact;
    None for an empty list (the field is then left unset)."""
    if not patterns:
        return None
    out = []
    for p in patterns:
        if p.startswith("*"):
            out.append(StringMatcher(suffix=p[1:], ignore_case=True))
        elif p.endswith("*"):
            out.append(StringMatcher(prefix=p[:-1], ignore_case=True))
        else:
            out.append(StringMatcher(exact=p, ignore_case=True))
    return ListStringMatcher(patterns=out)


def _filter_gate() -> MetadataMatcher:
    return MetadataMatcher(
        filter=RBAC_FILTER,
        path=[MetadataMatcherPathSegment(key=SHADOW_POLICY_KEY)],
        value=ValueMatcher(string_match=StringMatcher(prefix=EXT_AUTHZ_POLICY_PREFIX)),
    )


def _status_on_error(spec: SidecarSpec) -> HttpStatus | None:
    if spec.status_on_error is None:
        return None
    return HttpStatus(code=StatusCode(spec.status_on_error))


def _with_body(spec: SidecarSpec) -> BufferSettings | None:
    """includeRequestBodyInCheck (either protocol; packAsBytes matters to gRPC only: the HTTP
    filter always sends the raw bytes)."""
    body = spec.request_body
    if body is None:
        return None
    return BufferSettings(max_request_bytes=body.max_request_bytes,
                          allow_partial_message=body.allow_partial_message,
                          pack_as_bytes=body.pack_as_bytes)


def http_ext_authz_filter(spec: SidecarSpec) -> HttpFilter:
    """generateHTTPConfig: the HTTP provider's ext_authz filter."""
    allowed = header_matchers(spec.include_request_headers)
    headers_to_add = [HeaderValue(key=k, value=v)
                      for k, v in sorted(spec.include_additional_headers)]
    service = HttpService(
        path_prefix=spec.path_prefix,
        server_uri=HttpUri(
            uri=f"http://{spec.service_fqdn}",  # required, never used by the filter
            cluster=spec.outbound_cluster,
            timeout=timedelta(seconds=spec.timeout),
        ),
    )
    if (allowed is not None and not spec.allowed_headers_on_filter) or headers_to_add:
        with warnings.catch_warnings():
            # Deprecated in Envoy's API for ExtAuthz.allowed_headers, and still what the
            # istiod versions that emit it emit; Envoy 1.40 takes it.
            warnings.simplefilter("ignore", DeprecationWarning)
            service.authorization_request = AuthorizationRequest(
                allowed_headers=None if spec.allowed_headers_on_filter else allowed,
                headers_to_add=headers_to_add)
    if (spec.headers_to_upstream_on_allow or spec.headers_to_downstream_on_deny
            or spec.headers_to_downstream_on_allow):
        service.authorization_response = AuthorizationResponse(
            allowed_upstream_headers=header_matchers(spec.headers_to_upstream_on_allow),
            allowed_client_headers=header_matchers(spec.headers_to_downstream_on_deny),
            allowed_client_headers_on_success=header_matchers(
                spec.headers_to_downstream_on_allow),
        )
    config = ExtAuthz(
        http_service=service,
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=spec.fail_open,
        status_on_error=_status_on_error(spec),
        filter_enabled_metadata=_filter_gate(),
        with_request_body=_with_body(spec),
        allowed_headers=allowed if spec.allowed_headers_on_filter else None,
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=AnyProto.pack(config))


def ext_authz_filter(spec: SidecarSpec) -> HttpFilter:
    if spec.protocol == "http":
        return http_ext_authz_filter(spec)
    config = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(
                cluster_name=spec.outbound_cluster,
                # '|' is not valid in :authority; without this Envoy would send the cluster name.
                authority=spec.service_fqdn,
            ),
            timeout=timedelta(seconds=spec.timeout),
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=spec.fail_open,
        status_on_error=_status_on_error(spec),
        filter_enabled_metadata=_filter_gate(),
        with_request_body=_with_body(spec),
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=AnyProto.pack(config))


def _access_logs(spec: SidecarSpec) -> list[AccessLog]:
    if not spec.access_log:
        return []
    return [
        AccessLog(name="envoy.access_loggers.stdout", typed_config=AnyProto.pack(StdoutAccessLog()))
    ]


def _normalization(mode: str) -> dict[str, Any]:
    """HCM path settings per meshConfig.pathNormalization (listener_builder.go).

    Under BASE, `/v1//models/m` and `/v1/models%2Fm` do NOT match `/v1/models/*`: they skip
    the check and reach the model server, which may well merge or decode them into a model
    path. MERGE_SLASHES closes the first, DECODE_AND_MERGE_SLASHES both.
    """
    keep = HttpConnectionManagerPathWithEscapedSlashesAction.KEEP_UNCHANGED
    unescape = HttpConnectionManagerPathWithEscapedSlashesAction.UNESCAPE_AND_FORWARD
    modes: dict[str, tuple[bool, bool, HttpConnectionManagerPathWithEscapedSlashesAction]] = {
        "NONE": (False, False, keep),
        "BASE": (True, False, keep),
        "MERGE_SLASHES": (True, True, keep),
        "DECODE_AND_MERGE_SLASHES": (True, True, unescape),
    }
    normalize, merge, escaped = modes[mode]
    return {
        "normalize_path": normalize,
        "merge_slashes": merge,
        "path_with_escaped_slashes_action": escaped,
    }


PATH_NORMALIZATIONS = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")


def inbound_listener(spec: SidecarSpec) -> Listener:
    route_config = RouteConfiguration(
        name=spec.inbound_cluster,
        validate_clusters=False,
        virtual_hosts=[
            VirtualHost(
                name=f"inbound|http|{spec.app_port}",
                domains=["*"],
                routes=[
                    Route(
                        name="default",
                        match=RouteMatch(prefix="/"),
                        route=RouteAction(
                            cluster=spec.inbound_cluster,
                            # Istio disables route timeouts inbound: inference can be slow.
                            timeout=timedelta(0),
                            max_stream_duration=RouteActionMaxStreamDuration(
                                max_stream_duration=timedelta(0),
                                grpc_timeout_header_max=timedelta(0),
                            ),
                        ),
                        decorator=Decorator(operation=f":{spec.app_port}/*"),
                    )
                ],
            )
        ],
    )
    hcm = HttpConnectionManager(
        stat_prefix=f"inbound_0.0.0.0_{spec.app_port}",
        route_config=route_config,
        http_filters=[
            rbac_shadow_filter(spec),
            ext_authz_filter(spec),
            HttpFilter(name=ROUTER_FILTER, typed_config=AnyProto.pack(Router())),
        ],
        **_normalization(spec.path_normalization),
        use_remote_address=False,
        server_name="istio-envoy",
        # Istio: websocket upgrades allowed, no stream idle timeout (long inference calls).
        upgrade_configs=[HttpConnectionManagerUpgradeConfig(upgrade_type="websocket")],
        stream_idle_timeout=timedelta(0),
        access_log=_access_logs(spec),
    )
    return Listener(
        name=f"virtualInbound_{spec.app_port}",
        address=_address(spec.listener_address, spec.listener_port),
        filter_chains=[
            FilterChain(filters=[Filter(name=HCM_FILTER, typed_config=AnyProto.pack(hcm))])
        ],
    )


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _static_cluster(name: str, endpoints: Sequence[tuple[str, int]], lb_policy: str) -> Cluster:
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=ISTIO_CONNECT_TIMEOUT,
        lb_policy=ClusterLbPolicy[lb_policy],
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    priority=RoutingPriority.DEFAULT,
                    max_connections=UNLIMITED,
                    max_pending_requests=UNLIMITED,
                    max_requests=UNLIMITED,
                    max_retries=UNLIMITED,
                )
            ]
        ),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(endpoint=Endpoint(address=_address(host, port)))
                        for host, port in endpoints
                    ]
                )
            ],
        ),
    )


def provider_cluster(spec: SidecarSpec) -> Cluster:
    cluster = _static_cluster(spec.outbound_cluster, spec.endpoints, spec.lb_policy)
    if spec.protocol == "http":
        # The HTTP provider's port is named `http` (appProtocol http): HTTP/1.1, pooled
        # keep-alive connections, one check in flight on each (Envoy does not pipeline).
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http_protocol_options=Http1ProtocolOptions()
            )
        )
    else:
        # gRPC needs HTTP/2 to the provider; Istio derives it from the port name `grpc` or
        # appProtocol (istio/istio#50881: over HTTP/1.1 every check fails -> 403).
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http2_protocol_options=Http2ProtocolOptions()
            )
        )
    cluster.typed_extension_protocol_options = {HTTP_PROTOCOL_OPTIONS: AnyProto.pack(options)}
    return cluster


def app_cluster(spec: SidecarSpec) -> Cluster:
    return _static_cluster(spec.inbound_cluster, [(spec.app_address, spec.app_port)], "ROUND_ROBIN")


def build_bootstrap(spec: SidecarSpec) -> Bootstrap:
    """The typed bootstrap. Raises SidecarConfigError on bad parameters."""
    _check(spec)
    return Bootstrap(
        node=Node(id=spec.node_id, cluster="model-server.ml-serving"),
        admin=Admin(address=_address(spec.admin_address, spec.admin_port)),
        static_resources=BootstrapStaticResources(
            listeners=[inbound_listener(spec)],
            clusters=[app_cluster(spec), provider_cluster(spec)],
        ),
    )


def render(spec: SidecarSpec) -> dict[str, Any]:
    """The bootstrap as a plain dict with Envoy's snake_case field names."""
    with warnings.catch_warnings():
        # Reading the deprecated AuthorizationRequest.allowed_headers (see
        # http_ext_authz_filter) warns again on the way out.
        warnings.simplefilter("ignore", DeprecationWarning)
        return build_bootstrap(spec).to_dict(casing=betterproto2.Casing.SNAKE)


HEADER = """\
# Envoy bootstrap as an Istio sidecar runs it for an AuthorizationPolicy
#   action: CUSTOM, provider: {{name: {provider}}}, paths: {paths}
# Generated by `python -m authz.mesh.sidecar` (authz/mesh/sidecar.py); do not edit by hand.
# Run it: envoy -c <this file>
"""


def to_yaml(spec: SidecarSpec) -> str:
    body = yaml.safe_dump(render(spec), sort_keys=False, default_flow_style=False)
    return HEADER.format(provider=spec.provider, paths=list(spec.paths)) + body


def _endpoint(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    d = SidecarSpec()
    p = argparse.ArgumentParser(
        prog="python -m authz.mesh.sidecar",
        description="Write the Envoy config an Istio sidecar uses for the CUSTOM authz provider.",
    )
    p.add_argument("--out", default="-", help="output file (.yaml/.yml or .json); - = stdout")
    p.add_argument("--listener-port", type=int, default=d.listener_port)
    p.add_argument("--listener-address", default=d.listener_address)
    p.add_argument("--admin-port", type=int, default=d.admin_port)
    p.add_argument("--app-port", type=int, default=d.app_port, help="model server port")
    p.add_argument("--app-address", default=d.app_address)
    p.add_argument("--provider", default=d.provider)
    p.add_argument("--service", default=d.service_fqdn, help="provider service FQDN")
    p.add_argument("--service-port", type=int, default=d.service_port)
    p.add_argument(
        "--endpoint",
        action="append",
        type=_endpoint,
        help="HOST:PORT of a service replica (repeatable; default 127.0.0.1:<service-port>)",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol,
                   help="the provider: envoyExtAuthzGrpc (grpc, the default) or "
                        "envoyExtAuthzHttp (http; give --service-port 8000 --path-prefix /check "
                        "for the shipped registration)")
    p.add_argument("--path-prefix", default=d.path_prefix,
                   help="envoyExtAuthzHttp.pathPrefix (http only; = server.http_path_prefix)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="check timeout, seconds")
    p.add_argument("--fail-open", action="store_true", help="failOpen: allow when checks fail")
    p.add_argument(
        "--status-on-error",
        type=int,
        default=d.status_on_error,
        help="HTTP status when a check fails (0 = Envoy default 403)",
    )
    p.add_argument("--policy-name", default=d.policy_name)
    p.add_argument("--policy-namespace", default=d.policy_namespace)
    p.add_argument("--path", action="append", help="AuthorizationPolicy path (repeatable)")
    p.add_argument("--lb-policy", default=d.lb_policy)
    p.add_argument(
        "--path-normalization",
        choices=PATH_NORMALIZATIONS,
        default=d.path_normalization,
        help="meshConfig.pathNormalization (default BASE, as Istio)",
    )
    p.add_argument("--access-log", action="store_true", help="access log to stdout")
    p.add_argument(
        "--request-body-bytes",
        type=int,
        default=0,
        help="includeRequestBodyInCheck.maxRequestBytes (0 = no body in the check)",
    )
    p.add_argument(
        "--no-partial-body",
        action="store_true",
        help="allowPartialMessage: false (Envoy answers 413 for longer bodies)",
    )
    p.add_argument(
        "--body-as-text",
        action="store_true",
        help="packAsBytes: false (the body as UTF-8 text)",
    )
    return p


def spec_from_args(args: argparse.Namespace) -> SidecarSpec:
    return SidecarSpec(
        listener_address=args.listener_address,
        listener_port=args.listener_port,
        admin_port=args.admin_port,
        app_address=args.app_address,
        app_port=args.app_port,
        provider=args.provider,
        service_fqdn=args.service,
        service_port=args.service_port,
        endpoints=tuple(args.endpoint or [("127.0.0.1", args.service_port)]),
        protocol=args.protocol,
        path_prefix=args.path_prefix,
        timeout=args.timeout,
        fail_open=args.fail_open,
        status_on_error=args.status_on_error or None,
        policy_name=args.policy_name,
        policy_namespace=args.policy_namespace,
        paths=tuple(args.path or SidecarSpec().paths),
        lb_policy=args.lb_policy,
        path_normalization=args.path_normalization,
        access_log=args.access_log,
        request_body=(
            RequestBody(
                max_request_bytes=args.request_body_bytes,
                allow_partial_message=not args.no_partial_body,
                pack_as_bytes=not args.body_as_text,
            )
            if args.request_body_bytes
            else None
        ),
    )


def write(spec: SidecarSpec, out: Path) -> None:
    text = json.dumps(render(spec), indent=2) + "\n" if out.suffix == ".json" else to_yaml(spec)
    out.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if args.out == "-":
            sys.stdout.write(to_yaml(spec))
        else:
            write(spec, Path(args.out))
    except SidecarConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
