"""Side-by-side benchmark of ext_authz Check servers on this machine, in one run.

Servers (each one process pinned to core 0 with taskset; h2load and Redis on core 1):

  floor        no-op grpc.aio Check returning a prebuilt OK (loadtests/floor_server.py)
  io-floor     the same plus one Redis PING per check: the floor for any decision that needs
               a store round trip
  full-redis   `authz serve`, full decision, Redis store, cached token
  naive        PyJWT decode + one redis.asyncio EVALSHA per call (loadtests/naive_server.py)
  full-memory  `authz serve` with the in-memory store
  full-notel   full-redis with telemetry off (OTEL_SDK_DISABLED=true)
  full-otel    full-redis with metrics on and every check traced (sampler always_on)
  full-otel-1pct  full-redis with metrics on and parent-based 1% sampling, the caller not
               sampled (the mesh's usual setting)
  full-cluster full-redis on a local 3-master Redis Cluster
  full-body    full-redis with a 16 KB KServe v1 body in the check (packAsBytes), each request
               charged its batch size (quota cost from: instances)
  full-body-unused  the same body in the check, under a fixed-cost rule that never reads it:
               what carrying the body costs (gRPC transfer, protobuf), apart from reading it
  http-floor   a bare HTTP/1.1 responder (asyncio Protocol + httptools on uvloop, a prebuilt
               200): the most a Python HTTP ext_authz server can do (loadtests/http_floor_server)
  full-http-redis  `authz serve`'s HTTP edge (Envoy's HTTP ext_authz protocol), full decision,
               Redis store, cached token: h2load --h1 sends the check request Envoy's HTTP
               client would (GET of the check path with authorization and traceparent), one
               request in flight per connection as Envoy's connection pool does
  full-http-memory  the same with the in-memory store

For each: closed-loop throughput (h2load -c 16 -m 8 for a few seconds, after a warm-up) and
latency at a fixed light rate (open loop, h2load timing script, default 500/s). Rounds are
interleaved (each round starts with the next server) and the median is kept,
so drift in the machine's load hits every server alike. Then:

  - Redis commands per decision (Redis MONITOR over a fixed number of checks), and during the
    throughput runs how many decisions shared one write (INFO: scripts per read event);
  - deny cache: Redis commands spent on an identity already over its limit;
  - scaling: checks/s with `authz serve --workers 1` and `--workers 2` (unpinned);
  - optionally (--rss-checks) server RSS after N checks across U distinct users.

    python -m loadtests.bench                  # full run, ~4 minutes
    python -m loadtests.bench --quick          # CI smoke: seconds, targets not judged
    python -m loadtests.bench --rss-only --rss-checks 1000000 --rss-users 100000

Absolute numbers move +-30% run to run on a shared 2-vCPU VM; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from envoy.service.auth.v3 import external_auth_pb2

from . import h2load
from .population import (
    CHECK_METHOD,
    HTTP_PATH_PREFIX,
    UNSAMPLED_TRACEPARENT,
    World,
    check_request,
    grpc_frame,
    http_check_headers,
    v1_batch_body,
    write_world,
)
from .procs import (
    Proc,
    ProcError,
    cpu_seconds,
    free_port,
    rss_bytes,
    start_redis,
    stop_all,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtests" / "results"
SERVER_CPU = "0"
CLIENT_CPU = "1"
START_TIMEOUT = 30.0

# Targets: full/naive and the light p99 from issue #6 (whose full/floor of 0.9 one Redis round
# trip per decision on grpc.aio cannot reach: loadtests/README.md); full/floor 0.75 and the
# HTTP edge's from issue #14.
TARGET_FULL_OVER_FLOOR = 0.75
TARGET_FULL_OVER_NAIVE = 1.6
TARGET_P99_OVER_FLOOR = 1.3
# The HTTP edge, full decision with Redis, against the *gRPC* floor (checks/s, one core): the
# HTTP protocol's point is to get past what grpc.aio allows. Light-load p99 at most the gRPC
# floor's.
TARGET_HTTP_OVER_GRPC_FLOOR = 3.0
TARGET_HTTP_P99_OVER_GRPC_FLOOR = 1.0
# Telemetry's cost against telemetry off (README "Observability"): metrics on and parent-based
# 1% sampling (the mesh's usual setting) keep >= 0.95 of the checks/s; every check traced
# (always_on) keeps >= 0.8.
TARGET_TELEMETRY_1PCT_OVER_OFF = 0.95
TARGET_TELEMETRY_ALWAYS_ON_OVER_OFF = 0.8
# (ratio name, server compared with full-notel, target)
TELEMETRY_RATIOS = (("telemetry 1%/off", "full-otel-1pct", TARGET_TELEMETRY_1PCT_OVER_OFF),
                    ("telemetry always-on/off", "full-otel", TARGET_TELEMETRY_ALWAYS_ON_OVER_OFF))
# The Redis Cluster store's CPU per decision against the standalone store's (one request path,
# one more hop of routing: the slot lookup and the node): at most 10% more.
TARGET_CLUSTER_CPU_OVER_STANDALONE = 1.10
# Issue #16: reading a 16 KB body for its cost adds at most 20 us of CPU per check:
# full-body's CPU per check minus full-body-unused's (the same request, the rule not reading
# it). Carrying the body at all (full-body-unused minus full-redis) is the provider's
# includeRequestBodyInCheck's price, paid whatever the rule: reported beside it.
TARGET_BODY_COST_US = 20.0
BODY_COST_KEY = "body read: CPU us/check (body - body-unused)"
BODY_CARRY_KEY = "body carried: CPU us/check (unused - redis)"

# Sent once per connection (handshake, script loading), not per decision; and XREAD, the
# resets feed's poll (twice a second per process, authz/buckets/resets.py), on a timer.
PER_CONNECTION = frozenset({"hello", "auth", "select", "client", "script", "ping", "info",
                            "xread"})

BENCH_USER = "bench-user-0001"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
TRICKLE_USER = "trickle-user-0001"


class BenchError(ProcError):
    """A server misbehaved or a measurement is not valid; the message says which and why."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def authz_argv(config: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "authz", "serve", "--config", str(config),
            "--workers", str(workers)]


def call_check(target: str, body: bytes, timeout: float = 2.0) -> external_auth_pb2.CheckResponse:
    """One Check with a raw serialized CheckRequest (no gRPC frame)."""
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(CHECK_METHOD, request_serializer=None, response_deserializer=None)
        return external_auth_pb2.CheckResponse.FromString(call(body, timeout=timeout))


def _serving(target: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE), timeout=1.0)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_ready(proc: Proc, target: str, body: bytes, health: bool,
               timeout: float = START_TIMEOUT, http: Server | None = None) -> None:
    """Until grpc.health says SERVING (`health`), else until a Check answers (`http`: until an
    HTTP check request is answered); process alive."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc.check_alive()
        if http is not None and not health:
            try:
                http_get(http, timeout=1.0)
                return
            except OSError as e:
                last = str(e)
                time.sleep(0.1)
                continue
        try:
            if health:
                if _serving(target):
                    return
                last = "NOT_SERVING"
                time.sleep(0.1)
                continue
            call_check(target, body, timeout=1.0)
            return
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
            time.sleep(0.1)
    raise BenchError(f"{proc.name} not answering Check on {target} ({last}):\n{proc.tail()}")


def describe(resp: external_auth_pb2.CheckResponse) -> str:
    if resp.status.code == 0:
        hdrs = {h.header.key: h.header.value for h in resp.ok_response.headers}
        return f"allow {hdrs}"
    return f"deny {int(resp.denied_response.status.code)} {resp.denied_response.body[:120]}"


# ---------------------------------------------------------------------------------------------
# Redis accounting


class RedisMonitor:
    """Counts the commands clients send to Redis, by name, while active (Redis MONITOR).

    INFO commandstats also counts the commands a Lua script runs inside Redis; MONITOR marks
    those with the source "lua", so client round trips can be told apart from script work.
    MONITOR slows Redis down, so it is only used on short dedicated runs, never on the
    throughput runs. stop() sends a sentinel ECHO and reads the feed up to it, so no command
    sent before stop() is missed however far the reader lags.
    """

    def __init__(self, port: int) -> None:
        import socket
        import threading
        import uuid

        self.port = port
        self.sentinel = f"authz-bench-monitor-{uuid.uuid4().hex}"
        self.counts: dict[str, int] = {}
        self.script_inner = 0
        self._seen_sentinel = threading.Event()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            self._sock.sendall(b"MONITOR\r\n")
            buf = b""
            while b"\r\n" not in buf:
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise BenchError("redis closed the MONITOR connection")
                buf += chunk
            first, _, self._buf = buf.partition(b"\r\n")
            if first != b"+OK":
                raise BenchError(f"MONITOR refused: {first!r}")
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _line(self, line: bytes) -> None:
        # +1764212345.123456 [0 127.0.0.1:50432] "evalsha" "..." ...  /  [0 lua] "hmget" ...
        text = line.decode(errors="replace")
        source_end = text.find("] ")
        if not text.startswith("+") or source_end < 0:
            return
        source = text[text.find("[") + 1 : source_end].split(" ")[-1]
        cmd = text[source_end + 2 :].split(" ", 1)[0].strip('"').lower()
        if cmd == "echo" and self.sentinel in text:
            self._seen_sentinel.set()
        elif source == "lua":
            self.script_inner += 1
        else:
            self.counts[cmd] = self.counts.get(cmd, 0) + 1

    def _read(self) -> None:
        while not self._seen_sentinel.is_set():
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\r\n")
            for line in lines:
                if not self._seen_sentinel.is_set():
                    self._line(line)

    def stop(self) -> dict[str, int]:
        import socket

        # A bare socket: a client library would add its own handshake (HELLO, CLIENT SETINFO)
        # to the counts.
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"ECHO {self.sentinel}\r\n".encode())
            sock.recv(4096)
        seen = self._seen_sentinel.wait(20)
        self._sock.close()
        self._thread.join(5)
        if not seen:
            raise BenchError("Redis MONITOR feed did not reach the sentinel within 20 s")
        return dict(self.counts)


def redis_commands(port: int, action: Callable[[], Any]) -> tuple[dict[str, int], Any]:
    mon = RedisMonitor(port)
    try:
        result = action()
    finally:
        counts = mon.stop()
    return counts, result


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Run:
    rps: float
    checks: int
    cpu_us_per_check: float
    p50_ms: float
    p99_ms: float
    bytes_per_response: float
    scripts_per_redis_read: float | None = None


@dataclass
class Light:
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    count: int


@dataclass
class ServerResult:
    name: str
    runs: list[Run] = field(default_factory=list)
    lights: list[Light] = field(default_factory=list)
    # Client commands Redis received per decision, by command (from a MONITOR run).
    redis_per_decision: dict[str, float] | None = None

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs) if self.runs else 0.0

    @property
    def cpu_us(self) -> float:
        return statistics.median(r.cpu_us_per_check for r in self.runs) if self.runs else 0.0

    @property
    def light_p50(self) -> float:
        return statistics.median(x.p50_ms for x in self.lights) if self.lights else 0.0

    @property
    def light_p99(self) -> float:
        return statistics.median(x.p99_ms for x in self.lights) if self.lights else 0.0

    @property
    def light_rate(self) -> float:
        return statistics.median(x.rate for x in self.lights) if self.lights else 0.0

    @property
    def scripts_per_read(self) -> float | None:
        vals = [r.scripts_per_redis_read for r in self.runs
                if r.scripts_per_redis_read is not None]
        return statistics.median(vals) if vals else None

    @property
    def redis_per_check(self) -> float | None:
        """Commands per decision, leaving out a (re)connection's handshake commands."""
        if self.redis_per_decision is None:
            return None
        return sum(v for k, v in self.redis_per_decision.items() if k not in PER_CONNECTION)


@dataclass
class Options:
    duration: float
    warmup: float
    rounds: int
    connections: int
    streams: int
    light_rate: float
    light_duration: float
    pin: bool


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    uses_redis: bool
    # The allowed response must carry this subject header (None: the floor, which says OK only).
    expect_subject: str | None
    # Has grpc.health.v1 (the service): readiness is SERVING, not merely "answers".
    health: bool = False
    # Charges token buckets in Redis: Redis commands per decision and the deny cache are
    # measured on it.
    charges_redis: bool = False
    # Extra environment (OTEL_* for the telemetry variants).
    env: dict[str, str] = field(default_factory=dict)
    # The serialized CheckRequest this server gets instead of the shared one (None: shared).
    request: bytes | None = None
    request_file: Path | None = None
    proc: Proc | None = None
    # Size on the wire (gRPC frame included) of this server's answer to the benchmark request.
    allow_bytes: int = 0
    # An HTTP edge row: `port` is the HTTP port, checked with `http_headers`; its gRPC port (if
    # it has one: the service, not the bare floor) serves the readiness health check.
    http: bool = False
    http_headers: tuple[str, ...] = ()
    grpc_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port if self.http else self.port}"

    @property
    def url(self) -> str:
        if self.http:
            return f"http://127.0.0.1:{self.port}{HTTP_PATH_PREFIX}{HTTP_MODEL_PATH}"
        return f"http://127.0.0.1:{self.port}{CHECK_METHOD}"


# The model path the benchmark request asks for (population.check_request's default).
HTTP_MODEL_PATH = "/v1/models/llama-3-8b:predict"


def http_get(server: Server, timeout: float = 2.0) -> tuple[int, dict[str, str]]:
    """One check request on an HTTP row: (status, headers with lower-case names)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        headers = dict(h.split(": ", 1) for h in server.http_headers)
        conn.request("GET", f"{HTTP_PATH_PREFIX}{HTTP_MODEL_PATH}", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def redis_reads_and_scripts(port: int) -> tuple[int, int]:
    """(read events Redis has processed, EVALSHA/EVAL/PING calls) so far."""
    client = redis.Redis(port=port)
    try:
        reads = int(client.info("stats")["total_reads_processed"])
        stats = client.info("commandstats")
    finally:
        client.close()
    return reads, sum(int(v["calls"]) for k, v in stats.items()
                      if k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_ping"))


def load_args(server: Server, body: Path, connections: int, streams: int) -> dict[str, Any]:
    """h2load's request arguments for `server`: the gRPC body on `connections` connections of
    `streams` streams each, or the HTTP check request with as many requests in flight, one per
    connection (Envoy does not pipeline HTTP/1.1: it opens a connection per check in flight)."""
    if server.http:
        return {"body": None, "h1": True, "headers": server.http_headers, "streams": 1,
                "connections": connections * streams}
    return {"body": body, "connections": connections, "streams": streams}


def throughput(server: Server, body: Path, opts: Options, work: Path,
               client_cpu: str | None, notes: list[str], redis_port: int | None) -> Run:
    assert server.proc is not None
    if opts.warmup > 0:
        h2load.run(server.url, cpu=client_cpu, duration=opts.warmup,
                   **load_args(server, body, opts.connections, opts.streams))
    track = redis_port is not None and server.uses_redis
    r0 = redis_reads_and_scripts(redis_port) if track and redis_port else (0, 0)
    cpu0 = cpu_seconds(server.proc.pid)
    res = h2load.run(server.url, cpu=client_cpu, duration=opts.duration,
                     log_file=work / f"h2load-{server.name}.tsv",
                     **load_args(server, body, opts.connections, opts.streams))
    cpu = cpu_seconds(server.proc.pid) - cpu0
    per_read = None
    if track and redis_port:
        r1 = redis_reads_and_scripts(redis_port)
        # Each read event takes in what one client write sent (or more, if Redis fell
        # behind): scripts per read is an upper bound on how many decisions share a write.
        # ~1 means no coalescing: every decision paid its own write and reply wake-up.
        reads = r1[0] - r0[0] - 2  # the two INFO requests of the second call
        per_read = (r1[1] - r0[1]) / reads if reads > 0 else None
    server.proc.check_alive()
    if res.done == 0 or (res.succeeded != res.done and not server.http):
        raise BenchError(f"{server.name}: h2load failures:\n{res.output[-1500:]}")
    if server.http:
        # Each answer's status is the decision: every one must be the allow.
        denied = res.done - res.status_codes.get("2xx", 0)
        if res.failed or res.errored:
            raise BenchError(f"{server.name}: h2load failures:\n{res.output[-1500:]}")
        if denied:
            notes.append(f"{server.name}: {denied} of {res.done} answers were not 200 "
                         f"({res.status_codes}; store timeouts on an overloaded machine "
                         "give 503s)")
        return Run(rps=res.rps, checks=res.done, cpu_us_per_check=cpu / res.done * 1e6,
                   p50_ms=res.percentile_ms(50), p99_ms=res.percentile_ms(99),
                   bytes_per_response=res.data_bytes_per_request)
    per_resp = res.data_bytes_per_request
    # Every answer our servers give carries a CheckResponse (>= 5 bytes of gRPC frame plus
    # the message); a gRPC error has no message. Catch a server failing fast.
    if per_resp < 6:
        raise BenchError(f"{server.name}: responses carry no message ({per_resp:.1f} B each): "
                         "the server is answering with gRPC errors")
    # h2load cannot read the decision; the mean answer size can: allow answers all have the
    # size of the sample allow (+-2 bytes of varying header digits), deny answers differ.
    if server.allow_bytes and abs(per_resp - server.allow_bytes) > 2:
        notes.append(f"{server.name}: mean answer {per_resp:.1f} B, an allow is "
                     f"{server.allow_bytes} B: not every check in that run was an allow "
                     "(store timeouts on an overloaded machine give 503s)")
    return Run(rps=res.rps, checks=res.done, cpu_us_per_check=cpu / res.done * 1e6,
               p50_ms=res.percentile_ms(50), p99_ms=res.percentile_ms(99),
               bytes_per_response=per_resp, scripts_per_redis_read=per_read)


def redis_per_decision(server: Server, body: Path, redis_port: int, requests: int,
                       client_cpu: str | None) -> dict[str, float]:
    """Client commands per decision, by name, for `requests` allowed checks (fixed count)."""
    counts, res = redis_commands(redis_port, lambda: h2load.run(
        server.url, body, cpu=client_cpu, connections=4, streams=8, requests=requests))
    if res.done != requests:
        raise BenchError(f"{server.name}: {res.done}/{requests} checks answered")
    return {cmd: n / res.done for cmd, n in sorted(counts.items())}


def light(server: Server, body: Path, opts: Options, work: Path,
          client_cpu: str | None) -> Light:
    script = work / f"timing-{server.port}.txt"
    n = h2load.write_timing_script(script, server.url, opts.light_rate, opts.light_duration)
    res = h2load.run(server.url, cpu=client_cpu, requests=n, timing_script=script,
                     log_file=work / "light.tsv", timeout=opts.light_duration * 4 + 30,
                     **load_args(server, body, 1, 64) | ({"connections": 1} if server.http
                                                         else {}))
    if res.succeeded != res.done or not res.durations_us:
        raise BenchError(f"{server.name}: light run failed:\n{res.output[-1500:]}")
    return Light(rate=res.achieved_rate(), p50_ms=res.percentile_ms(50),
                 p99_ms=res.percentile_ms(99), max_ms=max(res.durations_us) / 1000, count=res.done)


@contextlib.contextmanager
def running(servers: Sequence[Server], work: Path, ready_body: bytes,
            cpu: str | None) -> Iterator[None]:
    try:
        for s in servers:
            s.proc = Proc(s.name, s.argv, work, cpu, s.env).start()
        for s in servers:
            assert s.proc is not None
            wait_ready(s.proc, s.target, ready_body, s.health, http=s if s.http else None)
        yield
    finally:
        stop_all([s.proc for s in servers if s.proc is not None])
        for s in servers:
            s.proc = None


def call_check_settled(target: str, body: bytes, attempts: int = 5) -> Any:
    """call_check, retried while the answer is a 503 (a store timeout on a loaded machine)."""
    for _ in range(attempts - 1):
        resp = call_check(target, body)
        if resp.status.code == 0 or int(resp.denied_response.status.code) != 503:
            return resp
        time.sleep(0.2)
    return call_check(target, body)


def verify_allow(server: Server, body: bytes) -> str:
    if server.http:
        status, headers = http_get(server)
        for _ in range(4):  # a 503: a store timeout on a loaded machine
            if status != 503:
                break
            time.sleep(0.2)
            status, headers = http_get(server)
        text = f"HTTP {status} x-auth-subject={headers.get('x-auth-subject')!r}"
        if status != 200 or headers.get("x-auth-subject") != BENCH_USER:
            raise BenchError(f"{server.name}: the benchmark request was not allowed: {text}")
        return text
    resp = call_check_settled(server.target, body)
    server.allow_bytes = resp.ByteSize() + 5
    text = describe(resp)
    if resp.status.code != 0:
        raise BenchError(f"{server.name}: the benchmark request was not allowed: {text}")
    if server.expect_subject is not None:
        subjects = [h.header.value for h in resp.ok_response.headers
                    if h.header.key == "x-auth-subject"]
        if subjects != [server.expect_subject]:
            raise BenchError(f"{server.name}: allow without x-auth-subject "
                             f"{server.expect_subject!r}: {text}")
    return text


def deny_cache(server: Server, trickle: bytes, trickle_file: Path, redis_port: int,
               requests: int, client_cpu: str | None) -> dict[str, Any]:
    """Spend the trickle user's one token, then send `requests` more; count Redis commands."""
    first = call_check_settled(server.target, trickle)
    second = call_check_settled(server.target, trickle)
    if first.status.code != 0 or int(second.denied_response.status.code) != 429:
        raise BenchError(f"{server.name}: trickle user should be allowed once then get 429; got "
                         f"{describe(first)} / {describe(second)}")
    counts, res = redis_commands(redis_port, lambda: h2load.run(
        server.url, trickle_file, cpu=client_cpu, connections=4, streams=8, requests=requests))
    spent = sum(counts.values())
    after = call_check_settled(server.target, trickle)
    if int(after.denied_response.status.code) != 429:
        raise BenchError(f"{server.name}: over-limit identity not denied: {describe(after)}")
    return {"server": server.name, "over_limit_checks": res.done, "redis_commands": spent,
            "rps": res.rps, "retry_after": [h.header.value for h in after.denied_response.headers
                                            if h.header.key == "retry-after"]}


# ---------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class Report:
    started: str
    machine: dict[str, Any]
    options: dict[str, Any]
    results: dict[str, ServerResult] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    deny_cache: list[dict[str, Any]] = field(default_factory=list)
    scaling: dict[str, dict[str, float]] = field(default_factory=dict)
    rss: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = {n: {"rps": r.rps, "cpu_us_per_check": r.cpu_us,
                              "light_p50_ms": r.light_p50, "light_p99_ms": r.light_p99,
                              "light_rate": r.light_rate, "redis_per_check": r.redis_per_check,
                              "redis_per_decision": r.redis_per_decision,
                              "evalsha_per_redis_read": r.scripts_per_read}
                          for n, r in self.results.items()}
        out["ratios"] = ratios(self)
        return out


def ratios(rep: Report) -> dict[str, float]:
    r = rep.results
    out: dict[str, float] = {}

    def div(a: str, b: str, attr: str) -> float | None:
        if a in r and b in r:
            x, y = getattr(r[a], attr), getattr(r[b], attr)
            return x / y if y else None
        return None

    for key, val in (("full/floor", div("full-redis", "floor", "rps")),
                     ("full/naive", div("full-redis", "naive", "rps")),
                     ("memory/floor", div("full-memory", "floor", "rps")),
                     ("light p99 full/floor", div("full-redis", "floor", "light_p99")),
                     ("light p50 full/floor", div("full-redis", "floor", "light_p50")),
                     ("full/io-floor", div("full-redis", "io-floor", "rps")),
                     ("light p99 full/io-floor", div("full-redis", "io-floor", "light_p99")),
                     ("light p50 full/io-floor", div("full-redis", "io-floor", "light_p50")),
                     ("cluster/standalone CPU per check", div("full-cluster", "full-redis",
                                                               "cpu_us")),
                     ("http-floor/floor", div("http-floor", "floor", "rps")),
                     ("full-http-redis/floor", div("full-http-redis", "floor", "rps")),
                     ("full-http-memory/floor", div("full-http-memory", "floor", "rps")),
                     ("full-http-redis/http-floor", div("full-http-redis", "http-floor", "rps")),
                     ("full-http-redis/full-redis", div("full-http-redis", "full-redis", "rps")),
                     ("light p99 full-http-redis/floor", div("full-http-redis", "floor",
                                                             "light_p99")),
                     ("light p50 full-http-redis/floor", div("full-http-redis", "floor",
                                                             "light_p50"))):
        if val is not None:
            out[key] = val
    # Differences, not ratios: the microseconds the body costs.
    if "full-body" in r and "full-body-unused" in r:
        out[BODY_COST_KEY] = r["full-body"].cpu_us - r["full-body-unused"].cpu_us
    if "full-body-unused" in r and "full-redis" in r:
        out[BODY_CARRY_KEY] = r["full-body-unused"].cpu_us - r["full-redis"].cpu_us
    off = r.get("full-notel")
    for key, name, _target in TELEMETRY_RATIOS:
        on = r.get(name)
        if on is None or off is None:
            continue
        if off.rps:
            out[key] = on.rps / off.rps
        if on.runs and len(on.runs) == len(off.runs):
            # The runs of a round are minutes closer in time than the rounds' medians: on a
            # shared machine whose speed drifts, the median of the per-round ratios is the
            # steadier figure (the ratio of medians above is kept for comparison).
            out[f"{key} (paired rounds)"] = statistics.median(
                a.rps / b.rps for a, b in zip(on.runs, off.runs, strict=True) if b.rps)
    for name, sc in rep.scaling.items():
        if sc.get("1") and sc.get("2"):
            # Both unpinned: grpcio's C-core threads let one process use more than one core, and
            # h2load shares the two cores, so this understates what a second core adds.
            out[f"{name} 2 workers/1 (unpinned)"] = sc["2"] / sc["1"]
        if sc.get("2") and name in r and r[name].rps:
            # Against the one-process-on-one-core figure of the main table.
            out[f"{name} 2 workers/1 pinned"] = sc["2"] / r[name].rps
    return out


def machine_info() -> dict[str, Any]:
    import google.protobuf

    return {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
        "loadavg": os.getloadavg(), "kernel": platform.release(),
        "h2load": subprocess.run([h2load.find_h2load(), "--version"], capture_output=True,
                                 text=True, check=False).stdout.strip(),
    }


def measure_scaling(name: str, make: Callable[[int, int], list[Server]], body: Path,
                    ready: bytes, opts: Options, work: Path) -> dict[str, float]:
    """checks/s with 1 and 2 worker processes on one port, everything unpinned."""
    out: dict[str, float] = {}
    for n in (1, 2):
        port = free_port()
        servers = make(n, port)
        with running(servers, work, ready, cpu=None):
            # Connections are spread over the processes by the kernel's SO_REUSEPORT hash: 32
            # connections even out the split between 2 processes.
            h2load.run(servers[0].url, body, cpu=None, connections=32, streams=4,
                       duration=opts.warmup or 0.5)
            res = h2load.run(servers[0].url, body, cpu=None, connections=32, streams=4,
                             duration=opts.duration)
            if res.done == 0 or res.data_bytes_per_request < 6:
                raise BenchError(f"scaling {name} x{n}: bad run:\n{res.output[-1500:]}")
            out[str(n)] = res.rps
        log(f"  scaling {name}: {n} worker(s): {res.rps:,.0f} checks/s")
    return out


def start_cluster(work: Path, cpu: str | None) -> Any:
    """A local Redis Cluster (3 masters, 3 replicas), its nodes pinned to `cpu` like Redis."""
    from tests.support.redis_topologies import RedisClusterNodes

    cluster = RedisClusterNodes(tmp=work).start()
    if cpu is not None:
        for node in cluster.nodes:
            subprocess.run(["taskset", "-cp", cpu, str(node.pid)], check=True,
                           capture_output=True)
    log(f"redis cluster: masters {[m.port for m in cluster.masters()]}")
    return cluster


def bench(args: argparse.Namespace) -> Report:
    pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
    server_cpu = SERVER_CPU if pin else None
    client_cpu = CLIENT_CPU if pin else None
    opts = Options(duration=args.duration, warmup=args.warmup, rounds=args.rounds,
                   connections=args.connections, streams=args.streams,
                   light_rate=args.light_rate, light_duration=args.light_duration, pin=pin)
    rep = Report(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 machine=machine_info(), options=asdict(opts))
    if not pin:
        rep.notes.append("fewer than 2 CPUs (or --no-pin): servers and h2load are not pinned")
    work = Path(tempfile.mkdtemp(prefix="authz-bench-"))
    log(f"work dir {work}")
    redis_proc, redis_port = start_redis(work, client_cpu)
    cluster = None
    try:
        if "full-cluster" in args.servers and not args.rss_only:
            cluster = start_cluster(work, client_cpu)
        world = write_world(work / "world")
        signer = world.signer()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        bench_token = signer.token(BENCH_USER, "bench", lifetime=3 * 3600)
        trickle_token = signer.token(TRICKLE_USER, "trickle", lifetime=3 * 3600)
        body = check_request("Bearer " + bench_token).SerializeToString()
        trickle = check_request("Bearer " + trickle_token).SerializeToString()
        body_file = work / "check-bench.bin"
        body_file.write_bytes(grpc_frame(body))
        trickle_file = work / "check-trickle.bin"
        trickle_file.write_bytes(grpc_frame(trickle))
        rep.notes.append(f"request: {len(body)} B CheckRequest, "
                         f"{len(bench_token)} B RS256 token, 15 headers")
        batch = v1_batch_body()
        batch_token = signer.token(BENCH_USER, "bench-batch", lifetime=3 * 3600)

        def cfg(name: str, port: int, url: str, **kw: Any) -> Path:
            return world.write_config(work / f"config-{name}.yaml", grpc_port=port,
                                      redis_url=url, **kw)

        ports = {n: free_port() for n in SERVER_NAMES}
        http_headers = tuple(f"{k}: {v}" for k, v in
                             http_check_headers("Bearer " + bench_token).items())

        def http_row(name: str, url: str, **kw: Any) -> Server:
            grpc_port = free_port()
            return Server(name, authz_argv(cfg(name, grpc_port, url, http_port=ports[name]), 1),
                          ports[name], bool(url), BENCH_USER, health=True, http=True,
                          http_headers=http_headers, grpc_port=grpc_port, **kw)

        all_servers = {
            "floor": Server("floor", [sys.executable, "-m", "loadtests.floor_server",
                                      "--port", str(ports["floor"])], ports["floor"], False, None),
            "full-redis": Server("full-redis", authz_argv(
                cfg("redis", ports["full-redis"], redis_url), 1), ports["full-redis"], True,
                BENCH_USER, health=True, charges_redis=True),
            "io-floor": Server("io-floor", [sys.executable, "-m", "loadtests.floor_server",
                                            "--port", str(ports["io-floor"]), "--redis-port",
                                            str(redis_port)], ports["io-floor"], True, None),
            "naive": Server("naive", [sys.executable, "-m", "loadtests.naive_server", "--config",
                                      str(cfg("naive", 0, redis_url)), "--port",
                                      str(ports["naive"])], ports["naive"], True, BENCH_USER,
                            charges_redis=True),
            "full-memory": Server("full-memory", authz_argv(
                cfg("memory", ports["full-memory"], ""), 1), ports["full-memory"], False,
                BENCH_USER, health=True),
            # Telemetry's cost: the full decision with telemetry disabled altogether, and with
            # metrics on (scrape endpoint up) and every check traced (sampler always_on, spans
            # batched to an in-process exporter that drops them).
            "full-notel": Server("full-notel", authz_argv(
                cfg("notel", ports["full-notel"], redis_url), 1), ports["full-notel"], True,
                BENCH_USER, health=True, env={"OTEL_SDK_DISABLED": "true"}),
            "full-otel": Server("full-otel", authz_argv(
                cfg("otel", ports["full-otel"], redis_url, metrics_port=free_port()), 1),
                ports["full-otel"], True, BENCH_USER, health=True,
                env={"OTEL_TRACES_SAMPLER": "always_on",
                     "OTEL_TRACES_EXPORTER": "authz_discard"}),
            # The mesh's usual setting: parent-based sampling at 1%. h2load sends one fixed
            # request, so here its caller says "not sampled" (traceparent flags 00): the ~99%
            # of a mesh's checks that get no span at all. The sampled 1% cost what full-otel's
            # checks cost, i.e. 0.01 x (1 - the always-on ratio) more: ~0.002.
            # The same decision on a local 3-master Redis Cluster (its 6 nodes pinned with
            # Redis's core): the bench identity's slot decides which master answers.
            **({"full-cluster": Server("full-cluster", authz_argv(cfg(
                "cluster", ports["full-cluster"], cluster.url(),
                store={"redis_mode": "cluster", "redis_nodes": cluster.seeds()[1:]}), 1),
                # uses_redis False: the standalone Redis's command counts are not its own.
                ports["full-cluster"], False, BENCH_USER, health=True)} if cluster else {}),
            "full-body": Server("full-body", authz_argv(
                cfg("body", ports["full-body"], redis_url), 1), ports["full-body"], True,
                BENCH_USER, health=True,
                request=check_request("Bearer " + batch_token,
                                      raw_body=batch).SerializeToString()),
            "full-body-unused": Server("full-body-unused", authz_argv(
                cfg("body-unused", ports["full-body-unused"], redis_url), 1),
                ports["full-body-unused"], True, BENCH_USER, health=True,
                request=check_request("Bearer " + bench_token,
                                      raw_body=batch).SerializeToString()),
            "full-otel-1pct": Server("full-otel-1pct", authz_argv(
                cfg("otel-1pct", ports["full-otel-1pct"], redis_url, metrics_port=free_port()),
                1), ports["full-otel-1pct"], True, BENCH_USER, health=True,
                env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                     "OTEL_TRACES_SAMPLER_ARG": "0.01", "OTEL_TRACES_EXPORTER": "authz_discard"},
                request=check_request("Bearer " + bench_token,
                                      traceparent=UNSAMPLED_TRACEPARENT).SerializeToString()),
            "http-floor": Server("http-floor", [sys.executable, "-m",
                                                "loadtests.http_floor_server", "--port",
                                                str(ports["http-floor"])], ports["http-floor"],
                                 False, None, http=True, http_headers=http_headers),
            "full-http-redis": http_row("full-http-redis", redis_url),
            "full-http-memory": http_row("full-http-memory", ""),
        }
        for s in all_servers.values():
            if s.request is not None:
                s.request_file = work / f"check-{s.name}.bin"
                s.request_file.write_bytes(grpc_frame(s.request))

        def request(s: Server) -> bytes:
            return s.request if s.request is not None else body

        def request_file(s: Server) -> Path:
            return s.request_file if s.request_file is not None else body_file

        servers = [] if args.rss_only else [all_servers[n] for n in args.servers]
        with running(servers, work, body, server_cpu):
            for s in servers:
                rep.samples[s.name] = verify_allow(s, request(s))
                log(f"{s.name}: pid {s.proc.pid if s.proc else '?'}, answers {rep.samples[s.name]}")
            for rnd in range(opts.rounds if servers else 0):
                # Rotate the order each round so no server always runs first or last.
                order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
                # The servers' throughput runs back to back, then their latency runs: the runs
                # compared within a round are as close in time as they can be.
                for s in order:
                    res = rep.results.setdefault(s.name, ServerResult(s.name))
                    res.runs.append(throughput(s, request_file(s), opts, work, client_cpu,
                                               rep.notes, redis_port))
                for s in order:
                    res = rep.results[s.name]
                    run = res.runs[-1]
                    lt = light(s, request_file(s), opts, work, client_cpu)
                    res.lights.append(lt)
                    batching = (f", {run.scripts_per_redis_read:.2f} EVALSHA per Redis read"
                                if run.scripts_per_redis_read is not None else "")
                    log(f"round {rnd + 1} {s.name:14s} {run.rps:8,.0f} checks/s "
                        f"{run.cpu_us_per_check:5.0f} us CPU/check{batching}; light "
                        f"{lt.rate:.0f}/s p50 {lt.p50_ms:.2f} ms p99 {lt.p99_ms:.2f} ms")
            for s in servers:
                if s.charges_redis:
                    per = redis_per_decision(s, body_file, redis_port, args.deny_requests,
                                             client_cpu)
                    rep.results[s.name].redis_per_decision = per
                    log(f"Redis client commands per decision, {s.name}: {per}")
                    dc = deny_cache(s, trickle, trickle_file, redis_port, args.deny_requests,
                                    client_cpu)
                    rep.deny_cache.append(dc)
                    log(f"deny cache {s.name}: {dc['redis_commands']} Redis commands for "
                        f"{dc['over_limit_checks']} over-limit checks")
        if args.scaling and not args.rss_only:
            log("scaling (unpinned, 1 then 2 processes on one port)")

            def floor_n(n: int, port: int) -> list[Server]:
                return [Server(f"floor-{i}", [sys.executable, "-m", "loadtests.floor_server",
                                              "--port", str(port)], port, False, None)
                        for i in range(n)]

            def full_n(n: int, port: int) -> list[Server]:
                conf = cfg(f"scale-{port}", port, redis_url)
                return [Server(f"full-redis-w{n}", authz_argv(conf, n), port, True, BENCH_USER,
                               health=True)]

            rep.scaling["floor"] = measure_scaling("floor", floor_n, body_file, body, opts, work)
            if "full-redis" in args.servers:
                rep.scaling["full-redis"] = measure_scaling("full-redis", full_n, body_file,
                                                            body, opts, work)
        if args.rss_checks and "full-redis" in args.servers:
            rep.rss = measure_rss(world, work, redis_url, args, server_cpu)
    finally:
        redis_proc.stop()
        if cluster is not None:
            cluster.stop()
    rep.machine["loadavg_end"] = os.getloadavg()
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rep


def measure_rss(world: World, work: Path, redis_url: str, args: argparse.Namespace,
                server_cpu: str | None) -> dict[str, Any]:
    from . import rss

    log(f"RSS: minting {args.rss_users:,} tokens ...")
    t0 = time.perf_counter()
    bodies = rss.mint_population(world.key_file.read_bytes(), args.rss_users)
    log(f"RSS: minted in {time.perf_counter() - t0:.0f} s; driving {args.rss_checks:,} checks")
    port = free_port()
    conf = world.write_config(work / "config-rss.yaml", grpc_port=port, redis_url=redis_url)
    server = Server("rss", authz_argv(conf, 1), port, True, None, health=True)
    with running([server], work, bodies[0], server_cpu):
        assert server.proc is not None
        pid = server.proc.pid
        next_log = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now >= next_log[0]:
                next_log[0] = now + 15
                log(f"RSS: {done:,}/{total:,} checks, RSS {rss_bytes(pid) / 2**20:.1f} MB")

        def go() -> rss.RssReport:
            return asyncio.run(rss.drive(f"127.0.0.1:{port}", bodies, args.rss_checks,
                                         server_pid=pid, progress=progress))

        client_affinity = os.sched_getaffinity(0)
        if server_cpu is not None:
            os.sched_setaffinity(0, {int(CLIENT_CPU)})
        try:
            report = go()
        finally:
            os.sched_setaffinity(0, client_affinity)
        server.proc.check_alive()
        # 503: the store did not answer within store.timeout (an overloaded machine); the
        # memory measurement stands, the count is reported. Anything else is a wrong answer.
        unexpected = {k: v for k, v in report.outcomes.items()
                      if k not in ("allow", "429", "503")}
        if unexpected or report.checks != args.rss_checks:
            raise BenchError(f"RSS run: {report.checks}/{args.rss_checks} checks, unexpected "
                             f"outcomes {unexpected} (expected allow, 429, 503):\n"
                             f"{server.proc.tail()}")
    out = {
        "checks": report.checks, "users": report.users, "seconds": report.seconds,
        "checks_per_s": report.checks / report.seconds if report.seconds else 0.0,
        "outcomes": dict(report.outcomes),
        "rss_mb_start": report.start_mb, "rss_mb_after_first_pass": report.mb_at(
            min(1.0, report.users / max(1, report.checks))),
        "rss_mb_half": report.mb_at(0.5), "rss_mb_end": report.end_mb,
        "rss_mb_peak": report.peak_mb,
    }
    log(f"RSS: {json.dumps(out)}")
    return out


# ---------------------------------------------------------------------------------------------
# Output


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(rep: Report) -> str:
    lines = [f"authz benchmark {rep.started}  cpus={rep.machine['cpus']} "
             f"load={tuple(round(x, 2) for x in rep.machine['loadavg'])} "
             f"grpcio={rep.machine['grpcio']} {rep.machine['h2load']}",
             f"throughput: h2load -c {rep.options['connections']} -m {rep.options['streams']} "
             f"-D {rep.options['duration']:g}s, median of {rep.options['rounds']} round(s); "
             f"light: open loop {rep.options['light_rate']:g}/s for "
             f"{rep.options['light_duration']:g}s; "
             + ("server pinned to core 0, h2load+Redis to core 1" if rep.options["pin"]
                else "unpinned"), ""]
    head = (f"{'server':15s} {'checks/s':>9s} {'CPU us/chk':>10s} {'light rate':>10s} "
            f"{'p50 ms':>7s} {'p99 ms':>7s} {'redis/chk':>9s} {'chk/write':>9s}")
    lines += [head, "-" * len(head)]
    for r in rep.results.values():
        rpc = f"{r.redis_per_check:.3f}" if r.redis_per_check is not None else "-"
        spr = f"{r.scripts_per_read:.2f}" if r.scripts_per_read is not None else "-"
        lines.append(f"{r.name:15s} {r.rps:9,.0f} {r.cpu_us:10.0f} {r.light_rate:10.0f} "
                     f"{r.light_p50:7.2f} {r.light_p99:7.2f} {rpc:>9s} {spr:>9s}")
    rat = ratios(rep)
    lines.append("")
    targets = {"full/floor": (">=", TARGET_FULL_OVER_FLOOR),
               "full/naive": (">=", TARGET_FULL_OVER_NAIVE),
               "light p99 full/floor": ("<=", TARGET_P99_OVER_FLOOR),
               "cluster/standalone CPU per check": ("<=", TARGET_CLUSTER_CPU_OVER_STANDALONE),
               BODY_COST_KEY: ("<=", TARGET_BODY_COST_US),
               "full-http-redis/floor": (">=", TARGET_HTTP_OVER_GRPC_FLOOR),
               "light p99 full-http-redis/floor": ("<=", TARGET_HTTP_P99_OVER_GRPC_FLOOR),
               **{f"{key} (paired rounds)": (">=", target)
                  for key, _name, target in TELEMETRY_RATIOS}}
    for key, val in rat.items():
        t = targets.get(key)
        if t is None:
            lines.append(f"{key:40s} {val:6.2f}")
        else:
            ok = val >= t[1] if t[0] == ">=" else val <= t[1]
            lines.append(f"{key:40s} {val:6.2f}   target {t[0]} {t[1]:g}: {verdict(ok)}")
    full = rep.results.get("full-redis")
    if full is not None and full.redis_per_check is not None:
        ok = abs(full.redis_per_check - 1.0) < 0.001
        lines.append(f"{'redis cmds/decision':40s} {full.redis_per_check:6.3f}   target 1 "
                     f"(2 limits per decision) {full.redis_per_decision}: {verdict(ok)}")
    for dc in rep.deny_cache:
        lines.append(f"over-limit {dc['server']:12s} {dc['redis_commands']:6d} Redis cmds for "
                     f"{dc['over_limit_checks']:,} checks ({dc['rps']:,.0f} checks/s)")
    if rep.rss:
        r = rep.rss
        lines.append(f"RSS after {r['checks']:,} checks over {r['users']:,} users: start "
                     f"{r['rss_mb_start']:.1f} MB, after first pass "
                     f"{r['rss_mb_after_first_pass']:.1f} MB, half {r['rss_mb_half']:.1f} MB, "
                     f"end {r['rss_mb_end']:.1f} MB, peak {r['rss_mb_peak']:.1f} MB "
                     f"({r['checks_per_s']:,.0f} checks/s; outcomes {r['outcomes']})")
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)


SERVER_NAMES = ("floor", "io-floor", "full-redis", "naive", "full-memory", "full-notel",
                "full-otel", "full-otel-1pct", "full-cluster", "full-body",
                "full-body-unused", "http-floor", "full-http-redis", "full-http-memory")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Side-by-side Check benchmark: floor, io-floor, full (Redis), naive, "
                    "full (memory), full with telemetry off / always-on / 1% sampling, on a "
                    "Redis Cluster, and the HTTP edge (floor, Redis, memory).")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: 1 round of ~1 s runs, tiny RSS check; targets not judged")
    ap.add_argument("--servers", default=",".join(SERVER_NAMES),
                    help=f"comma-separated subset of {','.join(SERVER_NAMES)}")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up before each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", "-c", type=int, default=16)
    ap.add_argument("--streams", "-m", type=int, default=8)
    ap.add_argument("--light-rate", type=float, default=500.0, help="open-loop checks/s")
    ap.add_argument("--light-duration", type=float, default=6.0)
    ap.add_argument("--deny-requests", type=int, default=5000,
                    help="over-limit checks sent in the deny-cache measurement")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="skip the 1-vs-2 worker processes measurement")
    ap.add_argument("--rss-checks", type=int, default=0,
                    help="also run the RSS check with this many checks (e.g. 1000000)")
    ap.add_argument("--rss-users", type=int, default=100_000)
    ap.add_argument("--rss-only", action="store_true",
                    help="only the RSS check (default 1M checks over --rss-users users)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument("--json", type=Path, default=None,
                    help="write results here (default loadtests/results/bench-<time>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.rss_only and not args.rss_checks:
        args.rss_checks = 1_000_000
    unknown = set(args.servers) - set(SERVER_NAMES)
    if unknown:
        ap.error(f"unknown server(s) {sorted(unknown)}; choose from {SERVER_NAMES}")
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.7, 0.3, 1
        args.light_rate, args.light_duration, args.deny_requests = 200.0, 0.7, 500
        if not args.rss_checks:
            args.rss_checks, args.rss_users = 2_000, 500
    return args


def missed(rep: Report) -> list[str]:
    rat = ratios(rep)
    out = []
    if rat.get("full/floor", 1.0) < TARGET_FULL_OVER_FLOOR:
        out.append("full/floor")
    if rat.get("full/naive", 2.0) < TARGET_FULL_OVER_NAIVE:
        out.append("full/naive")
    if rat.get("light p99 full/floor", 1.0) > TARGET_P99_OVER_FLOOR:
        out.append("light p99")
    if rat.get("full-http-redis/floor", 3.0) < TARGET_HTTP_OVER_GRPC_FLOOR:
        out.append("full-http-redis/floor")
    if rat.get("light p99 full-http-redis/floor", 1.0) > TARGET_HTTP_P99_OVER_GRPC_FLOOR:
        out.append("light p99 full-http-redis/floor")
    for key, _name, target in TELEMETRY_RATIOS:
        if rat.get(f"{key} (paired rounds)", 1.0) < target:
            out.append(key)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rep = bench(args)
    except (BenchError, h2load.H2loadError) as e:
        log(f"bench: {e}")
        return 2
    print(render(rep))
    out = args.json or RESULTS / f"bench-{rep.started.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep.to_json(), indent=2, default=str) + "\n")
    log(f"results written to {out}")
    if args.strict and not args.quick and missed(rep):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
