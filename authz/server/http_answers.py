"""Decision -> the bytes of an HTTP/1.1 answer to Envoy's HTTP ext_authz client.

Envoy semantics this relies on (verified on Envoy 1.40; docs/envoy-contract.md, tests/e2e):
- Only status 200 allows. Every other status below 500 (201, 204 and 299 included) denies: the
  client gets that status, the body, and the headers `allowed_client_headers`
  (Istio: `headersToDownstreamOnDeny`) lets through. A 5xx is an *error*, not a denial: the
  client gets `status_on_error` with an empty body (or the request passes under failOpen).
- On 200, response headers named by `allowed_upstream_headers` (`headersToUpstreamOnAllow`)
  are set on the request to the upstream, overwriting the client's copies; the ones
  `allowed_client_headers_on_success` (`headersToDownstreamOnAllow`) names reach the client.
- On 200, `x-envoy-auth-headers-to-remove` (a comma-separated list) removes request headers
  before the upstream sees them, *after* the sets: a header named there and set is gone, so it
  lists only headers the answer does not set (as `headers_to_remove` on the gRPC edge).

No Date header: the only peer is Envoy, which writes its own on what reaches the client (its
default for denials passes every other header through, so ours would arrive twice).
"""

from __future__ import annotations

import dataclasses
from http import HTTPStatus

from ..decision import Decision, Headers, Outcome
from . import check_flow

REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# The end of an answer's head, per what the connection does next.
END_KEEP_ALIVE = b"\r\n"
END_CLOSE = b"connection: close\r\n\r\n"
# HTTP/1.0 closes after every answer unless the request asked for keep-alive and the answer
# says it too.
END_KEEP_ALIVE_1_0 = b"connection: keep-alive\r\n\r\n"


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # 5xx codes without a name (internal_error_status may be any 5xx)
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")


def _lines(headers: Headers) -> str:
    # Names come from the config loader (token characters) or are constants; values went
    # through decision.header_value (visible ASCII): nothing here can split a header.
    return "".join(f"{k}: {v}\r\n" for k, v in headers)


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """An answer without its last line: `head` + one of the END_* endings + `body`."""

    head: bytes
    body: bytes


def to_answer(d: Decision) -> Answer:
    if d.allowed:
        text = _lines(d.upstream_headers) + _lines(d.response_headers)
        if d.remove_headers:
            text += f"{REMOVE_HEADER}: {','.join(d.remove_headers)}\r\n"
        return Answer(status_line(200) + (text + "content-length: 0\r\n").encode("ascii"), b"")
    body = d.body.encode("utf-8")
    text = _lines(d.response_headers) + f"content-length: {len(body)}\r\n"
    return Answer(status_line(d.status) + text.encode("ascii"), body)


# Answers of the HTTP edge itself, for requests that never reach the pipeline. Same JSON shape
# as the pipeline's 400s; counted in telemetry as invalid requests.
_JSON = (("content-type", "application/json"), ("cache-control", "no-store"))


def edge_error(status: int, reason: str) -> Decision:
    return Decision(False, status, Outcome.INVALID_REQUEST, reason, response_headers=_JSON,
                    body=f'{{"error":"invalid_request","reason":"{reason}"}}')


MALFORMED = edge_error(400, "malformed_http_request")
HEADERS_TOO_LARGE = edge_error(431, "request_headers_too_large")
URI_TOO_LONG = edge_error(414, "request_uri_too_long")
BODY_TOO_LARGE = edge_error(413, "request_body_too_large")
REQUEST_TIMEOUT = edge_error(408, "request_timeout")
OUTSIDE_PREFIX = edge_error(400, "path_outside_check_prefix")
EDGE_ERRORS = (MALFORMED, HEADERS_TOO_LARGE, URI_TOO_LONG, BODY_TOO_LARGE, REQUEST_TIMEOUT,
               OUTSIDE_PREFIX)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class AnswerCache(check_flow.AnswerCache[Answer]):
    """Answers, reused as check_flow.AnswerCache says: an allow's identity part is kept as the
    bytes of its head, and only the RateLimit lines are added."""

    def build(self, d: Decision) -> Answer:
        return to_answer(d)

    def _base(self, allow: Decision) -> bytes:
        return to_answer(allow).head

    def _allow(self, base: bytes, d: Decision) -> Answer:
        if not d.response_headers:
            return Answer(base, b"")
        return Answer(base + _lines(d.response_headers).encode("ascii"), b"")
