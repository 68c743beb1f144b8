"""The gRPC edge: envoy.service.auth.v3.Authorization/Check.

Reads what the decision needs from the CheckRequest (the path, the headers, the body when the
provider includes it) and hands it to the check flow both edges share (check_flow.py: the
pipeline's decision, telemetry, and always a CheckResponse: an exception escaping the handler
would reach Envoy as an RPC error, a bare 403 when failOpen is false or a silent allow when it
is true).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ..pipeline import CheckPipeline
from .check_flow import CheckFlow
from .responses import ResponseCache

if TYPE_CHECKING:
    from ..telemetry.protocol import CheckTelemetry


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
        self.flow = CheckFlow(pipeline, telemetry, ResponseCache())

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        http = request.attributes.request.http
        headers = request_headers(http)
        # The path as Envoy saw it: the attribute, or the :path pseudo-header.
        path = http.path or headers.get(":path", "")
        return await self.flow.check(path, headers, request_body(http))
