"""The quota file and plan/model resolution (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from authz.errors import ConfigError
from authz.quota import Grant, Refusal, Resolver, load_quota, parse_quota
from authz.tokens.identity import Identity

QUOTA = """
plan_claim: tier
default_plan: free
plans:
  free:
    limits:
      - {name: per-second, rate: 5, per: 1s, burst: 10}
      - {name: per-day, rate: 1000, per: 1d}
    models:
      "sklearn-*": {}
      "llama-*": {cost: 5, limits: [{name: llama-per-minute, rate: 20, per: 1m}]}
  pro:
    limits: [{name: per-second, rate: 50, per: 1s, burst: 100}]
overrides:
  - {issuer: https://a, subject: vip, plan: unlimited}
  - {issuer: https://a, subject: mallory, plan: blocked}
"""


def ident(sub: str = "alice", iss: str = "https://a", **claims: object) -> Identity:
    return Identity(issuer=iss, subject=sub, key=f"k-{iss}-{sub}", expires_at=0.0,
                    claims={"sub": sub, "iss": iss, **claims})


@pytest.fixture
def resolver() -> Resolver:
    return Resolver(parse_quota(yaml.safe_load(QUOTA), "quota.yaml"))


def test_default_plan_and_model_rules(resolver: Resolver) -> None:
    g = resolver.resolve(ident(), "sklearn-iris")
    assert isinstance(g, Grant)
    assert g.plan == "free" and g.rule == "sklearn-*" and g.cost == 1
    assert [b.name for b in g.buckets] == ["per-second", "per-day"]
    b = g.buckets[0]
    assert b.key == "{k-https://a-alice}:free:per-second"
    assert b.capacity == 10 and b.rate == 5
    assert g.buckets[1].rate == pytest.approx(1000 / 86400)


def test_per_model_cost_and_limits(resolver: Resolver) -> None:
    g = resolver.resolve(ident(), "llama-70b")
    assert isinstance(g, Grant)
    assert g.cost == 5
    assert [b.name for b in g.buckets] == ["per-second", "per-day", "llama-per-minute"]
    assert g.buckets[2].rate == pytest.approx(20 / 60) and g.buckets[2].capacity == 20


def test_model_not_in_plan_is_refused(resolver: Resolver) -> None:
    assert resolver.resolve(ident(), "gpt-x") == Refusal("free", "model_not_allowed")


def test_plan_from_claim(resolver: Resolver) -> None:
    g = resolver.resolve(ident(tier="pro"), "anything")
    assert isinstance(g, Grant) and g.plan == "pro" and g.rule == "*"


def test_unknown_or_builtin_claim_falls_back_to_default(resolver: Resolver) -> None:
    for tier in ("gold", "unlimited", 42, None):
        g = resolver.resolve(ident(tier=tier), "sklearn-x")
        assert isinstance(g, Grant) and g.plan == "free"


def test_overrides_unlimited_and_blocked(resolver: Resolver) -> None:
    g = resolver.resolve(ident("vip"), "anything")
    assert isinstance(g, Grant) and g.plan == "unlimited" and g.buckets == ()
    assert resolver.resolve(ident("mallory", tier="pro"), "x") == Refusal("blocked", "blocked")


def test_override_is_per_issuer(resolver: Resolver) -> None:
    g = resolver.resolve(ident("vip", iss="https://b"), "sklearn-x")
    assert isinstance(g, Grant) and g.plan == "free"


def test_two_issuers_never_share_a_bucket(resolver: Resolver) -> None:
    a = resolver.resolve(ident("bob", iss="https://a"), "sklearn-x")
    b = resolver.resolve(ident("bob", iss="https://b"), "sklearn-x")
    assert isinstance(a, Grant) and isinstance(b, Grant)
    assert {x.key for x in a.buckets}.isdisjoint({x.key for x in b.buckets})


def test_embedded_default_loads() -> None:
    q = load_quota(None)
    assert q.default_plan == "free" and "pro" in q.plans


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plans: {free: {limits: [{name: a, rate: 1}]}}\ndefault_plan: gold",
         "default_plan: plan 'gold' is not defined"),
        ("plans: {free: {limits: [{name: a, rate: 0}]}}\ndefault_plan: free",
         "plans.free.limits[0].rate: expected a number > 0"),
        ("plans: {free: {limits: [{name: a, rate: 1, per: soon}]}}\ndefault_plan: free",
         "plans.free.limits[0].per: expected a duration"),
        ("plans: {free: {limits: [{name: a, rate: 1, brust: 3}]}}\ndefault_plan: free",
         "plans.free.limits[0].brust: unknown key"),
        ("plans: {free: {limits: [{name: a, rate: 1}, {name: a, rate: 2}]}}\ndefault_plan: free",
         "limit name 'a' used twice"),
        ("plans: {free: {limits: [{name: a, rate: 2, burst: 2}], models: {m: {cost: 3}}}}\n"
         "default_plan: free", "plans.free.models.m.cost: cost 3 exceeds the burst 2"),
        ("plans: {unlimited: {}}\ndefault_plan: unlimited", "built-in plan"),
        ("plans: {free: {models: {}}}\ndefault_plan: free", "plans.free.models: is empty"),
        ("plans: {free: {limits: [{name: a, rate: 1}]}}\ndefault_plan: free\n"
         "overrides: [{issuer: a, subject: b, plan: x}]",
         "overrides[0].plan: plan 'x' is not defined"),
        ("plans: {'bad name': {}}\ndefault_plan: free", "plans.bad name: plan names are"),
        ("plans: {free: {models: {'a/b': {}}}}\ndefault_plan: free", "expected a model name"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "quota.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_quota(f)
    assert str(e.value).startswith(str(f))
    assert expected in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plans: {free: {}}\ndefault_plan: free", "plans.free.limits: at least one limit"),
        ("plans: {free: {models: {iris: {cost: 1}}}}\ndefault_plan: free",
         "plans.free.models.iris.limits: no limit applies"),
        ("plans: {free: {limits: [{name: a, rate: .inf}]}}\ndefault_plan: free",
         "plans.free.limits[0].rate: expected a finite number"),
        ("plans: {free: {limits: [{name: a, rate: 1, burst: .inf}]}}\ndefault_plan: free",
         "plans.free.limits[0].burst: expected a finite number"),
        ("plans: {free: {limits: [{name: a, rate: 1, per: .inf}]}}\ndefault_plan: free",
         "plans.free.limits[0].per: expected a duration"),
        ("plans: {free: {limits: [{name: a, rate: .nan}]}}\ndefault_plan: free",
         "plans.free.limits[0].rate: expected a finite number"),
    ],
)
def test_unlimited_by_accident_and_non_finite_are_refused(tmp_path: Path, text: str,
                                                          expected: str) -> None:
    f = tmp_path / "quota.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_quota(f)
    assert expected in str(e.value)


def test_plan_with_models_only_is_fine_when_each_rule_has_limits() -> None:
    q = parse_quota(yaml.safe_load(
        "default_plan: p\nplans: {p: {models: {m: {limits: [{name: a, rate: 1}]}}}}"), "q")
    g = Resolver(q).resolve(ident(), "m")
    assert isinstance(g, Grant) and [b.name for b in g.buckets] == ["a"]
