"""Every quota file the loader accepts decides correctly on every store.

Property: for any accepted quota (numbers across the whole accepted range, edges included),
charging its buckets and deciding a request never raises and never answers 500 or 503 by
itself: the answer is an allow or a 429 (403 only for a model the plan does not list).
Runs against the in-memory store and a real redis-server (the Lua script's arithmetic, its
TTLs, Redis's number formatting).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authz.buckets import MemoryBucketStore, RedisBucketStore
from authz.buckets.store import BucketStore
from authz.config.settings import Settings
from authz.decision import Answers
from authz.errors import ConfigError
from authz.paths import PathClassifier
from authz.pipeline import CheckPipeline
from authz.quota import parse_quota
from authz.quota.loader import MAX_COST, MAX_PER, MAX_TIME_TO_FULL, MAX_TOKENS, MIN_PER
from authz.quota.resolve import Grant, Resolver
from authz.tokens.verifier import Authenticator
from tests.support.issuer import TestIssuer
from tests.support.redis_server import RedisServer

TOKENS = st.one_of(
    st.sampled_from([1.0, 2.0, MAX_TOKENS, MAX_TOKENS / 3, 1e-3, 0.5, 1e6]),
    st.floats(min_value=1e-6, max_value=MAX_TOKENS, allow_nan=False, allow_infinity=False),
)
BURST = st.one_of(
    st.sampled_from([1.0, 1.5, MAX_TOKENS, 10.0]),
    st.floats(min_value=1.0, max_value=MAX_TOKENS, allow_nan=False, allow_infinity=False),
)
PER = st.one_of(
    st.sampled_from([MIN_PER, MAX_PER, 1.0, 60.0, 86400.0]),
    st.floats(min_value=MIN_PER, max_value=MAX_PER, allow_nan=False, allow_infinity=False),
)


@st.composite
def limits(draw: st.DrawFn, prefix: str) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(1, 3))):
        limit: dict[str, Any] = {"name": f"{prefix}{i}", "rate": draw(TOKENS), "per": draw(PER)}
        if draw(st.booleans()):
            limit["burst"] = draw(BURST)
        out.append(limit)
    return out


@st.composite
def quotas(draw: st.DrawFn) -> dict[str, Any]:
    plan: dict[str, Any] = {"limits": draw(limits("p"))}
    if draw(st.booleans()):
        cost = draw(st.one_of(st.sampled_from([1, 2, MAX_COST]), st.integers(1, MAX_COST)))
        plan["models"] = {"m*": {"cost": cost, "limits": draw(limits("m"))}}
    return {"default_plan": "p", "plans": {"p": plan}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    issuer = TestIssuer(tmp_path_factory.mktemp("idp"))
    loop = asyncio.new_event_loop()
    with RedisServer() as redis:
        stores: dict[str, BucketStore] = {"memory": MemoryBucketStore(),
                                          "redis": RedisBucketStore(redis.url, timeout=2.0)}
        for s in stores.values():
            loop.run_until_complete(s.start())
        auth = Authenticator(Settings().auth, static_issuers={issuer.name: issuer.jwks})
        loop.run_until_complete(auth.start())
        try:
            yield {"loop": loop, "stores": stores, "auth": auth, "issuer": issuer,
                   "subjects": itertools.count()}
        finally:
            for s in stores.values():
                loop.run_until_complete(s.close())
            loop.run_until_complete(auth.close())
            loop.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=quotas())
def test_every_accepted_quota_decides(world: dict[str, Any], data: dict[str, Any],
                                      tmp_path: Path) -> None:
    try:
        quota = parse_quota(data, "quota.yaml")
    except ConfigError:
        assume(False)  # refused at load: never reaches a decision
        return
    loop = world["loop"]
    resolver = Resolver(quota)
    token = world["issuer"].mint(f"user-{next(world['subjects'])}")
    identity = world["auth"].authenticate_cached(f"Bearer {token}") or loop.run_until_complete(
        world["auth"].authenticate(f"Bearer {token}"))
    for name, store in world["stores"].items():
        pipeline = CheckPipeline(answers=Answers(Settings()), paths=PathClassifier(
            Settings().paths), authenticator=world["auth"], resolver=resolver, store=store)
        pipeline.ready = True
        for model in ("m1", "other"):
            grant = resolver.resolve(identity, model)
            if isinstance(grant, Grant) and grant.buckets:
                # the store itself, directly: never raises for an accepted quota
                loop.run_until_complete(store.charge(grant.buckets, grant.cost))
            for _ in range(3):
                decision, _subject = loop.run_until_complete(pipeline.decide(
                    f"/v1/models/{model}:predict", {"authorization": f"Bearer {token}"}))
                assert decision.status in (200, 403, 429), (name, decision, data)
                if decision.status == 403:
                    assert decision.reason == "model_not_allowed"
                if decision.status == 429:
                    retry = int(dict(decision.response_headers)["retry-after"])
                    assert 1 <= retry <= MAX_TIME_TO_FULL + 1
