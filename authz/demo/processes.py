"""Child processes for the demo and the end-to-end tests: started on loopback, always stopped.

Every wait is bounded and every process is stopped by `stop()` (SIGTERM, then SIGKILL), which is
idempotent; callers use `with` or try/finally so a failing test or a Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ProcessError

# prctl(PR_SET_PDEATHSIG) (linux/prctl.h): the kernel signals the child when its parent dies.
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None

# Envoy 1.40 starts in ~0.2 s here and a Python service imports grpc in ~1 s; 20 s absorbs a
# loaded 2-core CI machine without letting a broken start hang a test run.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_POLL = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback TCP port nobody listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _terminate_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it if the parent dies, even by SIGKILL.

    libc is loaded before the fork, so this makes one system call and takes no Python locks.
    """
    if _LIBC is not None and sys.platform == "linux":
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """One child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ManagedProcess:
        if self.running:
            return self
        self._terminated = False
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # Own process group: a Ctrl-C in the demo's terminal reaches only the demo,
                # which then stops its children in order instead of all dying at once.
                start_new_session=True,
                preexec_fn=_terminate_with_parent if self.die_with_parent else None,
            )
        return self

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ProcessError(
                f"{self.name} exited with status {self._proc.returncode}:\n{self.log_tail()}"
            )

    def signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM once, without waiting (stop() then waits). Several processes told at once
        drain together."""
        if self._proc is not None and self._proc.poll() is None and not self._terminated:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            self._terminated = True

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (once only: the service takes a second signal as "exit now, skip the
        drain"), wait, then SIGKILL. Idempotent; also resumes a SIGSTOPped child."""
        self.terminate()
        proc, self._proc = self._proc, None
        self._terminated = False
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Any, what: str, timeout: float = START_TIMEOUT) -> None:
        """Poll `ready()` until true; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():
                return
            time.sleep(_POLL)
        raise ProcessError(f"{self.name}: {what} within {timeout} s:\n{self.log_tail()}")


class EnvoyProcess:
    """Envoy running a bootstrap file; ports may be 0 (read back through the admin API)."""

    def __init__(
        self,
        binary: Path,
        config: Path,
        work_dir: Path,
        *,
        log_level: str = "warn",
        die_with_parent: bool = False,
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        self._admin_file = work_dir / "envoy-admin-address"
        self.proc = ManagedProcess(
            "envoy",
            [
                str(binary),
                "-c",
                str(config),
                "--admin-address-path",
                str(self._admin_file),
                # Several Envoys (tests, engineers) share this machine: no shared-memory
                # hot-restart region, so no --base-id clashes.
                "--disable-hot-restart",
                # One worker thread: this is a test sidecar on a 2-core machine.
                "--concurrency",
                "1",
                "--log-level",
                log_level,
            ],
            log_dir=work_dir,
            die_with_parent=die_with_parent,
        )
        self.admin = ""  # host:port once started
        self.port = 0  # the listener's port once started

    def start(self) -> EnvoyProcess:
        self._admin_file.unlink(missing_ok=True)
        self.proc.start()
        try:
            self.proc.wait_until(self._admin_file_ready, "admin address not written")
            self.proc.wait_until(self._live, "not LIVE")
            self.port = self._listener_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _admin_file_ready(self) -> bool:
        try:
            self.admin = self._admin_file.read_text().strip()
        except OSError:
            return False
        return bool(self.admin)

    def _live(self) -> bool:
        try:
            return self.admin_get("/ready").strip() == "LIVE"
        except (OSError, urllib.error.URLError):
            return False

    def _listener_port(self) -> int:
        listeners = json.loads(self.admin_get("/listeners?format=json"))
        for status in listeners.get("listener_statuses", []):
            address = status.get("local_address", {}).get("socket_address", {})
            if "port_value" in address:
                return int(address["port_value"])
        raise ProcessError(f"envoy reports no listener: {listeners}")

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as resp:
            body: bytes = resp.read()
            return body.decode()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with `prefix` (histograms left out)."""
        out: dict[str, int] = {}
        for line in self.admin_get("/stats?usedonly").splitlines():
            name, sep, value = line.partition(": ")
            if sep and name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_grpc_serving(target: str, proc: ManagedProcess, timeout: float = START_TIMEOUT) -> None:
    """Wait until grpc.health.v1 says SERVING for the Authorization service on `target`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def serving() -> bool:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization")
            try:
                reply = stub.Check(request, timeout=1.0)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    proc.wait_until(serving, f"gRPC health not SERVING on {target}", timeout)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without AUTHZ_* settings a user may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    env.update(extra or {})
    return env


class WorkDir:
    """A temporary directory for configs and logs; kept (and named) if KEEP_E2E_LOGS is set."""

    def __init__(self, prefix: str = "authz-e2e-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))

    def cleanup(self) -> None:
        if os.environ.get("KEEP_E2E_LOGS"):
            return
        shutil.rmtree(self.path, ignore_errors=True)
