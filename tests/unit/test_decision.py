"""The decision builder (pure): statuses, headers, bodies."""

from __future__ import annotations

import json

import pytest

from authz.buckets.store import BucketSpec, BucketState, ChargeResult
from authz.config.settings import Settings, StoreSettings
from authz.decision import Answers, Outcome, header_value
from authz.quota.resolve import Grant, Refusal
from authz.tokens.identity import Identity, TokenFailure

ID = Identity(issuer="https://idp", subject="alice", key="abc", expires_at=0, claims={})
GRANT = Grant("free", "*", 1, (BucketSpec("{abc}:free:s", "s", 10, 5),))
M = Answers(Settings())


def state(name: str, remaining: float, reset: float, retry: float = 0.0) -> BucketState:
    return BucketState(name=name, capacity=10, remaining=remaining, reset_after=reset,
                       retry_after=retry)


def test_allowed_sets_identity_and_ratelimit_headers() -> None:
    result = ChargeResult(True, (state("s", 7.6, 0.5), state("d", 3.2, 80.1)), 0.0)
    d = M.charged(ID, GRANT, result)
    assert d.allowed and d.status == 200 and d.outcome is Outcome.ALLOWED
    assert dict(d.upstream_headers) == {"x-auth-subject": "alice", "x-auth-issuer": "https://idp",
                                        "x-auth-plan": "free"}
    # the most restrictive limit is the one with fewest left
    assert dict(d.response_headers) == {"ratelimit-limit": "10", "ratelimit-remaining": "3",
                                        "ratelimit-reset": "81"}
    assert d.limit == "d"
    # identity headers are overwritten, never also removed (Envoy removes after setting)
    assert not set(d.remove_headers) & set(dict(d.upstream_headers))
    assert "x-authz-degraded" in d.remove_headers


def test_rate_limited() -> None:
    result = ChargeResult(False, (state("s", 0.4, 1.9, 0.12), state("d", 5, 50, 0)), 0.12)
    d = M.charged(ID, GRANT, result)
    assert not d.allowed and d.status == 429 and d.outcome is Outcome.RATE_LIMITED
    h = dict(d.response_headers)
    assert h["retry-after"] == "1"  # whole seconds, rounded up, never 0
    assert h["ratelimit-remaining"] == "0" and h["ratelimit-limit"] == "10"
    body = json.loads(d.body)
    assert body == {"error": "rate_limited", "reason": "rate_limited", "limit": "s",
                    "plan": "free", "retry_after": 1}


def test_retry_after_rounds_up() -> None:
    d = M.charged(ID, GRANT, ChargeResult(False, (state("s", 0, 3, 2.01),), 2.01))
    assert dict(d.response_headers)["retry-after"] == "3"


@pytest.mark.parametrize("failure", list(TokenFailure))
def test_unauthenticated(failure: TokenFailure) -> None:
    d = M.unauthenticated(failure)
    assert d.status == 401 and not d.allowed
    h = dict(d.response_headers)
    assert h["www-authenticate"].startswith(
        'Bearer realm="ml-inference-api", error="invalid_token"')
    assert json.loads(d.body) == {"error": "invalid_token", "reason": failure.value}


def test_forbidden_and_blocked() -> None:
    d = M.refused(ID, Refusal("free", "model_not_allowed"))
    assert d.status == 403 and json.loads(d.body)["reason"] == "model_not_allowed"


def test_store_failure_policies() -> None:
    deny = M.store_failed(ID, GRANT)
    assert deny.status == 503 and not deny.allowed and deny.outcome is Outcome.BACKEND_ERROR
    allow = Answers(Settings(store=StoreSettings(on_error="allow"))).store_failed(ID, GRANT)
    assert allow.allowed and dict(allow.upstream_headers)["x-authz-degraded"] == "store-unavailable"


def test_public_path_strips_identity_headers() -> None:
    d = M.public()
    assert d.allowed and {"x-auth-subject", "x-auth-plan", "x-auth-issuer"} <= set(d.remove_headers)


def test_other_path_denied_by_default() -> None:
    assert M.other_path().status == 403


@pytest.mark.parametrize(
    ("raw", "safe"),
    [("alice", "alice"), ("a b", "a b"), ("a\r\nx-evil: 1", "a%0D%0Ax-evil: 1"),
     ("é", "%C3%A9"), ("50%", "50%25"), (" lead", "%20lead"), ("trail ", "trail%20"),
     ("\x00", "%00")],
)
def test_header_values_are_sanitized(raw: str, safe: str) -> None:
    out = header_value(raw)
    assert out == safe
    assert all(0x20 <= ord(c) <= 0x7E for c in out)
