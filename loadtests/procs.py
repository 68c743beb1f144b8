"""CPU time and resident memory of a process and its descendants, read from /proc (Linux).

The benchmark divides a server's CPU seconds by the checks it answered (CPU per check), and the
RSS check samples resident memory; both count the whole process tree, so a server that forks
workers is measured as a whole.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from authz.demo.processes import ManagedProcess, free_port
from authz.errors import ProcessError

REPO = Path(__file__).resolve().parents[1]
# Our own redis-server on a free port, never the system one on 6379 (same variable as the tests).
REDIS_SERVER = os.environ.get("AUTHZ_TEST_REDIS_SERVER", "/usr/bin/redis-server")


ProcError = ProcessError  # a child process did not start or died (authz.errors)

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by pid and its descendants (living ones)."""
    total = 0
    for p in descendants(pid):
        fields = _stat_fields(p)
        if fields is not None:
            # After the name: state ppid ... utime is field 14 overall, index 11 here.
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of pid and its descendants."""
    total = 0
    for p in descendants(pid):
        try:
            pages = int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += pages * _PAGE
    return total


class Proc(ManagedProcess):
    """A benchmark child: optionally pinned to `cpu` (taskset), run from the repository, with
    no AUTHZ_* / OTEL_* settings leaking in from the caller's environment."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, cpu: str | None,
                 env: dict[str, str] | None = None) -> None:
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("AUTHZ_", "OTEL_"))}
        super().__init__(name, (["taskset", "-c", cpu] if cpu is not None else []) + list(argv),
                         log_dir=log_dir, env={**inherited, **(env or {})}, cwd=REPO)

    def tail(self, lines: int = 30) -> str:
        return self.log_tail(lines)


def stop_all(procs: Sequence[Proc]) -> None:
    """Stop several processes at once: all get SIGTERM, then each is waited for (or killed)."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop()


def start_redis(work: Path, cpu: str | None) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc("redis", [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(work)], work, cpu)
    proc.start()
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    try:
        while True:
            proc.check_alive()
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise ProcError(f"redis-server did not answer:\n{proc.tail()}") from None
                time.sleep(0.05)
    except BaseException:
        proc.stop()
        raise
    finally:
        client.close()
    return proc, port
