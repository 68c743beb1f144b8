"""Argument checks shared by every store, so a bad spec fails the same way everywhere."""

from __future__ import annotations

from collections.abc import Sequence

from .store import BucketSpec

_INF = float("inf")


def check_charge(buckets: Sequence[BucketSpec], cost: float) -> None:
    """Raise ValueError for a charge no store could answer meaningfully.

    The quota loader already refuses these (burst >= 1, cost <= burst), so reaching here is a
    bug; failing loudly beats an answer computed from NaN or a request that can never fit.
    The chained comparisons are also false for NaN.
    """
    if not 0.0 <= cost < _INF:
        raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
    for spec in buckets:
        if not 0.0 < spec.rate < _INF:
            raise ValueError(f"bucket {spec.key!r}: rate must be finite and > 0, got {spec.rate!r}")
        if not cost <= spec.capacity < _INF:
            raise ValueError(
                f"bucket {spec.key!r}: capacity {spec.capacity!r} must be finite and >= the "
                f"cost {cost!r} (a larger cost could never be admitted)"
            )
    if len(buckets) > 1 and len({spec.key for spec in buckets}) != len(buckets):
        raise ValueError(f"duplicate bucket keys in one charge: {[s.key for s in buckets]!r}")
