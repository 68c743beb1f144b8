"""Costs from request bodies through a real Envoy wired as an Istio sidecar whose provider has
includeRequestBodyInCheck: KServe v1 and Open Inference Protocol v2 batches, an OpenAI-style
chat completion, a batch larger than the plan allows, a body cut at maxRequestBytes, a binary
body, on the gRPC and the HTTP provider; and (allowPartialMessage: false) Envoy's own 413."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.demo.upstream import ModelStandIn
from authz.mesh.sidecar import RequestBody

from .harness import (
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

CHAT = "/v1/chat/completions"
MAX_BYTES = 4096
QUOTA = {
    "default_plan": "free",
    "plans": {
        "free": {
            "limits": [{"name": "tokens-per-minute", "rate": 1000, "per": "1m"},
                       {"name": "requests-per-minute", "rate": 5000, "per": "1m",
                        "unit": "requests"}],
            "models": {
                "resnet": {"cost": {"from": "instances"}},
                "iris": {"cost": {"from": "instances", "fallback": 1}},
                "llama-*": {"cost": {"from": "tokens", "default_max_tokens": 50,
                                     "max_tokens": 200}},
            },
        },
    },
}
PATHS = ("/v1/models/*", "/v2/models/*", CHAT)


def _stack(envoy_bin: Path, work_dir: Path, keys: Keys, name: str, body: RequestBody,
           protocol: str = "grpc") -> Iterator[tuple[Sidecar, ModelStandIn]]:
    directory = work_dir / name
    directory.mkdir(exist_ok=True)
    redis = Redis(directory)
    service = AuthzService(directory, keys, ServiceOptions(
        redis_url=redis.url, quota=QUOTA, paths={"llm_routes": [CHAT]}), name)
    upstream = ModelStandIn()
    sidecar = Sidecar(envoy_bin, directory, upstream, [service.endpoint(protocol)],
                      status_on_error=503, paths=PATHS, request_body=body,
                      **provider_options(protocol))
    with started(redis, service, upstream, sidecar):
        yield sidecar, upstream


@pytest.fixture(scope="module", params=["grpc", "http"])
def partial(request: pytest.FixtureRequest, envoy_bin: Path, work_dir: Path, keys: Keys
            ) -> Iterator[tuple[Sidecar, ModelStandIn]]:
    """Bodies up to MAX_BYTES in the check, longer ones cut (allowPartialMessage), on either
    provider (gRPC: packAsBytes, raw_body; HTTP: the check request's own body)."""
    yield from _stack(envoy_bin, work_dir, keys, f"costs-partial-{request.param}",
                      RequestBody(max_request_bytes=MAX_BYTES), request.param)


@pytest.fixture(scope="module")
def strict(envoy_bin: Path, work_dir: Path, keys: Keys) -> Iterator[tuple[Sidecar, ModelStandIn]]:
    yield from _stack(envoy_bin, work_dir, keys, "costs-strict",
                      RequestBody(max_request_bytes=MAX_BYTES, allow_partial_message=False,
                                  pack_as_bytes=False))


def post(sidecar: Sidecar, upstream: ModelStandIn, path: str, token: str, body: bytes
         ) -> tuple[Reply, bytes | None]:
    """The reply and the body the model server received (None: it was never reached)."""
    marker = uuid.uuid4().hex
    reply = sidecar.request(path, method="POST", body=body,
                            headers={"x-e2e-id": marker, "content-type": "application/json",
                                     **bearer(token)})
    got = next((r for r in upstream.requests if r.header("x-e2e-id") == [marker]), None)
    return reply, (got.body if got else None)


def js(value: object) -> bytes:
    return json.dumps(value).encode()


def test_v1_and_v2_batches_are_charged_their_size(partial: tuple[Sidecar, ModelStandIn],
                                                   keys: Keys) -> None:
    sidecar, upstream = partial
    token = keys.token(new_subject("batch"))
    v1 = js({"instances": [[0.1, 0.2, 0.3]] * 30})
    reply, seen = post(sidecar, upstream, "/v1/models/resnet:predict", token, v1)
    assert reply.status == 200 and seen == v1  # the body reaches the model untouched
    assert reply.headers["ratelimit-remaining"] == "970"
    v2 = js({"inputs": [{"name": "x", "shape": [40, 3], "datatype": "FP32",
                         "data": [0.5] * 120}]})
    reply, seen = post(sidecar, upstream, "/v2/models/resnet/infer", token, v2)
    assert reply.status == 200 and seen == v2
    assert reply.headers["ratelimit-remaining"] == "930"


def test_chat_completion_is_charged_tokens_for_the_model_in_its_body(
        partial: tuple[Sidecar, ModelStandIn], keys: Keys) -> None:
    sidecar, upstream = partial
    token = keys.token(new_subject("chat"))
    messages = [{"role": "user", "content": "Say hello in French."}]
    body = js({"model": "llama-3-8b", "messages": messages, "max_tokens": 120})
    reply, seen = post(sidecar, upstream, CHAT, token, body)
    assert reply.status == 200 and seen == body
    prompt = math.ceil(len(json.dumps(messages)) / 4)
    assert reply.headers["ratelimit-remaining"] == str(1000 - 120 - prompt)
    # The model is the body's: one the plan does not list is refused.
    reply, seen = post(sidecar, upstream, CHAT, token, js({"model": "gpt-4o", "messages": []}))
    assert (reply.status, reply.json()["reason"], seen) == (403, "model_not_allowed", None)


def test_a_batch_larger_than_the_plan_allows_is_413(partial: tuple[Sidecar, ModelStandIn],
                                                    keys: Keys) -> None:
    sidecar, upstream = partial
    token = keys.token(new_subject("oversized"))
    reply, seen = post(sidecar, upstream, "/v1/models/resnet:predict", token,
                       js({"instances": [1] * 1001}))
    assert reply.status == 413 and seen is None
    assert reply.json()["reason"] == "cost_exceeds_burst"
    assert reply.json()["limit"] == "tokens-per-minute"
    assert "retry-after" not in reply.headers
    # Nothing was charged: the whole burst is still there for a batch that fits.
    reply, _ = post(sidecar, upstream, "/v1/models/resnet:predict", token,
                    js({"instances": [1] * 1000}))
    assert reply.status == 200


def test_a_body_cut_at_max_request_bytes(partial: tuple[Sidecar, ModelStandIn],
                                         keys: Keys) -> None:
    sidecar, upstream = partial
    token = keys.token(new_subject("partial"))
    big = js({"instances": [[0.123456789] * 10] * 60})
    assert len(big) > MAX_BYTES
    # No fallback: the cut body cannot be counted, 400 names why.
    reply, seen = post(sidecar, upstream, "/v1/models/resnet:predict", token, big)
    assert (reply.status, reply.json()["reason"], seen) == (400, "body_partial", None)
    # With a fallback: charged it, and the model server gets the whole body.
    reply, seen = post(sidecar, upstream, "/v1/models/iris:predict", token, big)
    assert reply.status == 200 and seen == big
    assert reply.headers["ratelimit-remaining"] == "999"


def test_binary_and_missing_bodies(partial: tuple[Sidecar, ModelStandIn], keys: Keys) -> None:
    sidecar, upstream = partial
    token = keys.token(new_subject("binary"))
    reply, seen = post(sidecar, upstream, "/v2/models/resnet/infer", token,
                       bytes(range(256)) * 4)
    assert (reply.status, reply.json()["reason"], seen) == (400, "body_not_json", None)
    reply = sidecar.request("/v1/models/resnet:predict", headers=bearer(token))  # a GET
    assert (reply.status, reply.json()["reason"]) == (400, "body_missing")
    reply = sidecar.request(CHAT, headers=bearer(token))
    assert (reply.status, reply.json()["reason"]) == (400, "body_model_missing")


def test_without_partial_messages_envoy_answers_413_itself(strict: tuple[Sidecar, ModelStandIn],
                                                           keys: Keys) -> None:
    sidecar, upstream = strict
    token = keys.token(new_subject("strict"))
    # packAsBytes: false -- the body arrives as text, counted the same way.
    reply, _ = post(sidecar, upstream, "/v1/models/resnet:predict", token,
                    js({"instances": [1, 2, 3]}))
    assert reply.status == 200 and reply.headers["ratelimit-remaining"] == "997"
    before = sidecar.checks_sent()
    reply, seen = post(sidecar, upstream, "/v1/models/resnet:predict", token,
                       js({"instances": [[0.123456789] * 10] * 60}))
    assert reply.status == 413 and seen is None
    assert sidecar.checks_sent() == before  # the provider was never asked
