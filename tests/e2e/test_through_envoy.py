"""The service as Envoy's ext_authz provider, configured as an Istio sidecar would be, once per
protocol: every test runs with the gRPC provider and again with the HTTP one.

client --HTTP/1.1--> Envoy (RBAC shadow + ext_authz, generated config) --gRPC or HTTP--> authz
                        \\--> model stand-in (echoes what it received)                  serve
authz serve keeps its buckets in a real redis-server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz.demo.upstream import ModelStandIn, Received

from .harness import (
    BURST,
    ISSUER,
    AuthzService,
    Keys,
    Redis,
    Reply,
    ServiceOptions,
    Sidecar,
    bearer,
    new_subject,
    provider_options,
    started,
)

pytestmark = pytest.mark.envoy

PREDICT = "/v1/models/allowed-a:predict"
INFER_V2 = "/v2/models/allowed-a/infer"


@dataclass
class Stack:
    keys: Keys
    upstream: ModelStandIn
    sidecar: Sidecar
    service: AuthzService
    protocol: str

    def send(
        self,
        path: str,
        token: str | None = None,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[Reply, str]:
        """Send through Envoy with a marker header; returns the reply and the marker."""
        marker = uuid.uuid4().hex
        all_headers = {"x-e2e-id": marker, **(headers or {})}
        if token is not None:
            all_headers.update(bearer(token))
        reply = self.sidecar.request(path, method=method, body=body, headers=all_headers)
        return reply, marker

    def received(self, marker: str) -> Received | None:
        """What the model stand-in received for this marker, if anything."""
        for request in self.upstream.requests:
            if request.header("x-e2e-id") == [marker]:
                return request
        return None


@pytest.fixture(scope="module", params=["grpc", "http"])
def stack(request: pytest.FixtureRequest, envoy_bin: Path, work_dir: Path,
          keys: Keys) -> Iterator[Stack]:
    protocol: str = request.param
    redis = Redis(work_dir)
    service = AuthzService(work_dir, keys, ServiceOptions(redis_url=redis.url),
                           f"authz-{protocol}")
    upstream = ModelStandIn()
    sidecar = Sidecar(
        envoy_bin, work_dir, upstream, [service.endpoint(protocol)], name=f"envoy-{protocol}",
        status_on_error=503, **provider_options(protocol),
    )
    with started(redis, service, upstream, sidecar):
        yield Stack(keys, upstream, sidecar, service, protocol)


def _checks(stack: Stack) -> tuple[int, dict[str, int]]:
    """(requests sent to the provider cluster, ext_authz decisions by outcome)."""
    stats = stack.sidecar.ext_authz_stats()
    stats.pop("disabled", None)  # requests the filter skipped: not checks
    return stack.sidecar.checks_sent(), stats


def _skipped(stack: Stack) -> int:
    """Requests for which filter_enabled_metadata switched ext_authz off."""
    return stack.sidecar.ext_authz_stats().get("disabled", 0)


def test_valid_token_reaches_the_model_with_identity_headers_not_forged_ones(
    stack: Stack,
) -> None:
    sub = new_subject("alice")
    payload = {
        "instances": [[1.0, 2.5], [3, 4]],
        "parameters": {"note": 'héllo ✓ "quoted" \\ back', "nested": {"a": None, "b": True}},
        # ~100 KB: the body must stream through untouched (ext_authz here does not buffer it).
        "padding": "x" * 100_000,
    }
    body = json.dumps(payload, ensure_ascii=False).encode()
    forged = {
        "x-auth-subject": "mallory",
        "x-auth-issuer": "https://evil.example",
        "x-auth-plan": "unlimited",
        "x-authz-degraded": "store-unavailable",
        "content-type": "application/json",
    }
    reply, marker = stack.send(
        PREDICT, stack.keys.token(sub), method="POST", body=body, headers=forged
    )
    assert reply.status == 200, reply
    received = stack.received(marker)
    assert received is not None
    # Overwritten, not appended: exactly one value each, the verified one.
    assert received.header("x-auth-subject") == [sub]
    assert received.header("x-auth-issuer") == [ISSUER]
    assert received.header("x-auth-plan") == ["free"]
    assert received.header("x-authz-degraded") == []
    assert received.body == body
    assert json.loads(received.body) == payload
    # The client sees its budget (IETF RateLimit headers) on success.
    assert reply.headers["ratelimit-limit"] == str(BURST)
    assert reply.headers["ratelimit-remaining"] == str(BURST - 1)
    assert int(reply.headers["ratelimit-reset"]) >= 0
    assert reply.json()["model_server"] == "stand-in"


@pytest.mark.parametrize(
    "case", ["missing", "not-a-jwt", "bad-signature", "expired", "wrong-audience", "basic-auth"]
)
def test_missing_or_bad_token_is_401_with_a_challenge(stack: Stack, case: str) -> None:
    keys = stack.keys
    sub = new_subject("eve")
    headers: dict[str, str] = {}
    token = {
        "missing": None,
        "not-a-jwt": "abc.def",
        "bad-signature": keys.forged_token(sub),
        "expired": keys.token(sub, ttl=-120),
        "wrong-audience": keys.token(sub, audience="another-api"),
        "basic-auth": None,
    }[case]
    if case == "basic-auth":
        headers["authorization"] = "Basic YWxpY2U6c2VjcmV0"
    reply, marker = stack.send(PREDICT, token, method="POST", body=b"{}", headers=headers)
    assert reply.status == 401, reply
    assert reply.headers["www-authenticate"].startswith("Bearer"), reply.headers
    assert reply.headers["content-type"].startswith("application/json")
    assert isinstance(reply.json(), dict)
    assert stack.received(marker) is None, "a 401 must not reach the model"


def test_model_outside_the_plan_is_403(stack: Stack) -> None:
    token = stack.keys.token(new_subject("bob"))
    reply, marker = stack.send("/v1/models/secret-model:predict", token, method="POST", body=b"{}")
    assert reply.status == 403, reply
    assert isinstance(reply.json(), dict)
    assert stack.received(marker) is None


def test_burst_past_the_limit_is_429_then_allowed_after_retry_after(stack: Stack) -> None:
    token = stack.keys.token(new_subject("carol"))
    statuses = [stack.send(PREDICT, token)[0].status for _ in range(BURST)]
    assert statuses == [200] * BURST
    reply, marker = stack.send(PREDICT, token)
    assert reply.status == 429, reply
    assert stack.received(marker) is None
    retry_after = int(reply.headers["retry-after"])
    # One token per 2 s in the e2e quota: the wait is 1..2 s, never 0 and never minutes.
    assert 1 <= retry_after <= 2
    assert reply.headers["ratelimit-remaining"] == "0"
    assert isinstance(reply.json(), dict)
    time.sleep(retry_after)
    again, marker = stack.send(PREDICT, token)
    assert again.status == 200, again
    assert stack.received(marker) is not None


@pytest.mark.parametrize(
    "path", ["/health", "/ready", "/v2/health/ready", "/metrics", "/v3/models/x:predict"]
)
def test_paths_outside_the_custom_rules_never_reach_the_service(stack: Stack, path: str) -> None:
    before, skipped = _checks(stack), _skipped(stack)
    reply, marker = stack.send(path)  # no token
    assert reply.status == 200, reply
    received = stack.received(marker)
    assert received is not None and received.path == path
    assert received.header("x-auth-subject") == []
    assert _checks(stack) == before, "the RBAC shadow gate must skip ext_authz here"
    assert _skipped(stack) == skipped + 1


def test_protected_paths_do_reach_the_service(stack: Stack) -> None:
    # The counterpart of the test above: the counters it relies on do move.
    sent_before, stats_before = _checks(stack)
    reply, _ = stack.send(PREDICT)
    assert reply.status == 401
    sent_after, stats_after = _checks(stack)
    assert sent_after == sent_before + 1
    assert stats_after.get("denied", 0) == stats_before.get("denied", 0) + 1


def test_query_strings_do_not_change_the_bucket(stack: Stack) -> None:
    token = stack.keys.token(new_subject("dave"))
    remaining = []
    for query in ("?a=1", "?a=2", "?verbose=true&x=%2F"):
        reply, _ = stack.send(PREDICT + query, token)
        assert reply.status == 200, reply
        remaining.append(int(reply.headers["ratelimit-remaining"]))
    assert remaining == [BURST - 1, BURST - 2, BURST - 3]
    reply, _ = stack.send(PREDICT + "?cache-buster=" + uuid.uuid4().hex, token)
    assert reply.status == 429


def test_v2_infer_is_checked_and_limited_like_v1(stack: Stack) -> None:
    sub = new_subject("erin")
    token = stack.keys.token(sub)
    assert stack.send(INFER_V2)[0].status == 401  # v2 needs a token too
    first, marker = stack.send(INFER_V2, token, method="POST", body=b'{"inputs": []}')
    assert first.status == 200
    received = stack.received(marker)
    assert received is not None and received.header("x-auth-subject") == [sub]
    # v1 and v2 calls charge the same per-user bucket.
    assert stack.send(PREDICT, token)[0].status == 200
    assert stack.send(INFER_V2, token)[0].status == 200
    limited, _ = stack.send(INFER_V2, token)
    assert limited.status == 429
    assert "retry-after" in limited.headers
    # Model rules apply to v2 paths too (a fresh user, so the bucket is not the reason).
    other = stack.keys.token(new_subject("erin2"))
    assert stack.send("/v2/models/secret-model/infer", other)[0].status == 403


def test_dot_segments_are_normalized_before_the_gate(stack: Stack) -> None:
    # normalize_path: /health/../v1/models/... is /v1/models/... for RBAC and ext_authz alike.
    reply, marker = stack.send("/health/../v1/models/allowed-a:predict")
    assert reply.status == 401
    assert stack.received(marker) is None


@pytest.mark.parametrize(
    "path", ["/v1//models/allowed-a:predict", "/v1/models%2Fallowed-a:predict"]
)
def test_double_and_escaped_slashes_skip_the_gate_unless_normalized(
    stack: Stack, envoy_bin: Path, work_dir: Path, path: str
) -> None:
    # Istio's default pathNormalization (BASE) keeps "//" and "%2F": the CUSTOM rule does not
    # match and the request reaches the model unchecked (a model server that merges or decodes
    # them serves it). Istio's documented behaviour; this pins it.
    before, skipped = _checks(stack), _skipped(stack)
    reply, marker = stack.send(path)
    assert reply.status == 200
    received = stack.received(marker)
    assert received is not None and received.path == path
    assert _checks(stack) == before
    assert _skipped(stack) == skipped + 1
    # meshConfig.pathNormalization DECODE_AND_MERGE_SLASHES closes both gaps.
    name = f"envoy-decode-{uuid.uuid4().hex[:6]}"
    normalizing = Sidecar(
        envoy_bin,
        work_dir,
        stack.upstream,
        [stack.service.endpoint(stack.protocol)],
        name=name,
        path_normalization="DECODE_AND_MERGE_SLASHES",
        **provider_options(stack.protocol),
    )
    with started(normalizing):
        assert normalizing.request(path).status == 401
        token = stack.keys.token(new_subject("frank"))
        assert normalizing.request(path, headers=bearer(token)).status == 200
        assert stack.upstream.requests[-1].path == PREDICT
