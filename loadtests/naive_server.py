"""The naive baseline: the same decision written the quick way (the benchmark's full/naive).

Per call it does what a straightforward implementation does: PyJWT `jwt.decode` (signature, exp,
aud, iss) on every request, one `redis.asyncio` EVALSHA awaited per request (no coalescing of
concurrent calls), and a CheckResponse built from scratch. It reads the same config and quota
files as the service and gives the same answers for the cases the benchmark sends (allow with
identity headers, 401, 403, 429 with Retry-After), so the comparison is like for like. It uses
uvloop like the service does, so the ratio measures the design rather than the event loop.

    python -m loadtests.naive_server --config WORLD/config-naive.yaml --port 9101
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import redis.asyncio as aioredis
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

from loadtests.floor_server import serve_until_signal

# A plain token bucket over all of a request's buckets, all-or-nothing, clocked by Redis TIME.
# Bucket hash: tokens (level after the last charge) and ts (when). Keys expire once full again.
TOKEN_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local levels = {}
local retry = 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local cap = tonumber(ARGV[2 * i + 1])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if tokens < cost then
    local wait = (cost - tokens) / rate
    if wait > retry then retry = wait end
  end
end
if retry > 0 then return {0, tostring(retry)} end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local cap = tonumber(ARGV[2 * i + 1])
  redis.call('HSET', KEYS[i], 'tokens', tostring(levels[i] - cost), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate * 1000) + 1000)
end
return {1, '0'}
"""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_PROTECTED = ("/v1/models/", "/v2/models/")
_MODEL = re.compile(r"^/v[12]/models/([^/:]+)")


def _seconds(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"bad duration {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class NaiveLimit:
    name: str
    rate: float  # tokens per second
    burst: float


@dataclass(frozen=True)
class NaivePlan:
    limits: tuple[NaiveLimit, ...]
    models: tuple[tuple[str, int], ...] | None  # (glob, cost); None: every model, cost 1


def load_plans(quota_file: str) -> tuple[str, str, dict[str, NaivePlan]]:
    data = yaml.safe_load(Path(quota_file).read_text())
    plans: dict[str, NaivePlan] = {}
    for name, p in (data.get("plans") or {}).items():
        limits = tuple(
            NaiveLimit(
                lim["name"],
                float(lim["rate"]) / _seconds(lim.get("per", 1)),
                float(lim.get("burst", lim["rate"])),
            )
            for lim in (p or {}).get("limits", [])
        )
        models = None
        if (p or {}).get("models") is not None:
            # A cost read from the body (a mapping) is beyond the naive baseline: it charges 1.
            models = tuple((g, c if isinstance(c := (r or {}).get("cost", 1), int) else 1)
                           for g, r in p["models"].items())
        plans[name] = NaivePlan(limits, models)
    return data.get("plan_claim", "plan"), data.get("default_plan", "free"), plans


def _deny(status: int, body: dict[str, Any], headers: Sequence[tuple[str, str]] = ()) -> Any:
    resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=7))
    resp.denied_response.status.code = status
    resp.denied_response.body = json.dumps(body)
    for k, v in (("content-type", "application/json"), *headers):
        resp.denied_response.headers.append(
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
        )
    return resp


class NaiveAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, config: dict[str, Any], redis_client: aioredis.Redis) -> None:
        issuer = config["auth"]["issuers"][0]
        self.issuer = issuer["issuer"]
        self.audience = config["auth"].get("audience", "ml-inference-api")
        jwks = json.loads(Path(issuer["jwks_file"]).read_text())
        self.keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}
        self.plan_claim, self.default_plan, self.plans = load_plans(config["quota_file"])
        self.redis = redis_client
        self.sha = ""

    async def start(self) -> None:
        self.sha = await self.redis.script_load(TOKEN_BUCKET_LUA)

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        try:
            return await self._check(request)
        except Exception as e:  # a quick job still must not turn a bug into an allow
            return _deny(500, {"error": "internal_error", "detail": type(e).__name__})

    async def _check(self, request: external_auth_pb2.CheckRequest) -> Any:
        headers = request.attributes.request.http.headers
        path = headers.get(":path", request.attributes.request.http.path).split("?", 1)[0]
        if not path.startswith(_PROTECTED):
            return _deny(403, {"error": "path_not_covered"})
        m = _MODEL.match(path)
        if m is None:
            return _deny(400, {"error": "invalid_path"})
        model = m.group(1)
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return _deny(401, {"error": "missing_token"}, [("www-authenticate", "Bearer")])
        token = auth[7:]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.keys[kid]
            claims = jwt.decode(
                token, key, algorithms=["RS256"], audience=self.audience, issuer=self.issuer
            )
        except (jwt.PyJWTError, KeyError) as e:
            return _deny(401, {"error": "invalid_token", "detail": type(e).__name__},
                         [("www-authenticate", 'Bearer error="invalid_token"')])
        plan_name = claims.get(self.plan_claim) or self.default_plan
        plan = self.plans.get(plan_name) or self.plans[self.default_plan]
        cost = 1
        if plan.models is not None:
            matched = [c for g, c in plan.models if fnmatch.fnmatchcase(model, g)]
            if not matched:
                return _deny(403, {"error": "model_not_allowed"})
            cost = max(matched)
        ident = hashlib.sha256(f"{claims['iss']}\0{claims['sub']}".encode()).hexdigest()[:32]
        keys = [f"naive:{{{ident}}}:{plan_name}:{lim.name}" for lim in plan.limits]
        args: list[float] = [cost]
        for lim in plan.limits:
            args += [lim.rate, lim.burst]
        allowed, retry = await self.redis.evalsha(self.sha, len(keys), *keys, *args)
        if not int(allowed):
            retry_after = str(max(1, math.ceil(float(retry))))
            return _deny(429, {"error": "rate_limited", "retry_after": retry_after},
                         [("retry-after", retry_after)])
        resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))
        for k, v in (("x-auth-subject", claims["sub"]), ("x-auth-issuer", claims["iss"]),
                     ("x-auth-plan", plan_name)):
            resp.ok_response.headers.append(
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
            )
        return resp


async def serve(config: dict[str, Any], host: str, port: int) -> None:
    client = aioredis.Redis.from_url(config["store"]["redis_url"])
    service = NaiveAuthorization(config, client)
    await service.start()
    await serve_until_signal(grpc.aio.server(), service, "naive_server", host, port)
    await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="naive ext_authz Check server (benchmark baseline)")
    ap.add_argument("--config", required=True, help="a service config with a Redis store")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    import uvloop

    config = yaml.safe_load(Path(args.config).read_text())
    uvloop.run(serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
