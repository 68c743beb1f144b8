"""Redis outages as a client sees them through Envoy, and two replicas sharing one Redis; with
the gRPC provider and with the HTTP one."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz.demo.upstream import ModelStandIn

from .harness import (
    BURST,
    AuthzService,
    Keys,
    Redis,
    ServiceOptions,
    Sidecar,
    bearer,
    new_subject,
    provider_options,
    started,
    wait_for,
)

pytestmark = pytest.mark.envoy

PREDICT = "/v1/models/allowed-a:predict"


@dataclass
class OutageStack:
    keys: Keys
    redis: Redis
    upstream: ModelStandIn
    deny: Sidecar  # in front of a service with store.on_error: deny
    allow: Sidecar  # in front of a service with store.on_error: allow
    protocol: str


@pytest.fixture(scope="module", params=["grpc", "http"])
def outage(request: pytest.FixtureRequest, envoy_bin: Path, work_dir: Path,
           keys: Keys) -> Iterator[OutageStack]:
    protocol: str = request.param
    redis = Redis(work_dir)
    # The production store bound (50 ms) and check timeout (500 ms): the hung-Redis test
    # shows the first answers well inside the second.
    deny_service = AuthzService(
        work_dir,
        keys,
        ServiceOptions(redis_url=redis.url, on_error="deny", store_timeout="50ms"),
        f"authz-deny-{protocol}",
    )
    allow_service = AuthzService(
        work_dir,
        keys,
        ServiceOptions(redis_url=redis.url, on_error="allow", store_timeout="50ms"),
        f"authz-allow-{protocol}",
    )
    upstream = ModelStandIn()
    deny = Sidecar(
        envoy_bin,
        work_dir,
        upstream,
        [deny_service.endpoint(protocol)],
        name=f"envoy-deny-{protocol}",
        timeout=0.5,
        status_on_error=503,
        **provider_options(protocol),
    )
    allow = Sidecar(
        envoy_bin, work_dir, upstream, [allow_service.endpoint(protocol)],
        name=f"envoy-allow-{protocol}", **provider_options(protocol),
    )
    with started(redis, deny_service, allow_service, upstream, deny, allow):
        yield OutageStack(keys, redis, upstream, deny, allow, protocol)


def _degraded_headers(upstream: ModelStandIn, sub: str) -> list[str]:
    for request in reversed(upstream.requests):
        if request.header("x-auth-subject") == [sub]:
            return request.header("x-authz-degraded")
    raise AssertionError(f"no request of {sub} reached the model")


def test_redis_down_follows_the_configured_backend_error_policy(outage: OutageStack) -> None:
    sub = new_subject("grace")
    headers = bearer(outage.keys.token(sub))
    assert outage.deny.request(PREDICT, headers=headers).status == 200
    assert outage.allow.request(PREDICT, headers=headers).status == 200
    assert _degraded_headers(outage.upstream, sub) == []

    outage.redis.stop()
    try:
        denied = outage.deny.request(PREDICT, headers=headers)
        assert denied.status == 503, denied
        if outage.protocol == "grpc":
            # on_error: deny -> the SERVICE's 503 (JSON body, Retry-After), not Envoy's error
            # path (which would be an empty body: the check itself succeeded).
            assert denied.headers.get("retry-after") == "1"
            assert isinstance(denied.json(), dict)
            assert outage.deny.ext_authz_stats().get("error", 0) == 0
        else:
            # Over HTTP every 5xx answer is an error to Envoy: the client gets statusOnError
            # (503 in the shipped registration), empty, without the service's Retry-After or
            # body; under failOpen it would pass (test_http_provider shows it).
            assert denied.body == b"" and "retry-after" not in denied.headers
            assert outage.deny.ext_authz_stats().get("error", 0) >= 1
        # on_error: allow -> through to the model, marked degraded, identity still set.
        allowed = outage.allow.request(PREDICT, headers=headers)
        assert allowed.status == 200, allowed
        assert _degraded_headers(outage.upstream, sub) == ["store-unavailable"]
        # Unauthenticated requests are still refused: an outage opens no door.
        assert outage.allow.request(PREDICT).status == 401
    finally:
        outage.redis.start()

    # Redis is back (same port, empty): the service reconnects by itself.
    def recovered() -> bool:
        return outage.deny.request(PREDICT, headers=headers).status == 200

    wait_for(recovered, 10, "the service to use Redis again")


def test_a_hung_redis_costs_the_store_timeout_not_envoys(outage: OutageStack) -> None:
    headers = bearer(outage.keys.token(new_subject("heidi")))
    outage.redis.proc.signal(signal.SIGSTOP)  # connections stay open, nothing answers
    try:
        denied = outage.deny.request(PREDICT, headers=headers)
    finally:
        outage.redis.proc.signal(signal.SIGCONT)
    assert denied.status == 503, denied
    # The service's own answer within its 50 ms store bound, well inside Envoy's 500 ms check
    # timeout: over gRPC the client gets that answer (JSON body) rather than Envoy's empty
    # error reply; over HTTP the 503 is Envoy's error reply either way, but a prompt one.
    if outage.protocol == "grpc":
        assert isinstance(denied.json(), dict)
    assert denied.elapsed < 0.5


@pytest.fixture(scope="module", params=["grpc", "http"])
def replicas(request: pytest.FixtureRequest, envoy_bin: Path, work_dir: Path,
             keys: Keys) -> Iterator[tuple[Keys, Sidecar]]:
    protocol: str = request.param
    redis = Redis(work_dir)
    services = [
        AuthzService(work_dir, keys, ServiceOptions(redis_url=redis.url),
                     f"authz-replica-{protocol}-{i}")
        for i in (1, 2)
    ]
    upstream = ModelStandIn()
    sidecar = Sidecar(
        envoy_bin,
        work_dir,
        upstream,
        [s.endpoint(protocol) for s in services],
        name=f"envoy-replicas-{protocol}",
        # Deterministic alternation, so both replicas are certainly used.
        lb_policy="ROUND_ROBIN",
        **provider_options(protocol),
    )
    with started(redis, *services, upstream, sidecar):
        yield keys, sidecar


def test_two_replicas_sharing_redis_charge_the_same_buckets(
    replicas: tuple[Keys, Sidecar],
) -> None:
    keys, sidecar = replicas
    for user in ("ivan", "judy"):
        headers = bearer(keys.token(new_subject(user)))
        statuses = [sidecar.request(PREDICT, headers=headers).status for _ in range(BURST + 2)]
        # Separate in-memory buckets would allow 2 x BURST; one shared bucket allows BURST.
        assert statuses == [200] * BURST + [429, 429]
    per_replica = sidecar.requests_per_endpoint()
    assert len(per_replica) == 2
    assert all(count >= BURST for count in per_replica.values()), per_replica
