"""What operators expect of the scrape endpoint (issue #17): the standard process and Python
metrics, the failure counters present at 0 before the first failure, and nothing but
GET/HEAD /metrics on the port. Over real HTTP: a Telemetry endpoint in this process, the
supervisor's aggregator, and `python -m authz serve` (one process, and `--workers 2` with a real
redis-server)."""

from __future__ import annotations

import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from authz.config.settings import ServerSettings, Settings
from authz.telemetry import Telemetry
from authz.telemetry.aggregate import MetricsAggregator
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # a cold interpreter importing grpc + the SDK on a loaded CI machine

# prometheus_client's ProcessCollector / GCCollector / PlatformCollector: family -> type.
# (Family names drop `_total`; the samples are process_cpu_seconds_total etc.)
PROCESS_FAMILIES = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "python_gc_objects_collected": "counter",
    "python_gc_collections": "counter",
    "python_info": "gauge",
}
PROCESS_SAMPLES = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds", "process_max_fds", "process_start_time_seconds",
    "python_gc_objects_collected_total", "python_gc_collections_total", "python_info",
}
STORE_ERROR_TYPES = {"timeout", "connection", "error"}

Samples = list[tuple[str, dict[str, str], float]]


def request(port: int, method: str = "GET", path: str = "/metrics"
            ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def scrape(port: int) -> tuple[dict[str, str], Samples]:
    """(family name -> type, samples without the otel_scope_* labels)."""
    status, _, body = request(port)
    assert status == 200, body
    types: dict[str, str] = {}
    samples: Samples = []
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        samples += [(s.name, {k: v for k, v in s.labels.items()
                              if not k.startswith("otel_scope")}, s.value)
                    for s in family.samples]
    return types, samples


def values(samples: Samples, name: str, **labels: str) -> list[float]:
    return [v for n, lb, v in samples if n == name and labels.items() <= lb.items()]


def assert_process_metrics(types: dict[str, str], samples: Samples, **labels: str) -> None:
    for family, kind in PROCESS_FAMILIES.items():
        assert types.get(family) == kind, f"{family}: {types.get(family)}"
    for name in PROCESS_SAMPLES:
        assert values(samples, name, **labels), f"no {name} with {labels}"
    [rss] = values(samples, "process_resident_memory_bytes", **labels)
    assert rss > 1_000_000  # a Python interpreter with grpc loaded: megabytes, not bytes
    [start] = values(samples, "process_start_time_seconds", **labels)
    assert time.time() - 3600 < start <= time.time()
    [fds] = values(samples, "process_open_fds", **labels)
    [max_fds] = values(samples, "process_max_fds", **labels)
    assert 0 < fds <= max_fds
    gens = {lb["generation"] for n, lb, _ in samples
            if n == "python_gc_collections_total" and labels.items() <= lb.items()}
    assert gens == {"0", "1", "2"}
    [info] = [lb for n, lb, _ in samples if n == "python_info" and labels.items() <= lb.items()]
    assert info["implementation"] == platform.python_implementation()


def assert_only_metrics_path(port: int) -> None:
    for path in ("/", "/metric", "/metrics/", "/healthz", "/favicon.ico", "/metrics/extra"):
        status, _, _ = request(port, "GET", path)
        assert status == 404, path
    status, headers, body = request(port, "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD", body
    status, _, _ = request(port, "DELETE", "/elsewhere")
    assert status == 404
    status, headers, body = request(port, "HEAD")
    assert status == 200 and body == b""
    assert headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) > 1000  # GET's length, announced without the body


# ---- one process, in this test process --------------------------------------------------

@pytest.fixture
def served() -> Iterator[int]:
    telemetry = Telemetry.from_settings(
        Settings(server=ServerSettings(host="127.0.0.1", metrics_port=free_port())),
        environ={}, install_global=False,
    )
    try:
        telemetry.start()
        assert telemetry.metrics_address is not None
        yield telemetry.metrics_address[1]
    finally:
        telemetry.shutdown()


def test_endpoint_serves_the_standard_process_metrics(served: int) -> None:
    types, samples = scrape(served)
    assert_process_metrics(types, samples)
    # Counted from this very process: the CPU it has used so far.
    [cpu] = values(samples, "process_cpu_seconds_total")
    assert cpu > 0


def test_store_errors_exist_at_zero_before_any_failure(served: int) -> None:
    _, samples = scrape(served)
    errors = {lb["error_type"]: v for n, lb, v in samples if n == "authz_store_errors_total"}
    assert errors == dict.fromkeys(STORE_ERROR_TYPES, 0.0)


def test_endpoint_answers_only_get_and_head_on_metrics(served: int) -> None:
    assert_only_metrics_path(served)


def test_endpoint_keeps_prometheus_client_filtering(served: int) -> None:
    status, _, body = request(served, "GET", "/metrics?name[]=python_info")
    assert status == 200
    assert body.decode().count("# TYPE") == 1 and "python_info{" in body.decode()


# ---- the supervisor's aggregator, in this test process ----------------------------------

def test_aggregator_serves_only_metrics_and_its_own_process_as_supervisor(served: int) -> None:
    with MetricsAggregator("127.0.0.1", 0, [("127.0.0.1", served)]) as agg:
        assert_only_metrics_path(agg.port)
        types, samples = scrape(agg.port)
    assert_process_metrics(types, samples, worker="0")
    assert_process_metrics(types, samples, worker="supervisor")
    # Every process series carries a worker label: nothing would tell two processes apart.
    unlabelled = [n for n, lb, _ in samples
                  if n in PROCESS_SAMPLES and "worker" not in lb]
    assert not unlabelled
    assert values(samples, "authz_worker_up", worker="0") == [1.0]
    assert not values(samples, "authz_worker_up", worker="supervisor")


# ---- `python -m authz serve`, one process and two workers -------------------------------

class JwksServer:
    """A plain HTTP identity-provider endpoint serving one issuer's JWKS."""

    def __init__(self, jwks: object) -> None:
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def jwks(tmp_path: Path) -> Iterator[tuple[TestIssuer, JwksServer]]:
    issuer = TestIssuer(tmp_path / "idp")
    server = JwksServer(issuer.jwks)
    try:
        yield issuer, server
    finally:
        server.close()


def start_service(tmp_path: Path, issuer: TestIssuer, jwks_url: str, redis_url: str,
                  workers: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    metrics_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "grpc_port": free_port(), "metrics_port": metrics_port,
                   "workers": workers, "drain_delay": "0s", "shutdown_grace": "2s"},
        "auth": {"issuers": [{"issuer": issuer.name, "jwks_url": jwks_url,
                              "algorithms": ["RS256"]}]},
        "store": {"redis_url": redis_url},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AUTHZ_"))}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--config", str(config)],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    return proc, metrics_port, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def scrape_when(port: int, ready: object, proc: subprocess.Popen[bytes], log: Path
                ) -> tuple[dict[str, str], Samples]:
    """Scrape until `ready(samples)` holds (the workers have started and fetched the keys)."""
    assert callable(ready)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            types, samples = scrape(port)
            if ready(samples):
                return types, samples
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, "no ready scrape in time:\n" + log.read_text()
        time.sleep(0.2)


def test_service_starts_with_process_metrics_and_failure_counters_at_zero(
        tmp_path: Path, jwks: tuple[TestIssuer, JwksServer], redis: RedisServer) -> None:
    issuer, server = jwks
    proc, port, log = start_service(tmp_path, issuer, server.url, redis.url, workers=1)
    try:
        types, samples = scrape_when(
            port, lambda s: values(s, "authz_jwks_refreshes_total", result="ok") == [1.0],
            proc, log)
        assert_process_metrics(types, samples)
        refreshes = {(lb["issuer"], lb["result"]): v for n, lb, v in samples
                     if n == "authz_jwks_refreshes_total"}
        assert refreshes == {(issuer.name, "ok"): 1.0, (issuer.name, "error"): 0.0}
        errors = {lb["error_type"]: v for n, lb, v in samples if n == "authz_store_errors_total"}
        assert errors == dict.fromkeys(STORE_ERROR_TYPES, 0.0)
        assert_only_metrics_path(port)
    finally:
        stop(proc)


def test_two_workers_each_report_their_process_under_their_worker_label(
        tmp_path: Path, jwks: tuple[TestIssuer, JwksServer], redis: RedisServer) -> None:
    issuer, server = jwks
    proc, port, log = start_service(tmp_path, issuer, server.url, redis.url, workers=2)

    def both_up(s: Samples) -> bool:
        return all(values(s, "authz_worker_up", worker=w) == [1.0] for w in "01") and all(
            values(s, "authz_jwks_refreshes_total", worker=w, result="ok") == [1.0]
            for w in "01")

    try:
        types, samples = scrape_when(port, both_up, proc, log)
        for worker in ("0", "1", "supervisor"):
            assert_process_metrics(types, samples, worker=worker)
        unlabelled = [n for n, lb, _ in samples if n in PROCESS_SAMPLES and "worker" not in lb]
        assert not unlabelled
        # Three processes, not one reported three times: the supervisor started before the
        # workers it spawned (after importing and configuring itself: well over /proc's 10 ms).
        starts = {lb["worker"]: v for n, lb, v in samples if n == "process_start_time_seconds"}
        assert len(starts) == 3
        assert starts["supervisor"] < min(starts["0"], starts["1"])
        for worker in "01":
            errors = {lb["error_type"]: v for n, lb, v in samples
                      if n == "authz_store_errors_total" and lb["worker"] == worker}
            assert errors == dict.fromkeys(STORE_ERROR_TYPES, 0.0), worker
            assert values(samples, "authz_jwks_refreshes_total", worker=worker,
                          result="error") == [0.0]
        assert_only_metrics_path(port)
    finally:
        stop(proc)
