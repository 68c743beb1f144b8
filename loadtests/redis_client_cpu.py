"""Client CPU per decision: the project's RESP transport against redis-py's own pipeline.

Whether redis-py (which already implements cluster routing and sentinel discovery) could carry
the hot path instead of the project's own transport. Measured here in one run, on the same
redis-server, with the same two-bucket EVALSHA per decision and the same coalescing (every
charge made during one loop tick goes out in one write):

- `RedisBucketStore` (authz/buckets): the hand-written transport.
- `redis-py pipeline`: redis.asyncio with hiredis, each loop tick's charges sent as one
  `pipeline(transaction=False)` (the coalescer below), bounded by the same timeout.
- `redis-py evalsha`: one `evalsha` call per decision (what the original 10x figure compared).
- `redis-py cluster pipeline` (with --cluster): `RedisCluster.pipeline()` on a 3-master
  cluster against the transport's cluster mode, when available.

Not a test: numbers vary run to run on a shared VM; ratios in one run are what to read.
    .venv/bin/python -m loadtests.redis_client_cpu [--uvloop] [--decisions N]
It starts its own redis-server and reports this process's CPU time (user + kernel; Redis runs
in its own process) per decision, and decisions/s.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aredis

from authz.buckets import MemoryBucketStore, RedisBucketStore
from authz.buckets.redis import SCRIPT
from authz.buckets.store import BucketSpec, BucketState, ChargeResult, StoreError
from tests.support.redis_server import RedisServer

SPECS = [BucketSpec(f"{{{'ab' * 16}}}:free:per-second", "per-second", 1e9, 1e6),
         BucketSpec(f"{{{'ab' * 16}}}:free:per-day", "per-day", 1e9, 1e6)]


class RedisPyPipelineStore:
    """A bucket store on redis-py: charges of one loop tick go out as one pipeline.

    As close to RedisBucketStore's behaviour as redis-py allows: same script and keys, one
    write per tick, every call bounded by the timeout, results parsed into ChargeResult."""

    def __init__(self, client: Any, sha: str, timeout: float | None,
                 prefix: str = "authz:") -> None:
        self._client = client
        self._sha = sha
        self._timeout = timeout
        self._prefix = prefix
        self._pending: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._scheduled = False

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        loop = asyncio.get_running_loop()
        args: list[Any] = [self._prefix + b.key for b in buckets]
        args.append(cost)
        for b in buckets:
            args += [b.capacity, b.rate]
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(([len(buckets), *args], future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        if self._timeout is None:
            reply = await future
        else:
            async with asyncio.timeout(self._timeout):
                reply = await future
        if isinstance(reply, Exception):
            raise StoreError(str(reply))
        states = tuple(BucketState(b.name, b.capacity, float(reply[2 + 3 * i]),
                                   float(reply[3 + 3 * i]), float(reply[4 + 3 * i]))
                       for i, b in enumerate(buckets))
        return ChargeResult(reply[0] == 1, states, float(reply[1]))

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.evalsha(self._sha, *args)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as e:  # connection lost: every call of the batch fails
            replies = [e] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)


async def measure(decisions: int, workers: int, charge: Callable[[], Awaitable[object]]
                  ) -> tuple[float, float]:
    per_worker = decisions // workers

    async def worker() -> None:
        for _ in range(per_worker):
            await charge()

    for _ in range(300):  # warm up
        await charge()
    r0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    n = per_worker * workers
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return cpu / n * 1e6, n / wall


async def main(decisions: int, rounds: int) -> None:
    with RedisServer() as server:
        store = RedisBucketStore(server.url, timeout=1.0)
        await store.start()
        client = aredis.Redis.from_url(server.url)
        sha = await client.script_load(SCRIPT)
        pyp = RedisPyPipelineStore(client, sha, 1.0)
        # Its floor: no per-call timeout at all (the transport bounds every call; this does not).
        pyp_untimed = RedisPyPipelineStore(client, sha, None)
        keys = ["authz:" + s.key for s in SPECS]
        args: list[float] = [1]
        for s in SPECS:
            args += [s.capacity, s.rate]
        memory = MemoryBucketStore()
        loop = asyncio.get_running_loop()

        async def harness_only() -> object:
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            return await future

        async def memory_charge() -> object:
            result = await memory.charge(SPECS, 1)
            await asyncio.sleep(0)
            return result

        variants: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("harness only", harness_only),
            ("MemoryBucketStore", memory_charge),
            ("RedisBucketStore", lambda: store.charge(SPECS, 1)),
            ("redis-py pipeline", lambda: pyp.charge(SPECS, 1)),
            ("  ... without timeouts", lambda: pyp_untimed.charge(SPECS, 1)),
            ("redis-py evalsha", lambda: client.evalsha(sha, len(keys), *keys, *args)),
        ]
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):  # interleaved rounds: drift hits every variant alike
            for label, fn in variants:
                for workers in (1, 64):
                    cpu, _rate = await measure(decisions, workers, fn)
                    results.setdefault((label, workers), []).append(cpu)
        print(f"client CPU per decision (us), median of {rounds} interleaved rounds, "
              f"{decisions} decisions each")
        base = {w: sorted(results[("RedisBucketStore", w)])[rounds // 2] for w in (1, 64)}
        for label, _ in variants:
            row = []
            for workers in (1, 64):
                cpu = sorted(results[(label, workers)])[rounds // 2]
                row.append(f"{workers:2d} in flight: {cpu:6.1f} ({cpu / base[workers]:4.2f}x)")
            print(f"  {label:22s} " + "   ".join(row))
        await client.aclose()
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(a.decisions, a.rounds))
