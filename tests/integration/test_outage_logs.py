"""A Redis outage writes about one log line a second with a count, not one per check."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from authz.config.service_file import parse_settings
from authz.quota import load_quota
from authz.server.app import Server
from tests.support.authz_process import check_request
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer


async def test_store_failures_are_summarised(issuer: TestIssuer,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer() as redis:
        settings = parse_settings({
            "server": {"grpc_port": 0, "metrics_port": 0, "drain_delay": 0,
                       "host": "127.0.0.1"},
            "auth": {"issuers": [issuer.settings()]},
            "store": {"redis_url": redis.url, "timeout": "50ms"}}, "test")
        server = Server(settings, load_quota(None))
        await server.start()
        redis.stop()
        tokens = [issuer.mint(f"u{i}") for i in range(20)]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.AuthorizationStub(ch)
                with caplog.at_level(logging.WARNING, logger="authz.server.service"):
                    loop = asyncio.get_running_loop()
                    end = loop.time() + 2.2
                    answered = 0
                    while loop.time() < end:
                        replies = await asyncio.gather(*(
                            stub.Check(check_request(t), timeout=5) for t in tokens))
                        assert all(r.denied_response.status.code == 503 for r in replies)
                        answered += len(replies)
                    await asyncio.sleep(1.2)  # the last window's summary is written by a timer
        finally:
            await server.stop()
    lines = [r.getMessage() for r in caplog.records if "bucket store failed" in r.getMessage()]
    assert answered > 200
    assert 2 <= len(lines) <= 5, lines  # the first at once, then about one a second
    counts = [int(m.group(1)) for line in lines if (m := re.search(r" x(\d+) in the last", line))]
    assert sum(counts) + 1 == answered  # every failure accounted for
