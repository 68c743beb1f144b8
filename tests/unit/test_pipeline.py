"""The request pipeline over plain values: path and headers in, a Decision out.

No gRPC, no Redis: the in-memory store and a static key source (an issuer given as a JWKS in
memory), so every step of a check is exercised in-process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from authz.buckets import MemoryBucketStore
from authz.buckets.store import BucketSpec, ChargeResult
from authz.config.settings import Settings, StoreSettings
from authz.decision import Answers, Outcome
from authz.errors import StoreTimeout
from authz.paths import PathClassifier
from authz.pipeline import CheckPipeline
from authz.quota import parse_quota
from authz.quota.resolve import Resolver
from authz.tokens.verifier import Authenticator
from tests.support.issuer import TestIssuer

QUOTA = {"default_plan": "free", "plans": {
    "free": {"limits": [{"name": "per-minute", "rate": 3, "per": "1m"}],
             "models": {"iris": {}, "llama-*": {"cost": 3}}}},
    "overrides": [{"issuer": "https://idp.test", "subject": "mallory", "plan": "blocked"},
                  {"issuer": "https://idp.test", "subject": "svc", "plan": "unlimited"}]}


class FailingStore:
    """A store that always fails the way Redis does when it is too slow."""

    ready = True

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        raise StoreTimeout("Redis did not answer within 50 ms")


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(Path(tmp_path_factory.mktemp("idp")))


async def make(issuer: TestIssuer, settings: Settings | None = None,
               store: object = None) -> CheckPipeline:
    settings = settings or Settings()
    auth = Authenticator(settings.auth, static_issuers={issuer.name: issuer.jwks})
    await auth.start()
    pipeline = CheckPipeline(answers=Answers(settings), paths=PathClassifier(settings.paths),
                             authenticator=auth, resolver=Resolver(parse_quota(QUOTA, "q")),
                             store=store or MemoryBucketStore())  # type: ignore[arg-type]
    pipeline.ready = True
    return pipeline


@pytest.fixture
async def pipeline(issuer: TestIssuer) -> AsyncIterator[CheckPipeline]:
    p = await make(issuer)
    yield p
    await p.authenticator.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_allowed_with_identity_and_ratelimit_headers(pipeline: CheckPipeline,
                                                            issuer: TestIssuer) -> None:
    d, subject = await pipeline.decide("/v1/models/iris:predict", bearer(issuer.mint("alice")))
    assert (d.allowed, d.status, d.outcome, subject) == (True, 200, Outcome.ALLOWED, "alice")
    assert dict(d.upstream_headers)["x-auth-subject"] == "alice"
    assert dict(d.response_headers)["ratelimit-remaining"] == "2"


async def test_limit_then_429_with_retry_after(pipeline: CheckPipeline,
                                               issuer: TestIssuer) -> None:
    headers = bearer(issuer.mint("bob"))
    for _ in range(3):
        assert (await pipeline.decide("/v1/models/iris:predict", headers))[0].allowed
    d, _ = await pipeline.decide("/v1/models/iris:predict", headers)
    assert (d.status, d.reason) == (429, "rate_limited")
    assert int(dict(d.response_headers)["retry-after"]) == 20  # one token at 3/min
    assert json.loads(d.body)["limit"] == "per-minute"


async def test_cost_of_a_model_rule(pipeline: CheckPipeline, issuer: TestIssuer) -> None:
    headers = bearer(issuer.mint("carol"))
    assert (await pipeline.decide("/v2/models/llama-7b/infer", headers))[0].allowed
    assert (await pipeline.decide("/v1/models/iris:predict", headers))[0].status == 429


@pytest.mark.parametrize(("path", "status", "reason"), [
    ("/health", 200, "public_path"),
    ("/other", 403, "path_not_covered"),
    ("/v1//models/iris", 400, "invalid_path"),
    ("", 400, "missing_http_attributes"),
    ("/v1/models/bad%2Fname", 400, "invalid_path"),
])
async def test_paths(pipeline: CheckPipeline, path: str, status: int, reason: str) -> None:
    d, subject = await pipeline.decide(path, {})
    assert (d.status, d.reason, subject) == (status, reason, None)


async def test_tokens_refused(pipeline: CheckPipeline, issuer: TestIssuer) -> None:
    for headers, reason in (({}, "missing_token"), (bearer("x.y.z"), "malformed_token"),
                            (bearer(issuer.mint("a", audience="other")), "wrong_audience"),
                            (bearer(issuer.mint("a", ttl=-60)), "token_expired")):
        d, _ = await pipeline.decide("/v1/models/iris:predict", headers)
        assert (d.status, d.reason) == (401, reason)


async def test_plans_refuse_and_lift(pipeline: CheckPipeline, issuer: TestIssuer) -> None:
    d, _ = await pipeline.decide("/v1/models/resnet:predict", bearer(issuer.mint("dave")))
    assert (d.status, d.reason) == (403, "model_not_allowed")
    d, _ = await pipeline.decide("/v1/models/iris:predict", bearer(issuer.mint("mallory")))
    assert (d.status, d.reason) == (403, "blocked")
    svc = bearer(issuer.mint("svc"))
    for _ in range(10):
        assert (await pipeline.decide("/v1/models/resnet:predict", svc))[0].allowed


async def test_not_ready_until_the_server_says_so(pipeline: CheckPipeline,
                                                  issuer: TestIssuer) -> None:
    pipeline.ready = False
    d, _ = await pipeline.decide("/v1/models/iris:predict", bearer(issuer.mint("e")))
    assert (d.status, d.reason) == (503, "not_ready")
    assert (await pipeline.decide("/health", {}))[0].allowed  # public paths need nothing


@pytest.mark.parametrize(("policy", "status"), [("deny", 503), ("allow", 200)])
async def test_store_failure_policy(issuer: TestIssuer, policy: str, status: int) -> None:
    settings = Settings(store=StoreSettings(on_error=policy))  # type: ignore[arg-type]
    p = await make(issuer, settings, FailingStore())
    try:
        d, _ = await p.decide("/v1/models/iris:predict", bearer(issuer.mint("f")))
    finally:
        await p.authenticator.close()
    assert (d.status, d.reason, d.outcome) == (status, "store_unavailable",
                                               Outcome.BACKEND_ERROR)
    if policy == "allow":
        assert dict(d.upstream_headers)["x-authz-degraded"] == "store-unavailable"
