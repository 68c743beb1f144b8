"""`authz serve --workers N`: N single-process servers on one port, supervised.

Python runs one decision at a time per process, so one process uses one core. Each worker is a
fresh interpreter (not a fork: grpc and event loops do not survive fork) with its own event
loop and Redis connection; the kernel spreads connections across them (SO_REUSEPORT).
The supervisor restarts a worker that dies, forwards SIGTERM/SIGINT so all drain together
(and SIGHUP, so all re-read the quota file),
and exits once they have. A worker that fails to *start* (exit status 2: bad keys, store,
port) is not restarted: the supervisor stops the others and exits with that status.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from ..errors import EXIT_STARTUP, StartupError

log = logging.getLogger(__name__)

# A worker that keeps dying is restarted at most this often, so a crash loop does not spin.
_RESTART_BACKOFF_S = 1.0


def reserve_port(host: str, port: int, key: str = "server.grpc_port"
                 ) -> tuple[int, socket.socket | None]:
    """Claim `host:port` for this supervisor's workers: (the port, a claim to keep open).

    The workers bind with SO_REUSEPORT so the kernel spreads connections across them; any
    other process of the same user that also asks for SO_REUSEPORT could then join them and
    take a share of the connections. So first: (1) an abstract-namespace unix socket named
    after the port, which only one supervisor can hold and which goes away with it (even on
    SIGKILL); (2) a bind of the port without SO_REUSEPORT, which fails if anyone listens there
    (a lone `authz serve`, or another program). Port 0 becomes a free port, passed to every
    worker. Raises StartupError.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as e:
        raise StartupError(f"cannot listen on {host}:{port}: {e}") from None
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]
    except OSError as e:
        raise StartupError(f"cannot listen on {host}:{port} ({key} {port}): "
                           f"{e.strerror or e}; is another process using the port?") from None
    finally:
        probe.close()
    claim: socket.socket | None = None
    if hasattr(socket, "AF_UNIX") and sys.platform.startswith("linux"):
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0authz-{key.rpartition('.')[2].replace('_', '-')}-{port}")
        except OSError:
            claim.close()
            raise StartupError(f"cannot listen on {host}:{port} ({key} {port}): "
                               "another `authz serve --workers` supervisor holds it") from None
    return port, claim


def supervise(worker_argv: Sequence[str], workers: int, *, grace_s: float,
              env_for: Callable[[int], dict[str, str]] | None = None) -> int:
    """Run `workers` copies of `python -m authz <worker_argv>`; returns the exit status.

    `env_for(i)`: extra environment for worker i (e.g. where it serves its own metrics)."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    signals_seen = 0

    def spawn(i: int) -> None:
        env = dict(os.environ, AUTHZ_WORKER_INDEX=str(i), **(env_for(i) if env_for else {}))
        # A worker starts with SIGHUP blocked (the mask survives exec), so a SIGHUP forwarded
        # while it is still starting waits for its handler instead of killing it.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            procs[i] = subprocess.Popen([sys.executable, "-m", "authz", *worker_argv], env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        log.info("worker started", extra={"worker": i, "pid": procs[i].pid})

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping, signals_seen
        signals_seen += 1
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if signals_seen > 1 else signum)

    def on_hup(signum: int, _frame: FrameType | None) -> None:
        # SIGHUP means "re-read the quota file": every worker does it itself.
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    for i in range(workers):
        spawn(i)
    # Held back since `authz serve` began (cli._serve): from here on, forwarded to every worker.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    status = 0
    last_restart = 0.0
    deadline: float | None = None
    while procs:
        time.sleep(0.1)
        if stopping and deadline is None:
            deadline = time.monotonic() + grace_s + 5.0
        for i, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            del procs[i]
            if stopping:
                status = status or (code if code > 0 else 0)
                continue
            if code == EXIT_STARTUP:
                log.error("worker could not start; stopping the others", extra={"worker": i})
                status = EXIT_STARTUP
                stopping = True
                for q in procs.values():
                    q.send_signal(signal.SIGTERM)
                continue
            log.error("worker died; restarting", extra={"worker": i, "exit_status": code})
            wait = last_restart + _RESTART_BACKOFF_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last_restart = time.monotonic()
            spawn(i)
        if deadline is not None and time.monotonic() > deadline:
            for p in procs.values():
                p.kill()
    return status
