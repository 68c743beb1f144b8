"""A minimal OTLP receiver (HTTP/protobuf and gRPC) for tests and benchmarks: keeps what it gets.

Not a collector: it decodes the export requests and answers success, nothing more. Used by the
OTLP tests, and usable by the load benchmark as "a local collector" (it discards by default
there: pass keep=False).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc


class Received:
    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.lock = threading.Lock()
        self.traces: list[tpb.ExportTraceServiceRequest] = []
        self.metrics: list[mpb.ExportMetricsServiceRequest] = []
        self.span_count = 0

    def add_traces(self, req: tpb.ExportTraceServiceRequest) -> None:
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.span_count += n
            if self.keep:
                self.traces.append(req)

    def add_metrics(self, req: mpb.ExportMetricsServiceRequest) -> None:
        with self.lock:
            if self.keep:
                self.metrics.append(req)

    def spans(self) -> list[Any]:
        with self.lock:
            return [s for r in self.traces for rs in r.resource_spans
                    for ss in rs.scope_spans for s in ss.spans]

    def resources(self) -> list[dict[str, str]]:
        with self.lock:
            return [{kv.key: kv.value.string_value for kv in rs.resource.attributes}
                    for r in self.traces for rs in r.resource_spans]

    def metric_names(self) -> set[str]:
        with self.lock:
            return {m.name for r in self.metrics for rm in r.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics}

    def metric(self, name: str) -> list[Any]:
        with self.lock:
            return [m for r in self.metrics for rm in r.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics if m.name == name]


@contextmanager
def http_sink(keep: bool = True) -> Iterator[tuple[str, Received]]:
    """Yields (endpoint, received); the endpoint is the base URL for OTEL_EXPORTER_OTLP_ENDPOINT."""
    received = Received(keep)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v1/traces":
                req_t = tpb.ExportTraceServiceRequest()
                req_t.ParseFromString(body)
                received.add_traces(req_t)
                reply = tpb.ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                req_m = mpb.ExportMetricsServiceRequest()
                req_m.ParseFromString(body)
                received.add_metrics(req_m)
                reply = mpb.ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def grpc_sink(keep: bool = True) -> Iterator[tuple[str, Received]]:
    received = Received(keep)

    class Traces(tgrpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            received.add_traces(request)
            return tpb.ExportTraceServiceResponse()

    class Metrics(mgrpc.MetricsServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            received.add_metrics(request)
            return mpb.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tgrpc.add_TraceServiceServicer_to_server(Traces(), server)
    mgrpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None).wait(5)
