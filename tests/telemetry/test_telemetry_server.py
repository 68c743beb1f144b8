"""Through the real service: `authz serve` in its own process, a real gRPC Check (and an HTTP
check request on the HTTP edge) carrying a `traceparent`, spans to a local OTLP receiver,
metrics from the scrape endpoint, deny lines on stderr. Only token-free requests (401 and a
public path), so nothing here depends on how tokens are issued.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from authz.demo.processes import free_port
from tests.telemetry.conftest import PARENT_SPAN_ID, TRACE_ID, TRACEPARENT
from tests.telemetry.otlp_sink import Received, http_sink

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # a cold interpreter importing grpc + the SDK on a loaded CI machine


class Service:
    def __init__(self, proc: subprocess.Popen[bytes], grpc_port: int, metrics_port: int,
                 stderr: Path, received: Received, http_port: int = 0) -> None:
        self.proc = proc
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.stderr = stderr
        self.received = received

    def check(self, path: str, headers: dict[str, str]) -> pb.CheckResponse:
        request = pb.CheckRequest()
        http = request.attributes.request.http
        http.path, http.method, http.host = path, "POST", "models.example.com"
        http.headers.update({":path": path, ":method": "POST", **headers})
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            response: pb.CheckResponse = pb_grpc.AuthorizationStub(channel).Check(
                request, timeout=10
            )
            return response

    def http_check(self, path: str, headers: dict[str, str]) -> int:
        """One check request on the HTTP edge, as Envoy's HTTP client sends it; the status."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request("POST", path, headers={"content-length": "0", **headers})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return {
            (s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                  if not k.startswith("otel_scope")))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "grpc_port": grpc_port, "metrics_port": metrics_port,
                   "http_port": http_port, "drain_delay": "0s", "shutdown_grace": "2s"},
    }))
    stderr = tmp_path / "stderr.log"
    with http_sink() as (endpoint, received), stderr.open("wb") as err:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OTEL_", "AUTHZ_"))}
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
            PYTHONPATH=str(REPO),
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--dev", "--config", str(config)],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )
        svc = Service(proc, grpc_port, metrics_port, stderr, received, http_port)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                while True:
                    assert proc.poll() is None, stderr.read_text()
                    try:
                        grpc.channel_ready_future(channel).result(timeout=0.5)
                        break
                    except grpc.FutureTimeoutError:
                        assert time.monotonic() < deadline, "service did not start"
            yield svc
        finally:
            svc.stop()


def test_a_check_with_traceparent_is_traced_counted_and_logged(service: Service) -> None:
    denied = service.check("/v1/models/iris:predict", {"traceparent": TRACEPARENT})
    assert denied.denied_response.status.code == 401
    public = service.check("/healthz", {})
    assert public.status.code == 0

    samples = service.scrape()
    decisions = {dict(labels)["outcome"]: v for (name, labels), v in samples.items()
                 if name == "authz_decisions_total"}
    assert decisions == {"unauthenticated": 1, "public_path": 1}
    rpc = (("rpc_method", "Check"), ("rpc_service", "envoy.service.auth.v3.Authorization"),
           ("rpc_system", "grpc"))
    assert samples[("rpc_server_call_duration_seconds_count", rpc)] == 2
    assert samples[("authz_checks_inflight", ())] == 0

    service.stop()  # flushes the span processor
    spans = [s for s in service.received.spans()
             if s.name == "envoy.service.auth.v3.Authorization/Check"]
    traced = [s for s in spans if s.trace_id.hex() == TRACE_ID]
    assert len(traced) == 1
    assert traced[0].parent_span_id.hex() == PARENT_SPAN_ID
    attrs = {kv.key: kv.value.string_value for kv in traced[0].attributes}
    assert attrs["authz.decision"] == "unauthenticated"
    assert attrs["authz.reason"] == "missing_token"

    log_lines = [json.loads(line) for line in service.stderr.read_text().splitlines()
                 if line.startswith("{")]
    [deny] = [x for x in log_lines if x.get("logger") == "authz.deny"]
    assert deny["status"] == 401 and deny["trace_id"] == TRACE_ID
    [effective] = [x for x in log_lines if x.get("msg") == "effective configuration"]
    assert effective["settings"]["server"]["metrics_port"] == service.metrics_port


def test_an_http_edge_check_is_traced_counted_and_logged_the_same(service: Service) -> None:
    assert service.http_check("/v1/models/iris:predict", {"traceparent": TRACEPARENT}) == 401
    assert service.http_check("/healthz", {}) == 200

    samples = service.scrape()
    decisions = {dict(labels)["outcome"]: v for (name, labels), v in samples.items()
                 if name == "authz_decisions_total"}
    assert decisions == {"unauthenticated": 1, "public_path": 1}  # the same counter
    http_attrs = (("network_protocol_name", "http"), ("url_scheme", "http"))
    assert samples[("http_server_request_duration_seconds_count", http_attrs)] == 2
    assert samples[("authz_checks_inflight", ())] == 0

    service.stop()
    traced = [s for s in service.received.spans() if s.trace_id.hex() == TRACE_ID]
    assert len(traced) == 1
    span = traced[0]
    assert span.name == "POST" and span.parent_span_id.hex() == PARENT_SPAN_ID
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["http.request.method"].string_value == "POST"
    assert attrs["http.response.status_code"].int_value == 401
    assert attrs["authz.decision"].string_value == "unauthenticated"
    assert attrs["authz.reason"].string_value == "missing_token"

    log_lines = [json.loads(line) for line in service.stderr.read_text().splitlines()
                 if line.startswith("{")]
    [deny] = [x for x in log_lines if x.get("logger") == "authz.deny"]
    assert deny["status"] == 401 and deny["trace_id"] == TRACE_ID
    assert deny["path"] == "/v1/models/iris:predict"
