"""Token-bucket stores: in-memory, Redis, and a local cache of refusals around either."""

from .deny_cache import DenyCache
from .memory import MemoryBucketStore
from .redis import RedisBucketStore, RedisStoreStats
from .store import BucketSpec, BucketState, BucketStore, ChargeResult, StoreError

__all__ = [
    "BucketSpec", "BucketState", "BucketStore", "ChargeResult", "DenyCache",
    "MemoryBucketStore", "RedisBucketStore", "RedisStoreStats", "StoreError",
]
