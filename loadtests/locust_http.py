"""Locust scenario: the hot path over the HTTP edge. Users send the check requests Envoy's HTTP
ext_authz client sends (Istio's envoyExtAuthzHttp provider) straight to the service.

Each locust user is one persona (loadtests/personas.py) with its own RS256 token and plan. A
check request is the client's own method and path under the provider's pathPrefix, with
`authorization`, the trace header and the two headers Envoy adds, and no body. Answers are
named by outcome ("Check allow", "Check 401", "Check 429"), as in the gRPC scenario, so the two
tables compare row for row. An answer the persona should not get (a 401 for a valid token, any
5xx, an allow without the persona's own x-auth-subject) is a failure.

    python -m loadtests.stack --world loadtests/results/world     # prints the HTTP edge's URL
    locust -f loadtests/locust_http.py --headless -u 200 -r 50 -t 60s \
        --host http://127.0.0.1:8000 --world loadtests/results/world \
        --csv loadtests/results/http
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

# locust imports this file by path; make the repository root importable for `loadtests.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locust import FastHttpUser, constant_throughput, events, task
from locust.exception import StopUser

from loadtests.personas import Persona, add_population_options, cast_from_options
from loadtests.population import HTTP_PATH_PREFIX, http_check_headers, model_path


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    add_population_options(parser)
    parser.add_argument("--path-prefix", default=HTTP_PATH_PREFIX,
                        help="the provider's pathPrefix (= the service's server.http_path_prefix)")
    parser.add_argument("--check-timeout", type=float, default=1.0,
                        help="seconds; Envoy's check timeout is typically 0.2-1 s")


_state: dict[str, Any] = {}


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    _state["cast"] = cast_from_options(opts)
    _state["prefix"] = opts.path_prefix
    _state["timeout"] = opts.check_timeout


class HttpCheckUser(FastHttpUser):
    """One persona whose requests Envoy checks over HTTP."""

    def wait_time(self) -> float:  # type: ignore[override]
        return self._wait(self)

    def on_start(self) -> None:
        if "cast" not in _state:
            raise StopUser()
        self.persona: Persona = _state["cast"].next()
        self._wait = constant_throughput(self.persona.rate)
        self._rng = random.Random(self.persona.index)
        self._headers = http_check_headers(self.persona.authorization)
        self.client.network_timeout = self.client.connection_timeout = _state["timeout"]

    @task
    def check(self) -> None:
        path = _state["prefix"] + model_path(self._rng)
        with self.client.post(path, headers=self._headers, catch_response=True) as resp:
            status = resp.status_code
            resp.request_meta["name"] = "Check allow" if status == 200 else f"Check {status}"
            if status not in self.persona.expected():
                resp.failure(f"{self.persona.kind} user got {status}: {(resp.text or '')[:200]}")
                return
            if status == 200 and resp.headers.get("x-auth-subject") != self.persona.subject:
                resp.failure(f"allowed as {resp.headers.get('x-auth-subject')!r}, "
                             f"expected {self.persona.subject!r}")
                return
            resp.success()
