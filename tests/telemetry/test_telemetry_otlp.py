"""OTLP export end to end: a real process configured only through OTEL_* variables exports to a
local receiver, over HTTP/protobuf and gRPC.

The process also proves the global installation: the child span is started the way the Redis
store does it (`trace.get_tracer(__name__)`, no provider passed) and must nest under the check
span. It runs in a subprocess because the global TracerProvider can be set once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.telemetry.conftest import PARENT_SPAN_ID, TRACE_ID, TRACEPARENT
from tests.telemetry.otlp_sink import grpc_sink, http_sink

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    f"""
    from opentelemetry import trace
    from authz.config.settings import ServerSettings, Settings
    from authz.decision import Decision, Outcome
    from authz.telemetry import Telemetry

    store_tracer = trace.get_tracer("authz.buckets.redis")  # before setup, like a module global
    telemetry = Telemetry.from_settings(Settings(server=ServerSettings(metrics_port=0)))
    scope = telemetry.start_check({{"traceparent": "{TRACEPARENT}", ":path": "/v1/models/m"}})
    with scope:
        with store_tracer.start_as_current_span("redis.charge"):
            pass
    telemetry.observe_store_call(0.0002, True)
    telemetry.finish_check(scope, Decision(
        allowed=False, status=429, outcome=Outcome.RATE_LIMITED, reason="rate_limited",
        plan="free", model="*", limit="per-minute"), "user-1")
    telemetry.shutdown()  # flushes spans and the final metric collection
    print("child done")
    """
)


@pytest.mark.parametrize(
    ("protocol", "sink"), [("http/protobuf", http_sink), ("grpc", grpc_sink)], ids=["http", "grpc"]
)
def test_spans_and_metrics_reach_an_otlp_receiver(protocol: str, sink: object) -> None:
    with sink() as (endpoint, received):  # type: ignore[operator]
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith("OTEL_") and k != "AUTHZ_WORKER_INDEX"
        }
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_SERVICE_NAME="authz-under-test",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=ci",
            PYTHONPATH=str(REPO),
        )
        proc = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "child done" in proc.stdout

        spans = {s.name: s for s in received.spans()}
        check = spans["envoy.service.auth.v3.Authorization/Check"]
        child = spans["redis.charge"]
        assert check.trace_id.hex() == TRACE_ID
        assert check.parent_span_id.hex() == PARENT_SPAN_ID
        assert child.trace_id == check.trace_id
        assert child.parent_span_id == check.span_id
        attrs = {kv.key: kv.value for kv in check.attributes}
        assert attrs["authz.decision"].string_value == "rate_limited"
        assert attrs["authz.limit"].string_value == "per-minute"
        assert attrs["authz.status"].int_value == 429
        resource = received.resources()[0]
        assert resource["service.name"] == "authz-under-test"
        assert resource["deployment.environment"] == "ci"

        names = received.metric_names()
        assert {"authz.decisions", "rpc.server.call.duration", "authz.store.duration",
                "authz.checks.inflight"} <= names
        [duration] = received.metric("rpc.server.call.duration")
        assert duration.unit == "s"
        assert duration.histogram.data_points[-1].count == 1
        [decisions] = received.metric("authz.decisions")
        point = decisions.sum.data_points[0]
        assert point.as_int == 1 or point.as_double == 1
