"""Costs from the request body: batch size (KServe v1, Open Inference Protocol v2) and LLM
tokens (OpenAI-compatible), their config, and how the pipeline answers with them (plain values
in, a Decision out, over the memory store)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.buckets import MemoryBucketStore
from authz.config.settings import PathSettings, Settings
from authz.decision import Answers, Outcome
from authz.errors import ConfigError
from authz.paths import PathClassifier
from authz.pipeline import PARTIAL_BODY_HEADER, CheckPipeline
from authz.quota import parse_quota
from authz.quota.costs import MAX_COUNT, Priced, Unpriced, model_of, price
from authz.quota.model import CostRule
from authz.quota.resolve import Resolver
from authz.tokens.verifier import Authenticator
from tests.support.issuer import TestIssuer

V1 = "/v1/models/iris:predict"
V2 = "/v2/models/resnet/infer"
CHAT = "/v1/chat/completions"
INSTANCES = CostRule("instances")
TOKENS = CostRule("tokens", default_max_tokens=100, max_tokens=1000, bytes_per_token=4.0)
REASONS = {"body_missing", "body_partial", "body_too_large", "body_not_json", "body_bad_shape",
           "cost_out_of_range"}


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


# -- price(): hand-picked ---------------------------------------------------------------------

@pytest.mark.parametrize(("body", "cost"), [
    ({"instances": [[1, 2], [3, 4], [5, 6]]}, 3),
    ({"inputs": [{"a": 1}]}, 1),
    ({"instances": [{"b64": "x" * 1000}] * 8, "parameters": {"k": 1}}, 8),
    ({"signature_name": "s", "instances": ["a"]}, 1),
])
def test_v1_counts_instances(body: Any, cost: int) -> None:
    assert price(INSTANCES, js(body), partial=False, protocol="v1") == Priced(cost, "instances")


def test_per_instance_multiplies() -> None:
    rule = CostRule("instances", per_instance=5)
    assert price(rule, js({"instances": [1, 2]}), partial=False, protocol="v1").cost == 10


@pytest.mark.parametrize(("inputs", "cost"), [
    ([{"name": "x", "shape": [4, 3], "datatype": "FP32", "data": [0] * 12}], 4),
    ([{"name": "a", "shape": [2], "data": [1, 2]}, {"name": "b", "shape": [7, 1], "data": []}], 7),
])
def test_v2_takes_the_largest_batch_dimension(inputs: Any, cost: int) -> None:
    body = js({"id": "r1", "inputs": inputs})
    assert price(INSTANCES, body, partial=False, protocol="v2") == Priced(cost, "instances")


def test_tokens_are_completion_plus_prompt_estimate() -> None:
    messages = [{"role": "user", "content": "x" * 390}]
    body = js({"model": "llama", "messages": messages, "max_tokens": 50})
    prompt = math.ceil(len(json.dumps(messages)) / 4)
    assert price(TOKENS, body, partial=False, protocol="openai") == Priced(50 + prompt, "tokens")


def test_tokens_default_cap_and_newer_field() -> None:
    bare = js({"model": "m", "prompt": "hi"})  # prompt '"hi"' is 4 bytes: one token
    assert price(TOKENS, bare, partial=False, protocol="openai").cost == 100 + 1
    huge = js({"model": "m", "prompt": "hi", "max_tokens": 999_999})
    assert price(TOKENS, huge, partial=False, protocol="openai").cost == 1000 + 1
    both = js({"model": "m", "prompt": "hi", "max_tokens": 900, "max_completion_tokens": 10})
    assert price(TOKENS, both, partial=False, protocol="openai").cost == 10 + 1


@pytest.mark.parametrize(("body", "partial", "protocol", "reason"), [
    (None, False, "v1", "body_missing"),
    (b"", False, "v1", "body_missing"),
    (b'{"instances": [1', True, "v1", "body_partial"),
    (b"\x00\xff\xfe binary", False, "v1", "body_not_json"),
    (b'{"instances": [1, 2', False, "v1", "body_not_json"),
    (b'{"instances": 3}', False, "v1", "body_bad_shape"),
    (b'{"predict": [1]}', False, "v1", "body_bad_shape"),
    (b'[1, 2, 3]', False, "v1", "body_bad_shape"),
    (b'{"instances": []}', False, "v1", "cost_out_of_range"),
    (b'{"inputs": [{"name": "x", "shape": []}]}', False, "v2", "body_bad_shape"),
    (b'{"inputs": [{"name": "x", "shape": [0, 3]}]}', False, "v2", "cost_out_of_range"),
    (b'{"inputs": [{"name": "x", "shape": [-5]}]}', False, "v2", "cost_out_of_range"),
    (b'{"inputs": [{"name": "x", "shape": [1e3]}]}', False, "v2", "body_bad_shape"),
    (b'{"inputs": [{"name": "x", "shape": [99999999999999999999]}]}', False, "v2",
     "cost_out_of_range"),
    (b'{"inputs": []}', False, "v2", "body_bad_shape"),
    (b'{"model": "m", "max_tokens": 0}', False, "openai", "cost_out_of_range"),
    (b'{"model": "m", "max_tokens": "10"}', False, "openai", "body_bad_shape"),
    (b'{"model": "m", "max_tokens": true}', False, "openai", "body_bad_shape"),
    (b'{"model": "m", "max_tokens": 1e400}', False, "openai", "body_bad_shape"),
    (b'{"model": 5}', False, "openai", "body_bad_shape"),
    (b"[" * 100_000, False, "v1", "body_bad_shape"),
    (b'{"instances": [' + b"[" * 100_000, False, "v1", "body_not_json"),
    (b'{"instances": [1]} trailing', False, "v1", "body_not_json"),
])
def test_unpriceable_bodies_name_the_reason(body: bytes | None, partial: bool, protocol: str,
                                            reason: str) -> None:
    rule = TOKENS if protocol == "openai" else INSTANCES
    assert price(rule, body, partial=partial, protocol=protocol) == Unpriced(reason)


def test_too_large_is_checked_before_reading() -> None:
    rule = CostRule("instances", max_body_bytes=64)
    body = js({"instances": [1] * 100})
    assert price(rule, body, partial=False, protocol="v1") == Unpriced("body_too_large")


def test_fallback_prices_what_the_body_cannot_say() -> None:
    rule = CostRule("instances", fallback=7)
    for body in (None, b"nope", b'{"x": 1}'):
        assert price(rule, body, partial=False, protocol="v1") == Priced(7, "fallback")
    assert price(rule, b'{"instances": [1]}', partial=True, protocol="v1") == Priced(7, "fallback")


def test_model_of() -> None:
    assert model_of(js({"model": "llama-3-8b", "messages": []})) == "llama-3-8b"
    assert model_of(b'{"messages": []}') is None
    assert model_of(b"not json") is None
    assert model_of(None) is None
    assert model_of(js({"model": ["x"]})) is None


# -- price(): any body ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=30)
# Bodies shaped like the protocols' (so the decoder gets past the first field) with anything
# inside, plus arbitrary JSON and arbitrary bytes.
shaped = st.one_of(
    st.builds(lambda v: {"instances": v}, json_values),
    st.builds(lambda v: {"inputs": v}, json_values),
    st.builds(lambda v: {"inputs": [{"name": "x", "shape": v}]}, json_values),
    st.builds(lambda m, t, msgs: {"model": m, "max_tokens": t, "messages": msgs},
              json_values, json_values, json_values),
    json_values,
)
bodies = st.one_of(shaped.map(lambda v: json.dumps(v).encode()), st.binary(max_size=300),
                   shaped.map(lambda v: json.dumps(v).encode()[:-1]))
rules = st.sampled_from([INSTANCES, TOKENS, CostRule("instances", per_instance=1000),
                         CostRule("tokens", fallback=3), CostRule("instances", fallback=1,
                                                                  max_body_bytes=64)])


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules, body=bodies, partial=st.booleans(),
       protocol=st.sampled_from(["v1", "v2", "openai"]))
def test_any_body_gets_a_bounded_cost_or_a_named_reason(rule: CostRule, body: bytes,
                                                        partial: bool, protocol: str) -> None:
    out = price(rule, body, partial=partial, protocol=protocol)
    if isinstance(out, Priced):
        assert isinstance(out.cost, int) and not isinstance(out.cost, bool)
        assert 1 <= out.cost <= MAX_COUNT
        if out.source == "fallback":
            assert out.cost == rule.fallback
        else:
            assert not partial and len(body) <= rule.max_body_bytes
    else:
        assert out.reason in REASONS
        assert rule.fallback is None
    name = model_of(body)
    assert name is None or isinstance(name, str)


@settings(max_examples=300)
@given(n=st.integers(1, 2000), per=st.integers(1, 50))
def test_v1_cost_is_the_batch_size_times_per_instance(n: int, per: int) -> None:
    rule = CostRule("instances", per_instance=per)
    body = js({"instances": [[0.5, 1.5]] * n})
    assert price(rule, body, partial=False, protocol="v1") == Priced(n * per, "instances")


# -- config -----------------------------------------------------------------------------------

def quota(models: str, limits: str = "[{name: tokens, rate: 10000, per: 1m}]") -> str:
    return f"""
default_plan: free
plans:
  free:
    limits: {limits}
    models:
{models}
"""


def load(text: str) -> Any:
    return parse_quota(yaml.safe_load(text), "quota.yaml")


def test_cost_rule_config() -> None:
    q = load(quota("""      "llama-*": {cost: {from: tokens, max_tokens: 2048,
                                   default_max_tokens: 128, bytes_per_token: 3.5,
                                   fallback: reject}}
      "*": {cost: {from: instances, per_instance: 2, fallback: 1, max_body_bytes: 65536}}"""))
    llama, rest = q.plans["free"].models
    assert llama.cost_rule == CostRule("tokens", default_max_tokens=128, max_tokens=2048,
                                       bytes_per_token=3.5)
    assert rest.cost_rule == CostRule("instances", per_instance=2, fallback=1,
                                      max_body_bytes=65536)


@pytest.mark.parametrize(("models", "key", "words"), [
    ('      "*": {cost: {from: pixels}}', "cost.from", "instances, tokens; got 'pixels'"),
    ('      "*": {cost: {from: tokens, max_tokens: 0}}', "cost.max_tokens", "between 1 and"),
    ('      "*": {cost: {from: tokens, max_tokens: 10, default_max_tokens: 20}}',
     "cost.default_max_tokens", "above max_tokens"),
    ('      "*": {cost: {from: tokens, bytes_per_token: 0.5}}', "cost.bytes_per_token",
     "between 1 and 64"),
    ('      "*": {cost: {from: instances, fallback: maybe}}', "cost.fallback", "reject"),
    ('      "*": {cost: {from: instances, fallback: 0}}', "cost.fallback", "between 1 and"),
    ('      "*": {cost: {from: instances, max_body_bytes: 99999999}}', "cost.max_body_bytes",
     "between 64 and 1048576"),
    ('      "*": {cost: {from: instances, per_instanse: 2}}', "cost.per_instanse",
     "per_instance"),
    ('      "*": {cost: {from: instances, max_tokens: 2}}', "cost.max_tokens", "unknown"),
])
def test_cost_rule_errors_name_the_key(models: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(quota(models))
    text = str(e.value)
    assert key in text and words in text, text


def test_limit_unit() -> None:
    q = load(quota('      "*": {cost: {from: tokens}}',
                   "[{name: tokens, rate: 10000, per: 1m}, "
                   "{name: requests, rate: 10, per: 1m, unit: requests}]"))
    assert [lim.unit for lim in q.plans["free"].limits] == ["cost", "requests"]
    with pytest.raises(ConfigError, match="unit"):
        load(quota('      "*": {}', "[{name: r, rate: 1, per: 1s, unit: tokens}]"))


def test_llm_routes_config() -> None:
    from authz.config.service_file import parse_settings
    s = parse_settings({"paths": {"llm_routes": ["/v1/chat/completions", "/v1/completions"]}},
                       "authz.yaml")
    assert s.paths.llm_routes == ("/v1/chat/completions", "/v1/completions")
    for bad, words in ((["v1/chat"], "absolute"), (["/v1/models/chat"], "protected prefix"),
                       (["/health"], "public path")):
        with pytest.raises(ConfigError) as e:
            parse_settings({"paths": {"llm_routes": bad}}, "authz.yaml")
        assert "paths.llm_routes" in str(e.value) and words in str(e.value), str(e.value)


# -- the pipeline -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(Path(tmp_path_factory.mktemp("idp")))


PRICED = """
default_plan: free
plans:
  free:
    limits:
      - {name: cost-per-minute, rate: 100, per: 1m}
      - {name: requests-per-minute, rate: 1000, per: 1m, unit: requests}
    models:
      "llama-*": {cost: {from: tokens, default_max_tokens: 20, max_tokens: 40}}
      "resnet": {cost: {from: instances}}
      "iris": {cost: {from: instances, fallback: 1}}
      "gpt-blocked": {limits: [{name: x, rate: 1, per: 1s}], cost: 1}
  shadowed:
    shadow: {rate_limits: true}
    limits: [{name: tiny, rate: 2, per: 1m}]
    models: {"*": {cost: {from: instances}}}
"""


async def pipeline(issuer: TestIssuer, text: str = PRICED) -> CheckPipeline:
    settings = Settings(paths=PathSettings(llm_routes=(CHAT,)))
    auth = Authenticator(settings.auth, static_issuers={issuer.name: issuer.jwks})
    await auth.start()
    p = CheckPipeline(answers=Answers(settings), paths=PathClassifier(settings.paths),
                      authenticator=auth, resolver=Resolver(load(text)),
                      store=MemoryBucketStore())
    p.ready = True
    return p


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


async def test_batch_is_charged_its_size(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    h = bearer(issuer.mint("batch"))
    d, _ = await p.decide(V1.replace("iris", "resnet"), h, js({"instances": [[1]] * 30}))
    assert d.allowed and d.outcome is Outcome.ALLOWED
    # cost-per-minute (the most restrictive) had 100: 70 left
    assert dict(d.response_headers)["ratelimit-remaining"] == "70"
    d, _ = await p.decide(V2, h, js({"inputs": [{"name": "x", "shape": [60, 3], "data": []}]}))
    assert dict(d.response_headers)["ratelimit-remaining"] == "10"
    d, _ = await p.decide(V2, h, js({"inputs": [{"name": "x", "shape": [11], "data": []}]}))
    assert d.status == 429 and d.limit == "cost-per-minute"
    # A smaller batch still fits what is left.
    d, _ = await p.decide(V2, h, js({"inputs": [{"name": "x", "shape": [10], "data": []}]}))
    assert d.allowed


async def test_requests_unit_counts_one_per_request(issuer: TestIssuer) -> None:
    p = await pipeline(issuer, """
default_plan: free
plans:
  free:
    limits:
      - {name: images, rate: 1000, per: 1m}
      - {name: calls, rate: 2, per: 1m, unit: requests}
    models: {"*": {cost: {from: instances}}}
""")
    h = bearer(issuer.mint("calls"))
    body = js({"instances": [1] * 100})
    assert [(await p.decide(V1, h, body))[0].status for _ in range(3)] == [200, 200, 429]


async def test_chat_model_comes_from_the_body(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    h = bearer(issuer.mint("chat"))
    body = js({"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 30})
    d, subject = await p.decide(CHAT, h, body)
    assert d.allowed and d.model == "llama-*" and subject == "chat"
    prompt = math.ceil(len(json.dumps([{"role": "user", "content": "hi"}])) / 4)
    assert dict(d.response_headers)["ratelimit-remaining"] == str(100 - 30 - prompt)
    # A model the plan does not list is refused like one in a path.
    d, _ = await p.decide(CHAT, h, js({"model": "mistral", "messages": []}))
    assert (d.status, d.reason) == (403, "model_not_allowed")


@pytest.mark.parametrize(("body", "reason"), [
    (None, "body_model_missing"),
    (b"{}", "body_model_missing"),
    (b"garbage", "body_model_missing"),
    (b'{"model": "../admin"}', "invalid_model_name"),
    (b'{"model": ""}', "invalid_model_name"),
])
async def test_chat_without_a_usable_model_is_400(issuer: TestIssuer, body: bytes | None,
                                                  reason: str) -> None:
    p = await pipeline(issuer)
    d, _ = await p.decide(CHAT, bearer(issuer.mint("c")), body)
    assert (d.status, d.outcome, d.reason) == (400, Outcome.INVALID_REQUEST, reason)
    assert json.loads(d.body)["reason"] == reason


async def test_a_cut_chat_body_is_400_body_partial(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    cut = js({"model": "llama-3", "messages": [{"role": "user", "content": "x" * 100}]})[:60]
    d, _ = await p.decide(CHAT, bearer(issuer.mint("cut"), **{PARTIAL_BODY_HEADER: "true"}), cut)
    assert (d.status, d.reason) == (400, "body_partial")


async def test_chat_is_authenticated_before_the_body_is_read(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    d, _ = await p.decide(CHAT, {}, b"garbage")
    assert d.status == 401


async def test_unpriceable_body_is_400_and_charges_nothing(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    h = bearer(issuer.mint("bad"))
    resnet = V1.replace("iris", "resnet")
    for body, headers, reason in ((b'{"instances": [1', h, "body_not_json"),
                                  (js({"instances": [1]}), {**h, PARTIAL_BODY_HEADER: "true"},
                                   "body_partial"),
                                  (None, h, "body_missing")):
        d, _ = await p.decide(resnet, headers, body)
        assert (d.status, d.reason, d.plan, d.model) == (400, reason, "free", "resnet")
    d, _ = await p.decide(resnet, {**h, PARTIAL_BODY_HEADER: "false"}, js({"instances": [1]}))
    assert dict(d.response_headers)["ratelimit-remaining"] == "99"  # nothing charged before


async def test_fallback_charges_the_fallback(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    d, _ = await p.decide(V1, bearer(issuer.mint("fb")), None)
    assert d.allowed and dict(d.response_headers)["ratelimit-remaining"] == "99"


async def test_cost_above_a_burst_is_413_not_429(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    h = bearer(issuer.mint("big"))
    d, _ = await p.decide(V1.replace("iris", "resnet"), h, js({"instances": [1] * 101}))
    assert (d.status, d.outcome, d.reason, d.limit) == (413, Outcome.TOO_LARGE,
                                                        "cost_exceeds_burst", "cost-per-minute")
    assert "retry-after" not in dict(d.response_headers)
    assert json.loads(d.body) == {"error": "too_large", "reason": "cost_exceeds_burst",
                                  "limit": "cost-per-minute", "plan": "free", "cost": 101,
                                  "burst": 100}
    # Nothing was charged: the whole burst is still there.
    d, _ = await p.decide(V1.replace("iris", "resnet"), h, js({"instances": [1] * 100}))
    assert d.allowed


async def test_shadow_limit_lets_an_oversized_cost_through_marked(issuer: TestIssuer) -> None:
    p = await pipeline(issuer)
    token = issuer.mint("sh", plan="shadowed")
    d, _ = await p.decide(V1, bearer(token), js({"instances": [1] * 5}))
    assert d.allowed and d.outcome is Outcome.SHADOW and d.reason == "rate_limited"


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow], deadline=None)
@given(body=st.one_of(st.none(), bodies), partial=st.booleans(),
       path=st.sampled_from([V1, V2, CHAT, V1.replace("iris", "resnet")]))
async def test_any_body_gets_a_decision(issuer: TestIssuer, body: bytes | None, partial: bool,
                                        path: str) -> None:
    p = await pipeline(issuer)
    headers = bearer(issuer.mint("fuzz"), **({PARTIAL_BODY_HEADER: "true"} if partial else {}))
    d, _ = await p.decide(path, headers, body)
    assert d.status in (200, 400, 403, 413, 429)
    assert d.allowed == (d.status == 200)
    if not d.allowed:
        assert json.loads(d.body)["reason"] == d.reason
