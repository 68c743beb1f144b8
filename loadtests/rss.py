"""Memory under many identities: drive N checks over U distinct users and sample server RSS.

h2load sends one fixed body, so this client is Python: a grpc.aio client on uvloop sending
pre-serialized CheckRequests as raw bytes (no protobuf work per call on the client), many calls
in flight over a few channels. Users are visited in a fresh random order on each pass, so every
user gets checks/users checks and the token cache (capped below the number of users) keeps
evicting: the worst case for memory, not the best.

Tokens are RS256-signed (~0.4 ms each), so 100k of them take ~40 s of CPU; `mint_population`
splits the work over a process pool.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from .population import CHECK_METHOD, check_request
from .procs import rss_bytes

# Share of the RSS population on the `trickle` plan: over limit after one request, so the
# service's deny cache holds an entry for each of them (a cap must bound it too).
TRICKLE_SHARE = 0.2


@dataclass
class RssReport:
    checks: int
    users: int
    seconds: float
    outcomes: Counter[str]
    # (checks done, RSS bytes) samples, first taken before any check.
    samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def start_mb(self) -> float:
        return self.samples[0][1] / 2**20 if self.samples else 0.0

    @property
    def end_mb(self) -> float:
        return self.samples[-1][1] / 2**20 if self.samples else 0.0

    @property
    def peak_mb(self) -> float:
        return max(s[1] for s in self.samples) / 2**20 if self.samples else 0.0

    def mb_at(self, fraction: float) -> float:
        """RSS at the first sample taken once `fraction` of the checks were done."""
        want = self.checks * fraction
        for done, rss in self.samples:
            if done >= want:
                return rss / 2**20
        return self.end_mb


def plan_for(index: int) -> str:
    # Deterministic: every 5th user (TRICKLE_SHARE = 0.2) is on the trickle plan.
    return "trickle" if index % round(1 / TRICKLE_SHARE) == 0 else "free"


def _mint_chunk(args: tuple[bytes, Sequence[int]]) -> list[bytes]:
    from .population import Signer

    pem, indexes = args
    signer = Signer.from_pem(pem)
    out = []
    for i in indexes:
        token = signer.token(f"rss-user-{i:06d}", plan_for(i))
        req = check_request("Bearer " + token, request_id=f"rss-{i:06d}")
        out.append(req.SerializeToString())
    return out


def mint_population(pem: bytes, users: int, processes: int = 2) -> list[bytes]:
    """Serialized CheckRequests, one per user (each with its own freshly signed token)."""
    chunk = 2_000
    jobs = [(pem, range(start, min(users, start + chunk))) for start in range(0, users, chunk)]
    if users <= chunk or processes <= 1:
        return [body for job in jobs for body in _mint_chunk(job)]
    with ProcessPoolExecutor(processes) as pool:
        return [body for part in pool.map(_mint_chunk, jobs) for body in part]


def _outcome(raw: bytes) -> str:
    resp = external_auth_pb2.CheckResponse.FromString(raw)
    if resp.status.code == 0:
        return "allow"
    return str(int(resp.denied_response.status.code))


async def drive(
    target: str,
    bodies: Sequence[bytes],
    checks: int,
    *,
    server_pid: int,
    concurrency: int = 128,
    channels: int = 4,
    sample_every: float = 0.5,
    seed: int = 7,
    progress: Callable[[int, int], None] | None = None,
) -> RssReport:
    rng = random.Random(seed)
    users = len(bodies)
    order: list[int] = []
    next_index = 0
    done = 0
    outcomes: Counter[str] = Counter()
    samples = [(0, rss_bytes(server_pid))]
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    calls = [
        c.unary_unary(CHECK_METHOD, request_serializer=None, response_deserializer=None)
        for c in chans
    ]

    def take() -> int | None:
        nonlocal next_index, order
        if next_index >= checks:
            return None
        pos = next_index % users
        if pos == 0:
            order = list(range(users))
            rng.shuffle(order)
        next_index += 1
        return order[pos]

    async def worker(w: int) -> None:
        nonlocal done
        call = calls[w % len(calls)]
        while (i := take()) is not None:
            try:
                raw = await call(bodies[i], timeout=10.0)
                outcomes[_outcome(raw)] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[f"grpc:{e.code().name}"] += 1
            done += 1

    async def sampler() -> None:
        while True:
            await asyncio.sleep(sample_every)
            samples.append((done, rss_bytes(server_pid)))
            if progress is not None:
                progress(done, checks)

    started = time.perf_counter()
    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        sampling.cancel()
        for c in chans:
            await c.close()
    elapsed = time.perf_counter() - started
    samples.append((done, rss_bytes(server_pid)))
    return RssReport(checks=done, users=users, seconds=elapsed, outcomes=outcomes,
                     samples=samples)
