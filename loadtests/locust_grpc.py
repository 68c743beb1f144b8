"""Locust scenario: the hot path. Users call Authorization/Check over gRPC, as Envoy does.

Each locust user is one persona (loadtests/personas.py) with its own RS256 token and plan, sending
CheckRequests shaped like an Istio sidecar's. Every call is reported to locust with request type
"grpc" and a name by outcome ("Check allow", "Check 401", "Check 429", "Check grpc UNAVAILABLE"),
so the statistics table reads as a breakdown of the service's answers. An answer the persona
should not get (a 401 for a valid token, any 5xx, a gRPC error) is reported as a failure.

    locust -f loadtests/locust_grpc.py --headless -u 200 -r 50 -t 60s \
        --world loadtests/results/world --grpc-target 127.0.0.1:9000 \
        --csv loadtests/results/grpc

The world (signing key, JWKS, quota) must be the one the service was started with:
`python -m loadtests.stack --world loadtests/results/world` starts both.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

# locust imports this file by path; make the repository root importable for `loadtests.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import grpc.experimental.gevent as grpc_gevent
from envoy.service.auth.v3 import external_auth_pb2
from locust import User, constant_throughput, events, task
from locust.exception import StopUser

from loadtests.personas import Persona, add_population_options, cast_from_options
from loadtests.population import CHECK_METHOD, check_request, model_path

# grpcio's own threads must cooperate with gevent, or every call blocks a locust worker.
grpc_gevent.init_gevent()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    add_population_options(parser)
    parser.add_argument("--grpc-target", default="127.0.0.1:9000", help="service HOST:PORT")
    parser.add_argument("--grpc-channels", type=int, default=8,
                        help="separate connections to spread over the service's workers")
    parser.add_argument("--check-timeout", type=float, default=1.0,
                        help="seconds; Envoy's check timeout is typically 0.2-1 s")


_state: dict[str, Any] = {}


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    _state["cast"] = cast_from_options(opts)
    # Each channel gets its own subchannel pool, so each is its own TCP connection (grpc-core
    # otherwise shares one connection between channels to the same target).
    _state["calls"] = [
        grpc.insecure_channel(opts.grpc_target,
                              options=[("grpc.use_local_subchannel_pool", 1)]).unary_unary(
            CHECK_METHOD, request_serializer=None, response_deserializer=None)
        for _ in range(max(1, opts.grpc_channels))
    ]
    _state["timeout"] = opts.check_timeout


def outcome_of(resp: external_auth_pb2.CheckResponse) -> int:
    """The HTTP status the client would get: 200 on allow, else the denied status."""
    return 200 if resp.status.code == 0 else int(resp.denied_response.status.code)


class GrpcCheckUser(User):
    """One persona calling Check directly."""

    def wait_time(self) -> float:  # type: ignore[override]
        return self._wait(self)

    def on_start(self) -> None:
        if "cast" not in _state:
            raise StopUser()
        self.persona: Persona = _state["cast"].next()
        self._wait = constant_throughput(self.persona.rate)
        self._rng = random.Random(self.persona.index)
        calls = _state["calls"]
        self._call = calls[self.persona.index % len(calls)]

    @task
    def check(self) -> None:
        req = check_request(self.persona.authorization, path=model_path(self._rng))
        body = req.SerializeToString()
        started = time.perf_counter()
        exc: Exception | None = None
        length = 0
        try:
            raw = self._call(body, timeout=_state["timeout"])
            length = len(raw)
            status = outcome_of(external_auth_pb2.CheckResponse.FromString(raw))
            name = "Check allow" if status == 200 else f"Check {status}"
            if status not in self.persona.expected():
                exc = AssertionError(f"{self.persona.kind} user got {status}")
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "ERROR"
            name = f"Check grpc {code}"
            exc = e
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exc,
            context={"persona": self.persona.kind},
        )
