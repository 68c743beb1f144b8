"""The gRPC edge: envoy.service.auth.v3.Authorization/Check.

Reads what the decision needs from the CheckRequest (the path, the headers, the body when the
provider includes it), runs
the request pipeline (authz/pipeline.py) and always answers with a CheckResponse. An exception
escaping a handler would reach Envoy as an RPC error: a bare 403 when failOpen is false, or a
silent allow when it is true. So every failure here is turned into an explicit, configured
answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ..decision import Decision
from ..log_throttle import ThrottledLog
from ..pipeline import CheckPipeline
from ..tokens.identity import TokenFailure
from .responses import ResponseCache, to_check_response

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry

log = logging.getLogger(__name__)


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


def request_body(http: Any) -> bytes | None:
    """The request's body: `raw_body` (the provider's packAsBytes) or `body` (UTF-8 text);
    None when the check carries none (the provider's includeRequestBodyInCheck is off)."""
    if http.raw_body:
        return http.raw_body  # type: ignore[no-any-return]
    if http.body:
        return http.body.encode("utf-8", "surrogatepass")  # type: ignore[no-any-return]
    return None


class AuthorizationService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, pipeline: CheckPipeline, telemetry: CheckTelemetry | None = None) -> None:
        self.pipeline = pipeline
        self.telemetry = telemetry
        self.responses = ResponseCache()
        answers = pipeline.answers
        for d in (answers.public(), answers.other_path(), answers.internal_error(),
                  answers.not_ready(), *(answers.unauthenticated(f) for f in TokenFailure)):
            self.responses.prebuild(d)
        self._internal = to_check_response(answers.internal_error())
        status = answers.internal_error().status
        self._decide_failed = ThrottledLog(
            log, logging.ERROR, f"internal error while deciding (answered {status})")
        self._respond_failed = ThrottledLog(log, logging.ERROR,
                                            "internal error while building the response")
        self._telemetry_failed = ThrottledLog(log, logging.ERROR, "telemetry failed")

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        http = request.attributes.request.http
        headers = request_headers(http)
        # The path as Envoy saw it: the attribute, or the :path pseudo-header.
        path = http.path or headers.get(":path", "")
        body = request_body(http)
        telemetry = self.telemetry
        if telemetry is None:
            return self._respond(await self._decide(path, headers, body))[1]
        scope = telemetry.start_check(headers)
        # The check span is current while the decision is awaited, so the store's and the
        # JWKS fetcher's spans become its children, and the deny log line carries its ids.
        with scope:
            decision, subject = await self._decide(path, headers, body)
            decision, response = self._respond((decision, subject))
            try:
                telemetry.finish_check(scope, decision, subject, path=path)
            except Exception as e:
                self._telemetry_failed(repr(e), exc_info=e)
        return response

    async def _decide(self, path: str, headers: Mapping[str, str], body: bytes | None
                      ) -> tuple[Decision, str | None]:
        try:
            return await self.pipeline.decide(path, headers, body)
        except Exception as e:
            self._decide_failed(repr(e), exc_info=e)
            return self.pipeline.answers.internal_error(), None

    def _respond(self, decided: tuple[Decision, str | None]) -> tuple[Decision, pb.CheckResponse]:
        decision = decided[0]
        try:
            return decision, self.responses.get(decision)
        except Exception as e:
            self._respond_failed(repr(e), exc_info=e)
            return self.pipeline.answers.internal_error(), self._internal
