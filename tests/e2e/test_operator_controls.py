"""Shadow mode and the RateLimit field styles as a client and a model server see them, through
a real Envoy wired as an Istio sidecar."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.demo.upstream import ModelStandIn

from .harness import (
    AuthzService,
    Keys,
    Redis,
    ServiceOptions,
    Sidecar,
    bearer,
    new_subject,
    started,
)

pytestmark = pytest.mark.envoy

QUOTA = {
    "default_plan": "free",
    "plans": {
        "free": {"limits": [{"name": "per-day", "rate": 100, "per": "1d"},
                            {"name": "per-minute", "rate": 2, "per": "1m", "shadow": True}],
                 "models": {"allowed-*": {}}},
    },
}
PREDICT = "/v1/models/allowed-a:predict"


def _stack(envoy_bin: Path, work_dir: Path, keys: Keys, name: str,
           headers: dict[str, str]) -> Iterator[tuple[Sidecar, ModelStandIn]]:
    redis = Redis(work_dir)
    service = AuthzService(work_dir, keys, ServiceOptions(redis_url=redis.url, quota=QUOTA,
                                                          headers=headers), name)
    upstream = ModelStandIn()
    sidecar = Sidecar(envoy_bin, work_dir, upstream, [("127.0.0.1", service.port)],
                      status_on_error=503)
    with started(redis, service, upstream, sidecar):
        yield sidecar, upstream


@pytest.fixture(scope="module")
def triple(envoy_bin: Path, work_dir: Path, keys: Keys) -> Iterator[tuple[Sidecar, ModelStandIn]]:
    yield from _stack(envoy_bin, work_dir, keys, "authz-triple", {})


@pytest.fixture(scope="module")
def structured(envoy_bin: Path, work_dir: Path, keys: Keys
               ) -> Iterator[tuple[Sidecar, ModelStandIn]]:
    directory = work_dir / "structured"
    directory.mkdir(exist_ok=True)
    yield from _stack(envoy_bin, directory, keys, "authz-structured",
                      {"ratelimit_style": "structured"})


def _send(sidecar: Sidecar, upstream: ModelStandIn, token: str,
          extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], list[str]]:
    marker = uuid.uuid4().hex
    reply = sidecar.request(PREDICT, headers={"x-e2e-id": marker, **bearer(token),
                                              **(extra or {})})
    got = next((r for r in upstream.requests if r.header("x-e2e-id") == [marker]), None)
    return reply.status, reply.headers, (got.header("x-authz-shadow") if got else [])


def test_shadow_limit_lets_the_would_be_429_through_marked(
        triple: tuple[Sidecar, ModelStandIn], keys: Keys) -> None:
    sidecar, upstream = triple
    token = keys.token(new_subject("shadow"))
    forged = {"x-authz-shadow": "forged"}
    seen = [_send(sidecar, upstream, token, forged) for _ in range(4)]
    assert [s for s, _, _ in seen] == [200, 200, 200, 200]  # nothing refused
    # The model server learns which requests enforcement would have refused; a client's own
    # x-authz-shadow never reaches it.
    assert [m for _, _, m in seen] == [[], [], ["rate_limited"], ["rate_limited"]]
    # The client sees an ordinary allow with its (triple) RateLimit fields.
    assert seen[3][1]["ratelimit-limit"] == "2" and "retry-after" not in seen[3][1]


def test_structured_ratelimit_fields_reach_the_client(
        structured: tuple[Sidecar, ModelStandIn], keys: Keys) -> None:
    sidecar, upstream = structured
    status, headers, _ = _send(sidecar, upstream, keys.token(new_subject("fields")))
    assert status == 200
    assert headers["ratelimit-policy"] == '"per-day";q=100;w=86400, "per-minute";q=2;w=60'
    assert headers["ratelimit"] == '"per-minute";r=1;t=30'
    assert "ratelimit-limit" not in headers
