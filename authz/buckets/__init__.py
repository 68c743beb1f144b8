"""Token-bucket stores: in-memory, Redis, and a local cache of refusals around either."""

from .base import BucketSpec, BucketState, BucketStore, ChargeResult, StoreError
from .deny_cache import DenyCache
from .memory import MemoryBucketStore
from .redis import RedisBucketStore, RedisStoreStats

__all__ = [
    "BucketSpec", "BucketState", "BucketStore", "ChargeResult", "DenyCache",
    "MemoryBucketStore", "RedisBucketStore", "RedisStoreStats", "StoreError",
]
