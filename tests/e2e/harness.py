"""End-to-end building blocks: keys and tokens, Redis, the service, and a whole sidecar stack.

Every component runs for real on loopback ports: redis-server, `authz serve` (as a child
process, as in production), Envoy 1.40 with the config `authz.mesh.sidecar` generates, and the
model stand-in. Each is stopped by the `with` that started it, also when a test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from authz.demo.processes import (
    EnvoyProcess,
    ManagedProcess,
    ProcessError,
    clean_env,
    free_port,
    wait_grpc_serving,
)
from authz.demo.upstream import ModelStandIn
from authz.mesh.sidecar import HTTP_PATH_PREFIX, SidecarSpec, write
from authz.tokens.signer import Signer

REDIS_SERVER = "/usr/bin/redis-server"
ISSUER = "https://issuer.e2e.test"
AUDIENCE = "ml-inference-api"
PROVIDER = "rate-limiter"

# The e2e quota: small numbers so a burst is four requests and a refill is two seconds.
# rate 1 per 2 s (not per 1 s) leaves a loaded CI machine a full second of slack inside a burst.
QUOTA: dict[str, Any] = {
    "plan_claim": "plan",
    "default_plan": "free",
    "plans": {
        "free": {
            "limits": [{"name": "per-2s", "rate": 1, "per": "2s", "burst": 3}],
            "models": {"allowed-*": {}},  # any other model: 403
        },
    },
}
BURST = 3


class Keys(Signer):
    """An RSA issuer: its JWKS file for the service, and tokens signed with its key."""

    def __init__(self, directory: Path, issuer: str = ISSUER, kid: str = "e2e-1") -> None:
        super().__init__(issuer, Signer.generate(issuer, kid=kid).key, kid=kid)
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps(self.jwks))

    def token(self, sub: str, *, plan: str | None = None, ttl: float = 300,
              audience: str = AUDIENCE, key: rsa.RSAPrivateKey | None = None) -> str:
        return self.mint(sub, plan=plan, ttl=ttl, audience=audience, key=key)

    def forged_token(self, sub: str) -> str:
        """Same kid and claims, signed by a key the service does not know."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.token(sub, key=other)


def new_subject(label: str) -> str:
    """A fresh user per test, so tests never share a bucket."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


class Redis:
    def __init__(self, work_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = work_dir / f"redis-{self.port}"
        self._dir.mkdir()
        self.proc = ManagedProcess(
            f"redis-{self.port}",
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
            ],
            log_dir=work_dir,
        )

    def start(self) -> Redis:
        self.proc.start()
        self.proc.wait_until(self._answers, "redis-server did not answer PING")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class ServiceOptions:
    redis_url: str = ""
    on_error: str = "deny"
    # The production default is 50 ms; on a 2-core machine shared with other test runs the
    # service process can be descheduled that long, and a 503 there would test the scheduler.
    # The 50 ms bound itself is tested with a hung Redis (test_store_and_replicas).
    store_timeout: str = "250ms"
    quota: Mapping[str, Any] = field(default_factory=lambda: QUOTA)
    headers: Mapping[str, Any] = field(default_factory=dict)  # the config's `headers` section
    paths: Mapping[str, Any] = field(default_factory=dict)  # the config's `paths` section


class AuthzService:
    """`python -m authz serve --config FILE` as a child process, waited on until SERVING.

    Both edges are on, over the one pipeline: gRPC on `port`, HTTP on `http_port` (check
    requests under HTTP_PATH_PREFIX, as the shipped envoyExtAuthzHttp registration sends them).
    """

    def __init__(self, work_dir: Path, keys: Keys, options: ServiceOptions, name: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        quota_file = work_dir / f"{name}-quota.yaml"
        quota_file.write_text(yaml.safe_dump(dict(options.quota)))
        config = {
            "server": {
                "host": "127.0.0.1",
                "grpc_port": self.port,
                "http_port": self.http_port,
                "http_path_prefix": HTTP_PATH_PREFIX,
                "metrics_port": 0,
                "workers": 1,
                "drain_delay": "0s",
                "shutdown_grace": "2s",
            },
            "auth": {
                "audience": AUDIENCE,
                "issuers": [{"issuer": keys.issuer, "jwks_file": str(keys.jwks_file)}],
            },
            "store": {
                "redis_url": options.redis_url,
                "timeout": options.store_timeout,
                "on_error": options.on_error,
            },
            "quota_file": str(quota_file),
            "telemetry": {"log_format": "text"},
        }
        if options.headers:
            config["headers"] = dict(options.headers)
        if options.paths:
            config["paths"] = dict(options.paths)
        self.config_file = work_dir / f"{name}.yaml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc = ManagedProcess(
            name,
            [sys.executable, "-m", "authz", "serve", "--config", str(self.config_file)],
            log_dir=work_dir,
            env=clean_env(),
        )

    def start(self) -> AuthzService:
        self.proc.start()
        try:
            wait_grpc_serving(self.target, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.proc.stop()

    def endpoint(self, protocol: str) -> tuple[str, int]:
        """Where a sidecar's provider cluster points for this protocol ("grpc" or "http")."""
        return ("127.0.0.1", self.http_port if protocol == "http" else self.port)


def provider_options(protocol: str) -> dict[str, Any]:
    """SidecarSpec options of the shipped registration for `protocol`: the gRPC provider, or
    the HTTP one (port 8000 in the mesh, checks under HTTP_PATH_PREFIX)."""
    if protocol == "http":
        return {"protocol": "http", "service_port": 8000, "path_prefix": HTTP_PATH_PREFIX}
    return {}


class BlackHole:
    """A TCP listener that accepts and never answers: a hung ext_authz provider."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="black-hole")

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)  # held open, never read: the peer just waits

    def __enter__(self) -> BlackHole:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._conns:
            conn.close()
        self._sock.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
    more_headers: Sequence[tuple[str, str]] = (),
) -> Reply:
    """One request on a fresh connection (no client-side pooling to blur what Envoy does).
    `more_headers`: sent after `headers`, repeated names included."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        # skip_accept_encoding: send exactly the headers the test names.
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in [*(headers or {}).items(), *more_headers]:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        merged: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Reply(resp.status, merged, data, time.monotonic() - started)
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Sidecar:
    """Envoy configured as the Istio sidecar in front of a model stand-in."""

    def __init__(
        self,
        envoy_bin: Path,
        work_dir: Path,
        upstream: ModelStandIn,
        endpoints: Sequence[tuple[str, int]],
        name: str = "envoy",
        **spec_options: Any,
    ) -> None:
        self.upstream = upstream
        # 1 s, the top of the recommended 200 ms-1 s range, for the same reason as the store
        # timeout above; tests of the timeout itself pass their own.
        spec_options.setdefault("timeout", 1.0)
        self.spec = SidecarSpec(
            listener_port=0,
            admin_port=0,
            app_port=upstream.port,
            endpoints=tuple(endpoints),
            provider=PROVIDER,
            **spec_options,
        )
        directory = work_dir / name
        directory.mkdir()
        self.config = directory / "envoy.yaml"
        write(self.spec, self.config)
        self.envoy = EnvoyProcess(envoy_bin, self.config, directory)

    def start(self) -> Sidecar:
        self.envoy.start()
        return self

    def stop(self) -> None:
        self.envoy.stop()

    @property
    def port(self) -> int:
        return self.envoy.port

    def request(self, path: str, **kwargs: Any) -> Reply:
        return http_request(self.envoy.port, path, **kwargs)

    def ext_authz_stats(self) -> dict[str, int]:
        """ext_authz filter counters (ok, denied, error, failure_mode_allowed, ...)."""
        prefix = f"http.inbound_0.0.0.0_{self.spec.app_port}.ext_authz."
        return {k[len(prefix) :]: v for k, v in self.envoy.stats(prefix).items()}

    def checks_sent(self) -> int:
        """Requests Envoy sent to the provider cluster, whatever their outcome."""
        name = f"cluster.{self.spec.outbound_cluster}.upstream_rq_total"
        return self.envoy.stats(name).get(name, 0)

    def requests_per_endpoint(self) -> dict[str, int]:
        """rq_total per provider endpoint, from the admin /clusters page."""
        out: dict[str, int] = {}
        for line in self.envoy.admin_get("/clusters").splitlines():
            # <cluster>::<host:port>::<stat>::<value>
            parts = line.split("::")
            if parts[0] == self.spec.outbound_cluster and parts[2:3] == ["rq_total"]:
                out[parts[1]] = int(parts[3])
        return out


@contextlib.contextmanager
def started(*components: Any) -> Iterator[None]:
    """Start components in order; stop all of them (in reverse) however the block ends."""
    with contextlib.ExitStack() as stack:
        for component in components:
            stack.callback(component.stop)
            component.start()
        yield


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


__all__ = [
    "AUDIENCE",
    "BURST",
    "ISSUER",
    "QUOTA",
    "AuthzService",
    "BlackHole",
    "Keys",
    "ProcessError",
    "Redis",
    "Reply",
    "ServiceOptions",
    "Sidecar",
    "bearer",
    "http_request",
    "new_subject",
    "provider_options",
    "started",
    "wait_for",
]
