"""Shadow mode, team (scope) quotas, per-plan failure policy and the RateLimit field styles,
through the request pipeline over the memory store (plain values in, a Decision out)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.buckets import MemoryBucketStore
from authz.buckets.store import BucketSpec, ChargeResult
from authz.config.settings import HeaderSettings, Settings, StoreSettings
from authz.decision import Answers, Outcome
from authz.errors import ConfigError, StoreUnavailable
from authz.paths import PathClassifier
from authz.pipeline import CheckPipeline
from authz.quota import parse_quota
from authz.quota.resolve import Grant, Resolver, scope_key
from authz.tokens.verifier import Authenticator, identity_key
from tests.support.issuer import TestIssuer

PATH = "/v1/models/iris:predict"


class FailingStore:
    ready = True

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def charge(self, buckets: Sequence[BucketSpec], cost: float) -> ChargeResult:
        raise StoreUnavailable("Redis down")


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(Path(tmp_path_factory.mktemp("idp")))


async def pipeline(issuer: TestIssuer, quota: str, settings: Settings | None = None,
                   store: Any = None) -> CheckPipeline:
    settings = settings or Settings()
    auth = Authenticator(settings.auth, static_issuers={issuer.name: issuer.jwks})
    await auth.start()
    p = CheckPipeline(answers=Answers(settings), paths=PathClassifier(settings.paths),
                      authenticator=auth, resolver=Resolver(parse_quota(yaml.safe_load(quota),
                                                                        "q")),
                      store=store or MemoryBucketStore())
    p.ready = True
    return p


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- shadow mode ----------------------------------------------------------------------------

SHADOW_ALL = """
shadow: {rate_limits: true}
default_plan: free
plans: {free: {limits: [{name: per-minute, rate: 2, per: 1m}]}}
"""


async def test_global_shadow_allows_and_marks_the_would_be_429(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, SHADOW_ALL)
    headers = bearer(issuer.mint("s1"))
    first = [(await p.decide(PATH, headers))[0] for _ in range(4)]
    assert [d.outcome for d in first] == [Outcome.ALLOWED, Outcome.ALLOWED,
                                          Outcome.SHADOW, Outcome.SHADOW]
    shadowed = first[2]
    assert shadowed.allowed and shadowed.status == 200 and shadowed.reason == "rate_limited"
    assert dict(shadowed.upstream_headers)["x-authz-shadow"] == "rate_limited"
    assert shadowed.limit == "per-minute"
    assert "x-authz-shadow" in first[0].remove_headers  # a client's forged copy is removed
    assert "x-authz-shadow" not in shadowed.remove_headers  # set, not removed (Envoy order)


SHADOW_ONE_LIMIT = """
default_plan: free
plans:
  free:
    limits:
      - {name: per-day, rate: 3, per: 1d}
      - {name: per-minute, rate: 1, per: 1m, shadow: true}
"""


async def test_a_shadow_limit_beside_an_enforced_one(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, SHADOW_ONE_LIMIT)
    headers = bearer(issuer.mint("s2"))
    decisions = [(await p.decide(PATH, headers))[0] for _ in range(4)]
    assert [(d.status, d.outcome.value) for d in decisions] == [
        (200, "allowed"), (200, "shadow"), (200, "shadow"), (429, "rate_limited")]
    assert decisions[1].limit == "per-minute"  # the shadow limit would have refused it
    assert decisions[3].limit == "per-day"  # the enforced one really does


SHADOW_REFUSALS = """
default_plan: free
shadow: {refusals: [blocked]}
plans:
  free:
    shadow: {refusals: [model_not_allowed]}
    limits: [{name: per-minute, rate: 5, per: 1m}]
    models: {iris: {}}
overrides: [{issuer: "https://idp.test", subject: mallory, plan: blocked}]
"""


async def test_shadow_refusals(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, SHADOW_REFUSALS)
    d, _ = await p.decide("/v1/models/resnet:predict", bearer(issuer.mint("s3")))
    assert (d.status, d.outcome, d.reason) == (200, Outcome.SHADOW, "model_not_allowed")
    assert dict(d.upstream_headers)["x-authz-shadow"] == "model_not_allowed"
    d, _ = await p.decide(PATH, bearer(issuer.mint("mallory")))
    assert (d.status, d.outcome, d.reason) == (200, Outcome.SHADOW, "blocked")
    # shadowing refusals leaves the rate limits enforced
    headers = bearer(issuer.mint("s4"))
    statuses = [(await p.decide("/v1/models/resnet:predict", headers))[0].status
                for _ in range(6)]
    assert statuses == [200] * 5 + [429]


def test_shadow_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"shadow\.refusals: unknown refusal 'rate_limited'"):
        parse_quota(yaml.safe_load("shadow: {refusals: [rate_limited]}\ndefault_plan: blocked"),
                    "q")
    with pytest.raises(ConfigError, match=r"limits\[0\]\.shadow: expected true or false"):
        parse_quota(yaml.safe_load(
            "default_plan: p\nplans: {p: {limits: [{name: a, rate: 1, shadow: maybe}]}}"), "q")


# -- team quotas ----------------------------------------------------------------------------

TEAM = """
default_plan: team
plans:
  team:
    limits:
      - {name: per-minute, rate: 3, per: 1m}
      - {name: org-per-minute, rate: 4, per: 1m, scope: org}
"""


async def test_org_limit_is_shared_and_charged_with_the_users(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, TEAM)
    alice = bearer(issuer.mint("alice", org="acme"))
    bob = bearer(issuer.mint("bob", org="acme"))
    carol = bearer(issuer.mint("carol", org="other"))
    statuses = [(await p.decide(PATH, h))[0].status for h in (alice, alice, alice, bob, bob)]
    # alice spends her own 3 (the org has 1 left), bob gets the org's last one, then 429
    assert statuses == [200, 200, 200, 200, 429]
    d, _ = await p.decide(PATH, bob)
    assert d.limit == "org-per-minute"
    # another organisation is untouched; all or none: bob's refused requests charged nothing
    assert [(await p.decide(PATH, carol))[0].status for _ in range(3)] == [200] * 3


async def test_a_token_without_the_scope_claim_is_refused(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, TEAM)
    d, _ = await p.decide(PATH, bearer(issuer.mint("dave")))
    assert (d.status, d.reason) == (403, "scope_claim_missing")
    d, _ = await p.decide(PATH, bearer(issuer.mint("erin", org=42)))
    assert (d.status, d.reason) == (403, "scope_claim_missing")


async def test_every_key_of_a_scoped_request_carries_the_scope_tag(issuer: TestIssuer) -> None:
    quota = parse_quota(yaml.safe_load(TEAM), "q")
    auth = Authenticator(Settings().auth, static_issuers={issuer.name: issuer.jwks})
    await auth.start()
    ident = await auth.authenticate(f"Bearer {issuer.mint('alice', org='acme')}")
    grant = Resolver(quota).resolve(ident, "iris")  # type: ignore[arg-type]
    assert isinstance(grant, Grant)
    tag = scope_key(issuer.name, "org", "acme")
    user = identity_key(issuer.name, "alice")
    assert [b.key for b in grant.buckets] == [f"{{{tag}}}:team:per-minute:{user}",
                                               f"{{{tag}}}:team:org-per-minute"]
    assert quota.claims_used == {"plan", "org"}


def test_a_plan_cannot_mix_two_scopes() -> None:
    with pytest.raises(ConfigError, match="must all use one scope claim"):
        parse_quota(yaml.safe_load("""
default_plan: p
plans:
  p:
    limits: [{name: a, rate: 1, scope: org}]
    models: {m: {limits: [{name: b, rate: 1, scope: team}]}}
"""), "q")
    with pytest.raises(ConfigError, match=r"limits\[0\]\.scope: expected a claim name"):
        parse_quota(yaml.safe_load(
            "default_plan: p\nplans: {p: {limits: [{name: a, rate: 1, scope: 'a b'}]}}"), "q")


# -- per-plan failure policy ----------------------------------------------------------------

ON_ERROR = """
default_plan: free
plans:
  free: {limits: [{name: s, rate: 5}]}
  paying: {on_error: allow, limits: [{name: s, rate: 50}]}
"""


async def test_on_error_per_plan(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, ON_ERROR, Settings(store=StoreSettings(on_error="deny")),
                       FailingStore())
    d, _ = await p.decide(PATH, bearer(issuer.mint("f1")))
    assert (d.status, d.reason) == (503, "store_unavailable")  # the service's policy
    d, _ = await p.decide(PATH, bearer(issuer.mint("p1", plan="paying")))
    assert (d.status, d.reason) == (200, "store_unavailable")  # the plan fails open
    assert dict(d.upstream_headers)["x-authz-degraded"] == "store-unavailable"
    with pytest.raises(ConfigError, match=r"plans\.free\.on_error: expected deny or allow"):
        parse_quota(yaml.safe_load(ON_ERROR.replace("free: {", "free: {on_error: open, ")), "q")


# -- RateLimit fields -----------------------------------------------------------------------

TWO_LIMITS = """
default_plan: free
plans: {free: {limits: [{name: per-second, rate: 10, per: 1s, burst: 20},
                        {name: per-day, rate: 1000, per: 1d}]}}
"""


async def test_ratelimit_triple_by_default(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, TWO_LIMITS)
    d, _ = await p.decide(PATH, bearer(issuer.mint("r1")))
    h = dict(d.response_headers)
    assert (h["ratelimit-limit"], h["ratelimit-remaining"]) == ("20", "19")
    assert "ratelimit-policy" not in h


async def test_ratelimit_structured(issuer: TestIssuer) -> None:
    settings = Settings(headers=HeaderSettings(ratelimit_style="structured"))
    p = await pipeline(issuer, TWO_LIMITS, settings)
    d, _ = await p.decide(PATH, bearer(issuer.mint("r2")))
    h = dict(d.response_headers)
    assert h["ratelimit-policy"] == '"per-second";q=10;w=1, "per-day";q=1000;w=86400'
    assert h["ratelimit"] == '"per-second";r=19;t=1'
    assert "ratelimit-limit" not in h
    for _ in range(19):
        await p.decide(PATH, bearer(issuer.mint("r2")))
    d, _ = await p.decide(PATH, bearer(issuer.mint("r2")))
    h = dict(d.response_headers)
    assert d.status == 429 and h["ratelimit"].startswith('"per-second";r=0;t=')
    assert json.loads(d.body)["limit"] == "per-second"
