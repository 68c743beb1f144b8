"""Decision -> envoy.service.auth.v3.CheckResponse (upb protobuf classes from xds-protos).

Envoy semantics this relies on (verified on Envoy 1.40, see README "How Envoy uses the answer"):
- `status.code == 0` allows; any other code denies with `denied_response.status` as the HTTP
  status (UNAUTHENTICATED alone would still be a 403).
- `ok_response.headers` with `append: false` overwrite the request's copies (anti-spoofing).
- `ok_response.response_headers_to_add` reach the client on success.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2
from google.rpc import code_pb2, status_pb2

from ..decision import Decision, Headers

# gRPC status per HTTP deny status: what a reader of Envoy's access log expects to see.
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}
_FALSE = wrappers_pb2.BoolValue(value=False)
_OK_STATUS = status_pb2.Status(code=code_pb2.OK)


def _options(headers: Headers) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append=_FALSE)
        for k, v in headers
    ]


def to_check_response(d: Decision) -> pb.CheckResponse:
    if d.allowed:
        return pb.CheckResponse(
            status=_OK_STATUS,
            ok_response=pb.OkHttpResponse(
                headers=_options(d.upstream_headers),
                headers_to_remove=d.remove_headers,
                response_headers_to_add=_options(d.response_headers),
            ),
        )
    return pb.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(d.status, code_pb2.INTERNAL),
                                 message=d.reason),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=d.status),  # type: ignore[arg-type,unused-ignore]
            headers=_options(d.response_headers),
            body=d.body,
        ),
    )


class ResponseCache:
    """CheckResponses for the decisions that never vary (401s, 400s, public paths).

    Keyed by the Decision object's identity: DecisionMaker returns the same object for those,
    and this cache holds a reference to it, so the id cannot be reused while cached.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Decision, pb.CheckResponse]] = {}

    def get(self, d: Decision) -> pb.CheckResponse:
        hit = self._by_id.get(id(d))
        if hit is not None:
            return hit[1]
        return to_check_response(d)

    def prebuild(self, d: Decision) -> None:
        self._by_id[id(d)] = (d, to_check_response(d))
