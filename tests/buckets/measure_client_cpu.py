"""Client CPU per decision: RedisBucketStore coalesced vs one at a time, vs plain redis.asyncio.

Not a test (numbers vary +-30% run to run on a shared 2-core VM). Run:
    .venv/bin/python -m tests.buckets.measure_client_cpu [--uvloop]
It starts its own redis-server, and reports this process's CPU time (user and kernel: Redis runs
in its own process) divided by decisions, plus decisions/s.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aredis

from authz.buckets import MemoryBucketStore, RedisBucketStore
from authz.buckets.base import BucketSpec
from authz.buckets.redis import SCRIPT
from authz.config.settings import StoreSettings
from tests.support.redis_server import RedisServer

DECISIONS = 20_000
SPECS = [BucketSpec(f"{{{'ab' * 16}}}:free:per-second", "per-second", 1e9, 1e6),
         BucketSpec(f"{{{'ab' * 16}}}:free:per-day", "per-day", 1e9, 1e6)]


async def run(workers: int, charge: Callable[[], Awaitable[object]]
              ) -> tuple[float, float, float]:
    per_worker = DECISIONS // workers

    async def worker() -> None:
        for _ in range(per_worker):
            await charge()

    for _ in range(200):  # warm up
        await charge()
    r0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    n = per_worker * workers
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return user / n * 1e6, system / n * 1e6, n / wall


async def main() -> None:
    with RedisServer() as server:
        store = RedisBucketStore(StoreSettings(redis_url=server.url, timeout=1.0))
        await store.start()
        client = aredis.Redis.from_url(server.url)
        sha = await client.script_load(SCRIPT)
        keys = ["authz:" + s.key for s in SPECS]
        args: list[float] = [1]
        for s in SPECS:
            args += [s.capacity, s.rate]

        async def store_charge() -> object:
            return await store.charge(SPECS, 1)

        async def plain_charge() -> object:
            return await client.evalsha(sha, len(keys), *keys, *args)

        memory = MemoryBucketStore()
        loop = asyncio.get_running_loop()

        async def memory_charge() -> object:
            result = await memory.charge(SPECS, 1)
            await asyncio.sleep(0)  # yield like a real I/O wait would
            return result

        async def harness_only() -> object:
            # The same await / wake-up pattern with no store at all: the floor under any store.
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            return await future

        for label, fn in (("harness only", harness_only),
                          ("MemoryBucketStore", memory_charge),
                          ("RedisBucketStore", store_charge),
                          ("redis.asyncio evalsha", plain_charge)):
            for workers in (1, 64):
                batches0 = store.stats.batches
                calls0 = store.stats.batched_calls
                user, system, rate = await run(workers, fn)
                extra = ""
                if fn is store_charge:
                    b = store.stats.batches - batches0
                    extra = f", mean batch {(store.stats.batched_calls - calls0) / b:.1f}"
                print(f"{label:22s} {workers:3d} concurrent: {user + system:6.1f} us CPU/decision "
                      f"(user {user:5.1f}, sys {system:5.1f}), {rate:6.0f} decisions/s{extra}")
        await client.aclose()
        await store.close()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main())
