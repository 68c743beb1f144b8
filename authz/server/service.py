"""The gRPC edge: envoy.service.auth.v3.Authorization/Check.

Reads the few fields the decision needs from the CheckRequest, runs the steps (path, token,
quota, buckets) and always answers with a CheckResponse. An exception escaping a handler would
reach Envoy as an RPC error: a bare 403 when failOpen is false, or a silent allow when it is
true. So every failure here is turned into an explicit, configured answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ..buckets.base import BucketStore, StoreError
from ..decision import Decision, DecisionMaker
from ..paths import PathClassifier, PathKind
from ..quota.resolve import Refusal, Resolver
from ..tokens.base import TokenFailure
from ..tokens.verifier import Authenticator
from .responses import ResponseCache, to_check_response

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry

log = logging.getLogger(__name__)


class Readiness:
    """Set once config, keys and store are ready; cleared when shutting down."""

    def __init__(self) -> None:
        self.ready = False


def request_headers(http: Any) -> Mapping[str, str]:
    """The request's headers, from `headers` or (with encode_raw_headers) `header_map`."""
    if http.headers:
        return http.headers  # type: ignore[no-any-return]
    out: dict[str, str] = {}
    for h in http.header_map.headers:
        # Envoy lower-cases names; raw values are bytes. Join duplicates the way Envoy does.
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


class Decider:
    """Runs the decision steps for one request. Each step is pure but the token (JWKS refetch)
    and the bucket charge (the store) are awaited."""

    def __init__(self, *, maker: DecisionMaker, paths: PathClassifier,
                 authenticator: Authenticator, resolver: Resolver, store: BucketStore,
                 readiness: Readiness) -> None:
        self.maker = maker
        self.paths = paths
        self.authenticator = authenticator
        self.resolver = resolver
        self.store = store
        self.readiness = readiness

    async def decide(self, request: pb.CheckRequest) -> tuple[Decision, str | None]:
        """The decision and the verified subject (for telemetry), never raising."""
        maker = self.maker
        http = request.attributes.request.http
        headers = request_headers(http)
        path = http.path or headers.get(":path", "")
        if not path:
            return maker.invalid_request("missing_http_attributes"), None
        target = self.paths.classify(path)
        kind = target.kind
        if kind is PathKind.INVALID:
            return maker.invalid_request(target.reason), None
        if kind is PathKind.PUBLIC:
            return maker.public(), None
        if kind is PathKind.OTHER:
            return maker.other_path(), None
        if not self.readiness.ready:
            return maker.not_ready(), None

        authorization = headers.get("authorization")
        identity = self.authenticator.authenticate_cached(authorization)
        cache_hit = identity is not None
        if identity is None:
            verified = await self.authenticator.authenticate(authorization)
            if isinstance(verified, TokenFailure):
                return maker.unauthenticated(verified), None
            identity = verified

        grant = self.resolver.resolve(identity, target.model)
        if isinstance(grant, Refusal):
            return maker.refused(identity, grant), identity.subject
        if not grant.buckets:
            return maker.unlimited(identity, grant, cache_hit), identity.subject
        try:
            result = await self.store.charge(grant.buckets, grant.cost)
        except StoreError as e:
            log.warning("bucket store failed: %s", e)
            return maker.store_failed(identity, grant, cache_hit), identity.subject
        return maker.charged(identity, grant, result, cache_hit), identity.subject


class AuthorizationService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, decider: Decider, telemetry: CheckTelemetry | None = None) -> None:
        self.decider = decider
        self.telemetry = telemetry
        self.responses = ResponseCache()
        maker = decider.maker
        for d in (maker.public(), maker.other_path(), maker.internal_error(), maker.not_ready(),
                  *(maker.unauthenticated(f) for f in TokenFailure)):
            self.responses.prebuild(d)
        self._internal = to_check_response(maker.internal_error())

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        telemetry = self.telemetry
        if telemetry is None:
            return self._respond(await self._decide(request))[1]
        http = request.attributes.request.http
        scope = telemetry.start_check(request_headers(http))
        # The check span is current while the decision is awaited, so the store's and the
        # JWKS fetcher's spans become its children, and the deny log line carries its ids.
        with scope:
            decision, subject = await self._decide(request)
            decision, response = self._respond((decision, subject))
            try:
                telemetry.finish_check(scope, decision, subject, path=http.path)
            except Exception:
                log.exception("telemetry failed")
        return response

    async def _decide(self, request: pb.CheckRequest) -> tuple[Decision, str | None]:
        try:
            return await self.decider.decide(request)
        except Exception:
            log.exception("internal error while deciding; answering %s",
                          self.decider.maker.internal_error().status)
            return self.decider.maker.internal_error(), None

    def _respond(self, decided: tuple[Decision, str | None]) -> tuple[Decision, pb.CheckResponse]:
        decision = decided[0]
        try:
            return decision, self.responses.get(decision)
        except Exception:
            log.exception("internal error while building the response")
            return self.decider.maker.internal_error(), self._internal
