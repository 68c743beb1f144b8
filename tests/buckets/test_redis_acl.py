"""The least-privilege Redis ACL user documented in deploy/README.md is enough for the store."""

from __future__ import annotations

import re
from pathlib import Path

from authz.buckets import RedisBucketStore
from authz.buckets.store import BucketSpec
from tests.support.redis_server import RedisServer

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


async def test_documented_acl_user_can_charge_and_nothing_more() -> None:
    line = next(x.strip() for x in README.read_text().splitlines()
                if x.strip().startswith("ACL SETUSER authz"))
    server = RedisServer().start()
    try:
        admin = server.client()
        admin.execute_command(*line.replace(">PASSWORD", ">s3cret").split())
        url = re.sub(r"^redis://", "redis://authz:s3cret@", server.url)
        store = RedisBucketStore(url, key_prefix="authz:")
        await store.start(wait=True)
        try:
            spec = BucketSpec("{abc}:free:s", "s", 2, 1)
            assert (await store.charge([spec], 1)).allowed
            assert admin.exists("authz:{abc}:free:s")
        finally:
            await store.close()
        # the same user may not touch other keys or run other commands
        import redis as redis_py

        limited = redis_py.Redis.from_url(url)
        for command in (("GET", "other:key"), ("FLUSHALL",), ("KEYS", "*")):
            try:
                limited.execute_command(*command)
            except redis_py.exceptions.NoPermissionError:
                continue
            raise AssertionError(f"{command} was allowed")
    finally:
        server.stop()
