"""Run h2load (nghttp2's C HTTP/2 load generator) against a gRPC method, or (`--h1`) against the
HTTP edge, and parse what it says.

h2load knows nothing about gRPC: it POSTs a fixed body (the 5-byte gRPC frame prefix plus a
serialized CheckRequest) with `content-type: application/grpc` and `te: trailers`, and counts
HTTP 200s. A gRPC error is also an HTTP 200 (grpc-status travels in trailers), so callers check
`data_bytes_per_request`: every Check our servers answer carries a response message, a gRPC
error carries none.

For the HTTP edge (`body=None`, `h1=True`) it sends the check request Envoy's HTTP client
would: a GET of the check path with the given headers, one request in flight per connection
(Envoy does not pipeline HTTP/1.1); the status codes it counts are the decisions' own.

h2load prints no percentiles; `--log-file` writes one line per request (start time in us since
the epoch, HTTP status, duration in us) and the percentiles are computed from that.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")

_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_DATA = re.compile(r"\((\d+)\) data")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


class H2loadError(RuntimeError):
    pass


def find_h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise H2loadError(
            "h2load not found: install it with `apt-get install -y nghttp2-client` (Debian/Ubuntu)"
        )
    return path


@dataclass
class H2loadResult:
    seconds: float
    rps: float
    total: int
    done: int
    succeeded: int
    failed: int
    errored: int
    data_bytes: int
    # Answers by status class: {"2xx": n, "3xx": n, "4xx": n, "5xx": n}.
    status_codes: dict[str, int] = field(default_factory=dict)
    # Per-request durations (us) from the log file, in completion order.
    durations_us: list[int] = field(default_factory=list)
    starts_us: list[int] = field(default_factory=list)
    output: str = ""

    @property
    def data_bytes_per_request(self) -> float:
        return self.data_bytes / self.done if self.done else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the request durations, in ms (nan when none)."""
        if not self.durations_us:
            return float("nan")
        ordered = sorted(self.durations_us)
        rank = min(len(ordered), max(1, math.ceil(q / 100.0 * len(ordered))))
        return ordered[rank - 1] / 1000.0

    def achieved_rate(self) -> float:
        """Requests/s measured from the log's start times (for the open-loop run)."""
        if len(self.starts_us) < 2:
            return 0.0
        span = (max(self.starts_us) - min(self.starts_us)) / 1e6
        return (len(self.starts_us) - 1) / span if span > 0 else 0.0


def parse_output(text: str) -> H2loadResult:
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    if finished is None or requests is None:
        raise H2loadError(f"cannot parse h2load output:\n{text[-2000:]}")
    data = _DATA.search(text)
    status = _STATUS.search(text)
    codes = dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(x) for x in status.groups()),
                     strict=True)) if status else {}
    total, _started, done, ok, failed, errored, _timeout = (int(x) for x in requests.groups())
    return H2loadResult(
        seconds=float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0),
        rps=float(finished.group(3)),
        total=total,
        done=done,
        succeeded=ok,
        failed=failed,
        errored=errored,
        data_bytes=int(data.group(1)) if data else 0,
        status_codes=codes,
        output=text,
    )


def read_log(path: Path) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    durations: list[int] = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            starts.append(int(parts[0]))
            durations.append(int(parts[2]))
    return starts, durations


def run(
    url: str,
    body: Path | None,
    *,
    cpu: str | None,
    connections: int = 16,
    streams: int = 8,
    duration: float | None = None,
    requests: int | None = None,
    timing_script: Path | None = None,
    log_file: Path | None = None,
    timeout: float = 120.0,
    threads: int = 1,
    h1: bool = False,
    headers: tuple[str, ...] = (),
) -> H2loadResult:
    """One h2load run; `cpu` pins it with taskset (None: unpinned). `body` None: no request
    body and no gRPC headers (the HTTP edge); `h1`: HTTP/1.1; `headers`: "name: value"."""
    argv: list[str] = []
    if cpu is not None:
        argv += ["taskset", "-c", cpu]
    argv += [find_h2load(), "-t", str(threads), "-c", str(connections), "-m", str(streams)]
    if h1:
        argv.append("--h1")
    if body is not None:
        argv += ["-d", str(body)]
        for h in GRPC_HEADERS:
            argv += ["-H", h]
    for h in headers:
        argv += ["-H", h]
    if duration is not None:
        argv += ["-D", f"{round(duration * 1000)}ms"]
    if requests is not None:
        argv += ["-n", str(requests)]
    if timing_script is not None:
        argv += ["--timing-script-file", str(timing_script)]
    if log_file is not None:
        log_file.unlink(missing_ok=True)
        argv += ["--log-file", str(log_file)]
    if timing_script is None:
        argv.append(url)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise H2loadError(f"h2load exited {proc.returncode}: {' '.join(argv)}\n{text[-2000:]}")
    result = parse_output(text)
    if log_file is not None and log_file.exists():
        result.starts_us, result.durations_us = read_log(log_file)
    return result


def write_timing_script(path: Path, url: str, rate: float, seconds: float) -> int:
    """An open-loop schedule: one request every 1/rate s, for `seconds`. Returns the count.

    h2load issues each request at its offset whether or not earlier ones have been answered
    (up to -m streams in flight), so latency is not hidden by waiting for slow answers.
    """
    count = max(1, int(rate * seconds))
    step_ms = 1000.0 / rate
    path.write_text("".join(f"{i * step_ms:.3f}\t{url}\n" for i in range(count)))
    return count
