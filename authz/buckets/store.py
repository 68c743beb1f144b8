"""The bucket-store interface: what the decision needs from a store, and nothing more.

Every store (in-memory, Redis) implements `BucketStore` with the same semantics, and the same
behaviour tests (tests/buckets) run against each.

Token bucket: a bucket holds up to `capacity` tokens (the burst) and refills continuously at
`rate` tokens per second. A request of cost c is admitted when EVERY bucket it touches holds at
least c tokens; then c is taken from each. If any bucket is short, none is charged. A
`per_request` bucket counts requests, not cost: for it, c is 1 whatever the request's cost.

Shadow buckets (shadow mode, `BucketSpec.shadow`) never refuse: a request is admitted when every
*enforced* bucket holds c; enforced buckets are then charged, and shadow buckets only if they
held c too -- i.e. a shadow bucket is charged exactly when enforcement would have admitted the
request, so its level is what it would be under enforcement and switching it on changes
nothing but the answers. `ChargeResult.shadow_refused` says a shadow bucket was short (the
request would have been refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import StoreError

__all__ = ["BucketSpec", "BucketState", "BucketStore", "ChargeResult", "StoreError"]


@dataclass(frozen=True, slots=True)
class BucketSpec:
    # Key without the store's prefix, e.g. "{3f2a...}:free:per-second". The part in braces is
    # the identity hash: a Redis Cluster hash tag, so one identity's buckets share a slot.
    key: str
    name: str  # limit name, for headers and telemetry
    capacity: float  # burst
    rate: float  # tokens per second
    shadow: bool = False  # never refuses; charged only when enforcement would admit
    per_request: bool = False  # charged 1 per request, not the request's cost


@dataclass(frozen=True, slots=True)
class BucketState:
    name: str
    capacity: float
    # Tokens left after this request (after the charge if admitted; untouched if not).
    remaining: float
    # Seconds until the bucket is full again.
    reset_after: float
    # Seconds until this bucket holds `cost` tokens (0 when it already does).
    retry_after: float


@dataclass(frozen=True, slots=True)
class ChargeResult:
    allowed: bool
    buckets: tuple[BucketState, ...]  # same order as the specs given to charge()
    # 0 when allowed (and complete); else the longest wait among the buckets that were short:
    # the enforced ones when refused, the shadow ones when `shadow_refused`.
    retry_after: float
    # Allowed, but a shadow bucket was short: enforcement would have refused it.
    shadow_refused: bool = False


class BucketStore(Protocol):
    async def start(self) -> None:
        """Connect / load scripts. Raises StoreError if the store cannot be used."""

    async def close(self) -> None: ...

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        """Check and charge all buckets atomically (all or none), in one round trip.

        The clock is the store's own. Raises StoreError on failure or timeout.
        """
        ...

    @property
    def ready(self) -> bool: ...
