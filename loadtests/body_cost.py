"""What a cost read from the body adds to a check: the reader alone, and the whole decision.

In one run, on ~16 KB bodies (a KServe v1 batch of 16-float rows, an Open Inference Protocol
v2 tensor, an OpenAI chat completion with a long prompt):

- `price()` (authz/quota/costs.py: msgspec into typed structs whose big parts are skipped as
  raw JSON) against the obvious alternative, `json.loads` and counting in Python;
- `CheckPipeline.decide()` in-process over the memory store, for a fixed-cost rule without a
  body, the same rule with a 16 KB body in the check (it must pay nothing), and a rule that
  prices the body: the difference is what body costing adds to a decision;
- protobuf parsing of the CheckRequest with and without a 16 KB raw_body (what the gRPC edge
  pays for a provider that includes the body, whatever the rule).

Not a test: numbers vary run to run on a shared VM; compare within one run.
    .venv/bin/python -m loadtests.body_cost [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from authz.buckets import MemoryBucketStore
from authz.config.settings import PathSettings, Settings
from authz.decision import Answers
from authz.paths import PathClassifier
from authz.pipeline import CheckPipeline
from authz.quota import parse_quota
from authz.quota.costs import price
from authz.quota.model import CostRule
from authz.quota.resolve import Resolver
from authz.tokens.verifier import Authenticator
from tests.support.issuer import TestIssuer

from .population import check_request, v1_batch_body

SIZE = 16 * 1024
INSTANCES = CostRule("instances")
TOKENS = CostRule("tokens")


def v2_body(size: int = SIZE) -> bytes:
    n = (size - 80) // 9
    return json.dumps({"inputs": [{"name": "input-0", "shape": [n // 16, 16],
                                   "datatype": "FP32",
                                   "data": [0.123456] * n}]}).encode()


def chat_body(size: int = SIZE) -> bytes:
    text = "The quick brown fox jumps over the lazy dog. " * (size // 46)
    return json.dumps({"model": "llama-3-8b", "max_tokens": 256,
                       "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": text}]}).encode()


def json_loads_price(rule: CostRule, body: bytes, protocol: str) -> int:
    """The same counts by json.loads: the baseline msgspec is measured against."""
    doc = json.loads(body)
    if rule.source == "instances":
        if protocol == "v2":
            return max(int(i["shape"][0]) for i in doc["inputs"]) * rule.per_instance
        items = doc.get("instances", doc.get("inputs"))
        return len(items) * rule.per_instance
    asked = doc.get("max_completion_tokens") or doc.get("max_tokens") or rule.default_max_tokens
    prompt = len(json.dumps(doc.get("messages", ""))) + len(json.dumps(doc.get("prompt", "")))
    return min(asked, rule.max_tokens) + math.ceil(prompt / rule.bytes_per_token)


def per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    """Median of 5 timed batches, microseconds per call."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    batch = max(1, int(n * seconds / 5 / 0.05))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch * 1e6)
    return sorted(samples)[2]


QUOTA = """
default_plan: fixed
plans:
  fixed:
    limits: [{name: s, rate: 1000000000, per: 1s, burst: 1000000000}]
  priced:
    limits: [{name: s, rate: 1000000000, per: 1s, burst: 1000000000}]
    models: {"*": {cost: {from: instances}}}
"""


async def decide_us(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        issuer = TestIssuer(Path(tmp))
        settings = Settings(paths=PathSettings(llm_routes=("/v1/chat/completions",)))
        auth = Authenticator(settings.auth, static_issuers={issuer.name: issuer.jwks})
        await auth.start()
        p = CheckPipeline(answers=Answers(settings), paths=PathClassifier(settings.paths),
                          authenticator=auth,
                          resolver=Resolver(parse_quota(yaml.safe_load(QUOTA), "q")),
                          store=MemoryBucketStore())
        p.ready = True
        fixed = {"authorization": "Bearer " + issuer.mint("u", plan="fixed")}
        priced = {"authorization": "Bearer " + issuer.mint("u", plan="priced")}
        body = v1_batch_body(SIZE)
        path = "/v1/models/resnet:predict"
        cases = {"fixed rule, no body": (fixed, None),
                 "fixed rule, 16 KB body in the check": (fixed, body),
                 "body-priced rule, 16 KB v1 body": (priced, body)}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for headers, b in cases.values():
            d, _ = await p.decide(path, headers, b)
            assert d.allowed, d
        n = max(1000, int(seconds * 20_000 / 5))
        # Five rounds, the cases interleaved in each, so drift hits them alike.
        for _ in range(5):
            for name, (headers, b) in cases.items():
                t0 = time.perf_counter()
                for _ in range(n):
                    await p.decide(path, headers, b)
                samples[name].append((time.perf_counter() - t0) / n * 1e6)
        out = {name: sorted(v)[2] for name, v in samples.items()}
        await auth.close()
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per case")
    args = ap.parse_args(argv)
    bodies = {"v1 batch": (v1_batch_body(SIZE), INSTANCES, "v1"),
              "v2 tensor": (v2_body(), INSTANCES, "v2"),
              "chat completion": (chat_body(), TOKENS, "openai")}
    print(f"{'body':18s} {'bytes':>6s} {'msgspec us':>11s} {'json.loads us':>14s} {'ratio':>6s}")
    for name, (body, rule, protocol) in bodies.items():
        got = price(rule, body, partial=False, protocol=protocol)
        want = json_loads_price(rule, body, protocol)
        assert getattr(got, "cost", None) == want, (name, got, want)
        fast = per_call_us(lambda b=body, r=rule, pr=protocol: price(r, b, partial=False,
                                                                     protocol=pr),
                           args.seconds)
        slow = per_call_us(lambda b=body, r=rule, pr=protocol: json_loads_price(r, b, pr),
                           args.seconds)
        print(f"{name:18s} {len(body):6d} {fast:11.1f} {slow:14.1f} {slow / fast:6.1f}x")
    print()
    results = asyncio.run(decide_us(args.seconds))
    base = results["fixed rule, no body"]
    for name, us in results.items():
        print(f"decide(): {name:38s} {us:7.1f} us  ({us - base:+.1f} us)")
    print()
    body = v1_batch_body(SIZE)
    plain = check_request("Bearer x").SerializeToString()
    with_body = check_request("Bearer x", raw_body=body).SerializeToString()
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    a = per_call_us(lambda: pb.CheckRequest.FromString(plain), args.seconds)
    b = per_call_us(lambda: pb.CheckRequest.FromString(with_body), args.seconds)
    print(f"CheckRequest parse: {len(plain)} B {a:.1f} us; with a {len(body)} B raw_body "
          f"{b:.1f} us ({b - a:+.1f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
