"""Envoy's answer when the ext_authz provider itself fails: down, or hanging; for the gRPC
provider and the HTTP one (each test runs with both).

No service runs here: the provider cluster points at a closed port or at a socket that never
answers, which is what a crashed or wedged service looks like to the sidecar.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.demo.processes import free_port
from authz.demo.upstream import ModelStandIn

from .harness import BlackHole, Sidecar, provider_options, started

pytestmark = pytest.mark.envoy

PREDICT = "/v1/models/allowed-a:predict"
# Short, so the hang test is quick; the recommended production value is 0.5 s.
CHECK_TIMEOUT = 0.3


@pytest.fixture(scope="module")
def upstream() -> Iterator[ModelStandIn]:
    with ModelStandIn() as server:
        yield server


@pytest.fixture(params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _sidecar(
    envoy_bin: Path, work_dir: Path, upstream: ModelStandIn, name: str, port: int,
    protocol: str, **options: object
) -> Sidecar:
    return Sidecar(
        envoy_bin,
        work_dir,
        upstream,
        [("127.0.0.1", port)],
        name=f"{name}-{protocol}",
        timeout=CHECK_TIMEOUT,
        **provider_options(protocol),
        **options,
    )


@pytest.mark.parametrize(
    ("status_on_error", "expected"),
    [(503, 503), (None, 403)],
    ids=["recommended-503", "istio-default-403"],
)
def test_provider_down_fails_closed_with_status_on_error(
    envoy_bin: Path,
    work_dir: Path,
    upstream: ModelStandIn,
    status_on_error: int | None,
    expected: int,
    protocol: str,
) -> None:
    closed_port = free_port()  # nothing listens: connection refused, like a crashed service
    sidecar = _sidecar(
        envoy_bin,
        work_dir,
        upstream,
        f"down-{expected}",
        closed_port,
        protocol,
        status_on_error=status_on_error,
    )
    with started(sidecar):
        before = len(upstream.requests_to(PREDICT))
        reply = sidecar.request(
            PREDICT, method="POST", body=b"{}", headers={"authorization": "Bearer whatever"}
        )
        assert reply.status == expected
        # Envoy's own local reply: empty body, nothing from the service. With the 403 default
        # a client cannot tell this from a policy decision; 503 says "try again".
        assert reply.body == b""
        assert len(upstream.requests_to(PREDICT)) == before, "fail-closed must not pass it on"
        assert sidecar.ext_authz_stats().get("error", 0) >= 1
        # Paths outside the CUSTOM rules are not hostage to the provider.
        assert sidecar.request("/health").status == 200


def test_hanging_provider_fails_closed_after_the_timeout(
    envoy_bin: Path,
    work_dir: Path,
    upstream: ModelStandIn,
    protocol: str,
) -> None:
    with BlackHole() as hole:
        sidecar = _sidecar(envoy_bin, work_dir, upstream, "hang", hole.port, protocol,
                           status_on_error=503)
        with started(sidecar):
            reply = sidecar.request(PREDICT, headers={"authorization": "Bearer whatever"})
            assert reply.status == 503
            # Bounded by the configured timeout, not Istio's 600 s default.
            assert CHECK_TIMEOUT * 0.9 <= reply.elapsed < CHECK_TIMEOUT + 5
            stats = sidecar.ext_authz_stats()
            assert stats.get("timeout", 0) + stats.get("error", 0) >= 1


def test_fail_open_lets_requests_through_unchecked(
    envoy_bin: Path,
    work_dir: Path,
    upstream: ModelStandIn,
    protocol: str,
) -> None:
    sidecar = _sidecar(envoy_bin, work_dir, upstream, "fail-open", free_port(), protocol,
                       fail_open=True)
    with started(sidecar):
        forged = {"authorization": "Bearer not-even-a-jwt", "x-auth-subject": "mallory"}
        reply = sidecar.request(PREDICT, method="POST", body=b'{"x": 1}', headers=forged)
        assert reply.status == 200
        received = upstream.requests_to(PREDICT)[-1]
        assert received.body == b'{"x": 1}'
        # The danger of failOpen: with the provider down nothing overwrites identity headers,
        # so a client-forged x-auth-subject reaches the model. Never trust them under failOpen.
        assert received.header("x-auth-subject") == ["mallory"]
        assert sidecar.ext_authz_stats().get("failure_mode_allowed", 0) >= 1
