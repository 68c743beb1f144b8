"""Argument checks shared by every store, so a bad spec fails the same way everywhere."""

from __future__ import annotations

from collections.abc import Sequence

from .store import BucketSpec

_INF = float("inf")


def check_charge(buckets: Sequence[BucketSpec], cost: float) -> None:
    """Raise ValueError for a charge no store could answer meaningfully.

    The quota loader and the pipeline already refuse these (burst >= 1; a cost above an
    enforced bucket's burst is a 413 before any charge), so reaching here is a bug; failing
    loudly beats an answer computed from NaN or a request that can never fit. A shadow bucket
    may be smaller than the cost: it only ever reports the would-be refusal. The chained
    comparisons are also false for NaN.
    """
    if not 0.0 <= cost < _INF:
        raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
    for spec in buckets:
        if not 0.0 < spec.rate < _INF:
            raise ValueError(f"bucket {spec.key!r}: rate must be finite and > 0, got {spec.rate!r}")
        need = 1.0 if spec.per_request or spec.shadow else cost
        if not need <= spec.capacity < _INF:
            raise ValueError(
                f"bucket {spec.key!r}: capacity {spec.capacity!r} must be finite and >= "
                f"{need!r} (a larger cost could never be admitted)"
            )
    if len(buckets) > 1 and len({spec.key for spec in buckets}) != len(buckets):
        raise ValueError(f"duplicate bucket keys in one charge: {[s.key for s in buckets]!r}")
