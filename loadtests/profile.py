"""Where a server's time goes under load: py-spy samples while h2load drives it.

    python -m loadtests.profile full-redis --seconds 10        # or floor, naive, full-memory
    python -m loadtests.profile full-redis --native           # include C frames (grpc core)

py-spy pauses the server for each sample and takes it only while Python holds the GIL
(`--gil`): the stacks are whole, and time in C with the GIL held (grpc's Cython and core, uvloop)
shows as the event loop's own frame. `--nonblocking` samples without pausing, which disturbs the
server least but mixes frames from different moments into one stack (seen here: `Logger.debug`
"called by" `_Link.send`), so its per-function shares are not to be trusted. `--native` unwinds
C stacks too and slows the server ~15x.

The server runs pinned to core 0 (h2load and Redis on core 1), exactly as in the benchmark. The
output is py-spy's collapsed stacks (speedscope.app or flamegraph.pl draw them) plus a text
summary: the share of samples in each function, inclusive ("in this or below") and exclusive
("in this itself"), for the top frames.

py-spy is a separate tool: `python3 -m venv .tools/py-spy && .tools/py-spy/bin/pip install
py-spy` (or any py-spy on PATH). It reads the process from outside, so it needs ptrace rights
(root or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import h2load
from .bench import BENCH_USER, CLIENT_CPU, RESULTS, SERVER_CPU, Server, authz_argv, running
from .population import UNSAMPLED_TRACEPARENT, check_request, grpc_frame, write_world
from .procs import free_port, start_redis

REPO = Path(__file__).resolve().parents[1]


def find_py_spy() -> str:
    local = REPO / ".tools" / "py-spy" / "bin" / "py-spy"
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: python3 -m venv .tools/py-spy && "
                         ".tools/py-spy/bin/pip install py-spy")
    return found


def summarize(raw: Path, top: int = 40) -> str:
    """Inclusive and exclusive sample shares per frame from py-spy's raw (collapsed) output."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    exclusive: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        exclusive[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "by layer (what runs right below the event loop):"]
    lines += [f"  {n / total * 100:5.1f}%  {name}" for name, n in layers(raw).most_common()]
    lines += ["", "inclusive (this frame or below):"]
    lines += [f"  {n / total * 100:5.1f}%  {f[:140]}" for f, n in inclusive.most_common(top)]
    lines += ["", "exclusive (in this frame itself):"]
    lines += [f"  {n / total * 100:5.1f}%  {f[:140]}" for f, n in exclusive.most_common(top)]
    return "\n".join(lines)


def layers(raw: Path) -> collections.Counter[str]:
    """Samples per layer: the service's own code, OpenTelemetry, Python called by grpc/asyncio
    (task scheduling, handler checks), C below the loop (grpc core, uvloop: no Python frame
    above the loop's), and other threads (the span export thread, the metrics server)."""
    out: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        loop = next((i for i, f in enumerate(frames) if f.startswith("Runner.run")), None)
        if loop is None:
            layer = "other threads"
        elif loop == len(frames) - 1:
            layer = "C below the event loop (grpc core and Cython, uvloop)"
        elif any("opentelemetry/" in f for f in frames[loop + 1:]):
            layer = "OpenTelemetry (SDK and API)"
        elif any("authz/" in f for f in frames[loop + 1:]):
            layer = "the service (authz/)"
        else:
            layer = "Python called by grpc or asyncio: " + frames[loop + 1].split(" (")[0]
        out[layer] += int(count)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.profile", description=__doc__)
    ap.add_argument("server", choices=("floor", "full-redis", "naive", "full-memory",
                                       "full-otel", "full-otel-1pct", "full-notel"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="also sample C/C++ frames")
    ap.add_argument("--nonblocking", action="store_true",
                    help="sample without pausing the server (stacks may mix moments)")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = ap.parse_args(argv)
    spy = find_py_spy()
    work = Path(tempfile.mkdtemp(prefix="authz-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    redis_proc, redis_port = start_redis(work, CLIENT_CPU)
    try:
        world = write_world(work / "world")
        token = world.signer().token(BENCH_USER, "bench")
        body = check_request(
            "Bearer " + token,
            **({"traceparent": UNSAMPLED_TRACEPARENT} if args.server == "full-otel-1pct"
               else {})).SerializeToString()
        body_file = work / "body.bin"
        body_file.write_bytes(grpc_frame(body))
        port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        cfg = world.write_config(work / "config.yaml", grpc_port=port,
                                 redis_url="" if args.server == "full-memory" else redis_url,
                                 # the bench's otel rows serve metrics
                                 metrics_port=free_port() if "otel" in args.server else 0)
        argv_for = {
            "floor": [sys.executable, "-m", "loadtests.floor_server", "--port", str(port)],
            "naive": [sys.executable, "-m", "loadtests.naive_server", "--config", str(cfg),
                      "--port", str(port)],
            "full-redis": authz_argv(cfg, 1),
            "full-memory": authz_argv(cfg, 1),
            "full-otel": authz_argv(cfg, 1),
            "full-otel-1pct": authz_argv(cfg, 1),
            "full-notel": authz_argv(cfg, 1),
        }
        # As the bench runs them (loadtests/bench.py).
        envs = {"full-otel": {"OTEL_TRACES_SAMPLER": "always_on",
                              "OTEL_TRACES_EXPORTER": "authz_discard"},
                "full-otel-1pct": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                   "OTEL_TRACES_SAMPLER_ARG": "0.01",
                                   "OTEL_TRACES_EXPORTER": "authz_discard"},
                "full-notel": {"OTEL_SDK_DISABLED": "true"}}
        server = Server(args.server, argv_for[args.server], port, False, None,
                        health=args.server.startswith("full"),
                        env=envs.get(args.server, {}))
        with running([server], work, body, SERVER_CPU):
            assert server.proc is not None
            h2load.run(server.url, body_file, cpu=CLIENT_CPU, duration=2.0)  # warm-up
            result: dict[str, h2load.H2loadResult] = {}

            def load() -> None:
                result["r"] = h2load.run(server.url, body_file, cpu=CLIENT_CPU,
                                         duration=args.seconds + 2)

            t = threading.Thread(target=load)
            t.start()
            time.sleep(1.0)
            stamp = time.strftime("%Y%m%dT%H%M%S")
            base = args.out / f"{args.server}-{stamp}"
            cmd = [spy, "record", "--pid", str(server.proc.pid), "--duration",
                   str(int(args.seconds)), "--rate", str(args.rate), "--format", "raw",
                   "--output", f"{base}.txt"]
            # Whole stacks need the process paused for each sample (see the module docstring).
            if args.native:
                cmd.append("--native")
            elif args.nonblocking:
                cmd.append("--nonblocking")
            else:
                cmd.append("--gil")
            spied = subprocess.run(cmd, capture_output=True, text=True, check=False)
            t.join()
            if spied.returncode != 0:
                raise SystemExit(f"py-spy failed ({spied.returncode}):\n{spied.stderr[-2000:]}")
        print(f"{args.server}: {result['r'].rps:,.0f} checks/s under h2load -c 16 -m 8 while "
              f"sampled (py-spy costs the server a little)")
        summary = summarize(Path(f"{base}.txt"))
        Path(f"{base}-summary.txt").write_text(summary + "\n")
        print(summary)
        print(f"\nraw collapsed stacks: {base}.txt (flamegraph.pl or speedscope.app read them)")
    finally:
        redis_proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
