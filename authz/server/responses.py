"""Decision -> envoy.service.auth.v3.CheckResponse (upb protobuf classes from xds-protos).

Envoy semantics this relies on (verified on Envoy 1.40; docs/envoy-contract.md, tests/e2e):
- `status.code == 0` allows; any other code denies with `denied_response.status` as the HTTP
  status (UNAUTHENTICATED alone would still be a 403).
- `ok_response.headers` with `append: false` overwrite the request's copies (anti-spoofing).
- `ok_response.response_headers_to_add` reach the client on success.
"""

from __future__ import annotations

from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.rpc import code_pb2

from ..decision import Decision, Headers
from .check_flow import AnswerCache

# gRPC status per HTTP deny status: what a reader of Envoy's access log expects to see.
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def _add(field: Any, headers: Headers) -> None:
    # Field-by-field `.add()` is ~4x cheaper than building HeaderValueOption(...) objects with
    # keyword arguments and copying them in (measured: 8.7 us vs 35 us for six headers).
    for k, v in headers:
        option = field.add()
        option.header.key = k
        option.header.value = v
        option.append.value = False


def to_check_response(d: Decision) -> pb.CheckResponse:
    r = pb.CheckResponse()
    if d.allowed:
        r.status.code = code_pb2.OK
        ok = r.ok_response
        _add(ok.headers, d.upstream_headers)
        ok.headers_to_remove.extend(d.remove_headers)
        _add(ok.response_headers_to_add, d.response_headers)
        return r
    r.status.code = _GRPC_CODE.get(d.status, code_pb2.INTERNAL)
    r.status.message = d.reason
    denied = r.denied_response
    denied.status.code = d.status  # type: ignore[assignment,unused-ignore]
    _add(denied.headers, d.response_headers)
    denied.body = d.body
    return r


class ResponseCache(AnswerCache[pb.CheckResponse]):
    """CheckResponses, reused as check_flow.AnswerCache says. What is kept is serialized: 10k
    built CheckResponses take ~15 MB (upb keeps an arena and the Python wrappers of every
    sub-message), their bytes ~1.5 MB, and FromString (~1.0 us) is as fast as CopyFrom from a
    kept message (~1.1 us)."""

    def build(self, d: Decision) -> pb.CheckResponse:
        return to_check_response(d)

    def _base(self, allow: Decision) -> bytes:
        return to_check_response(allow).SerializeToString()  # type: ignore[no-any-return]

    def _allow(self, base: bytes, d: Decision) -> pb.CheckResponse:
        r = pb.CheckResponse.FromString(base)
        _add(r.ok_response.response_headers_to_add, d.response_headers)
        return r

    def _keep(self, answer: pb.CheckResponse) -> bytes:
        return answer.SerializeToString()  # type: ignore[no-any-return]

    def _unkeep(self, kept: bytes) -> pb.CheckResponse:
        return pb.CheckResponse.FromString(kept)
