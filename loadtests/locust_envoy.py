"""Locust scenario: the whole path. Users call the model API over HTTP through Envoy.

Envoy runs as the Istio sidecar would (authz/mesh/sidecar.py): its ext_authz filter asks the
service, then routes allowed requests to the model stand-in, which echoes what it received. The
same personas as the gRPC scenario (loadtests/personas.py) send inference requests; each request
is named by outcome ("POST /v1|v2/models [200]", "[401]", "[429]") and an answer the persona
should not get is a failure. On a 200 the scenario also checks that the model saw the identity
header the service set (x-auth-subject) for this persona, not someone else's.

    python -m loadtests.stack --world loadtests/results/world      # prints the Envoy URL
    locust -f loadtests/locust_envoy.py --headless -u 100 -r 20 -t 60s \
        --host http://127.0.0.1:15006 --world loadtests/results/world \
        --csv loadtests/results/envoy
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

# locust imports this file by path; make the repository root importable for `loadtests.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locust import FastHttpUser, constant_throughput, events, task
from locust.exception import StopUser

from loadtests.personas import Persona, add_population_options, cast_from_options
from loadtests.population import model_path

# A small KServe/OIP-style inference payload.
PAYLOAD = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                  "data": [0.1, 0.2, 0.3, 0.4]}]})


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    add_population_options(parser)


_state: dict[str, Any] = {}


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    _state["cast"] = cast_from_options(opts)


class EnvoyInferenceUser(FastHttpUser):
    """One persona calling the model API through Envoy."""

    def wait_time(self) -> float:  # type: ignore[override]
        return self._wait(self)

    def on_start(self) -> None:
        if "cast" not in _state:
            raise StopUser()
        self.persona: Persona = _state["cast"].next()
        self._wait = constant_throughput(self.persona.rate)
        self._rng = random.Random(self.persona.index)
        self._headers = {"content-type": "application/json"}
        if self.persona.authorization is not None:
            self._headers["authorization"] = self.persona.authorization

    @task
    def infer(self) -> None:
        path = model_path(self._rng)
        group = path.split("/models/", 1)[0]  # /v1 or /v2: bounded names in the stats table
        with self.client.post(path, data=PAYLOAD, headers=self._headers,
                              catch_response=True) as resp:
            status = resp.status_code
            resp.request_meta["name"] = f"POST {group}/models [{status}]"
            if status not in self.persona.expected():
                resp.failure(f"{self.persona.kind} user got {status}: {(resp.text or '')[:200]}")
                return
            if status == 200:
                try:
                    seen = json.loads(resp.text or "{}").get("headers", {}).get("x-auth-subject")
                except ValueError:
                    seen = None
                if seen != self.persona.subject:
                    resp.failure(f"model saw x-auth-subject {seen!r}, "
                                 f"expected {self.persona.subject!r}")
                    return
            resp.success()
