"""Who the load-test users are: their tokens, plans, pace, and the answers they should get.

Every locust user plays one persona, taken in turn from a deterministic mix:

- `normal`: a valid token on plan free (70%) or pro (30%), about one request a second, well under
  the plan's 5/s; expects 200.
- `greedy`: a valid free-plan token at ~20 requests/s against a 5/s limit (burst 10); expects 200
  until the bucket is empty, then 429 with Retry-After.
- `invalid`: expired, badly signed, wrong-audience, garbage or missing credentials, in turn;
  expects 401.

The shares of greedy and invalid users are options (`--over-limit-share`, `--invalid-share`).
Anything else a persona gets (a 401 for a valid token, a 503, a gRPC error) is a failure.
"""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .population import INVALID_KINDS, Signer, invalid_authorization

# Pace per persona kind, in requests per second per locust user (locust's constant_throughput).
NORMAL_RATE = 1.0
GREEDY_RATE = 20.0


@dataclass(frozen=True)
class Persona:
    index: int
    kind: str  # normal | greedy | invalid
    subject: str
    plan: str
    authorization: str | None  # the Authorization header value (None: none sent)
    invalid_kind: str = ""

    def expected(self) -> frozenset[int]:
        """HTTP statuses that are correct answers for this persona."""
        if self.kind == "invalid":
            return frozenset({401})
        if self.kind == "greedy":
            return frozenset({200, 429})
        return frozenset({200})

    @property
    def rate(self) -> float:
        return GREEDY_RATE if self.kind == "greedy" else NORMAL_RATE


class Cast:
    """Hands out personas to locust users, in a fixed order for a given seed (thread-safe)."""

    def __init__(
        self, signer: Signer, *, invalid_share: float, over_limit_share: float, seed: int = 1
    ) -> None:
        if not 0 <= invalid_share <= 1 or not 0 <= over_limit_share <= 1:
            raise ValueError("shares are fractions between 0 and 1")
        if invalid_share + over_limit_share > 1:
            raise ValueError("invalid share + over-limit share must not exceed 1")
        self.signer = signer
        self.invalid_share = invalid_share
        self.over_limit_share = over_limit_share
        self.seed = seed
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def persona(self, index: int) -> Persona:
        rng = random.Random(self.seed * 1_000_003 + index)
        draw = rng.random()
        subject = f"lt-user-{index:06d}"
        if draw < self.invalid_share:
            kind = INVALID_KINDS[index % len(INVALID_KINDS)]
            return Persona(index, "invalid", subject, "free",
                           invalid_authorization(self.signer, kind, subject), kind)
        if draw < self.invalid_share + self.over_limit_share:
            return Persona(index, "greedy", subject, "free",
                           "Bearer " + self.signer.token(subject, "free"))
        plan = "pro" if rng.random() < 0.3 else "free"
        return Persona(index, "normal", subject, plan, "Bearer " + self.signer.token(subject, plan))

    def next(self) -> Persona:
        with self._lock:
            index = next(self._counter)
        return self.persona(index)



def add_population_options(parser: Any) -> None:
    """The command-line options both locust scenarios share (world dir, persona mix)."""
    parser.add_argument("--world", default="loadtests/results/world",
                        help="load-test world dir (python -m loadtests.population / stack)")
    parser.add_argument("--invalid-share", type=float, default=0.1,
                        help="share of users with invalid or expired tokens (401)")
    parser.add_argument("--over-limit-share", type=float, default=0.1,
                        help="share of users sending faster than their plan allows (429)")


def cast_from_options(opts: Any) -> Cast:
    """The persona cast for a locust run, from the options above."""
    from .population import World

    world = World.load(Path(opts.world))
    return Cast(world.signer(), invalid_share=opts.invalid_share,
                over_limit_share=opts.over_limit_share)
