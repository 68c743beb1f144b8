"""A load-test world: a signing key, its JWKS, a quota file, a service config, and users.

Everything the load tests send is minted here, so the service under test trusts it exactly as it
would trust a real identity provider: RS256 tokens signed with a key published in a JWKS file,
with the audience, issuer, exp and plan claims a real access token carries.

`python -m loadtests.population --out DIR` writes a world to DIR (see `write_world`); the
locustfile and bench.py read it back with `World.load`.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.service.auth.v3 import external_auth_pb2

from authz.tokens.signer import Signer as TokenSigner

ISSUER = "https://issuer.loadtest.example/"
AUDIENCE = "ml-inference-api"
KID = "loadtest-rs256-1"
HOST = "inference.example.com"
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# The W3C trace header an Istio sidecar adds, sampled flag set (`-01`). `UNSAMPLED_TRACEPARENT`
# is the same caller saying "not sampled" (`-00`): what ~99% of a mesh's requests carry at the
# usual 1% sampling.
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED_TRACEPARENT = TRACEPARENT[:-2] + "00"

# Plans: `free` and `pro` follow the README example; `bench` has limits high enough that a
# benchmark never runs out (every check is a full allow that charges two buckets in the store);
# `trickle` admits one request an hour, so its users are over limit at once and stay there (the
# deny-cache scenario).
QUOTA_YAML = """\
plan_claim: plan
default_plan: free
plans:
  free:
    limits:
      - {name: per-second, rate: 5, per: 1s, burst: 10}
      - {name: per-day, rate: 2000, per: 1d}
  pro:
    limits:
      - {name: per-second, rate: 100, per: 1s, burst: 200}
    models: {"llama-*": {cost: 5}, "*": {}}  # first match wins: the specific rule first
  bench:
    limits:
      - {name: per-second, rate: 1000000000, per: 1s, burst: 1000000000}
      - {name: per-day, rate: 1000000000, per: 1d, burst: 1000000000}
  trickle:
    limits:
      - {name: per-hour, rate: 1, per: 1h, burst: 1}
  bench-batch:  # bench's limits, each request charged its batch size (the body's instances)
    limits:
      - {name: per-second, rate: 1000000000, per: 1s, burst: 1000000000}
      - {name: per-day, rate: 1000000000, per: 1d, burst: 1000000000}
    models: {"*": {cost: {from: instances}}}
"""

MODELS = ("llama-3-8b", "mistral-7b", "resnet-50", "bert-base", "whisper-small")


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: 1 byte compressed flag (0) + 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


class Signer(TokenSigner):
    """Mints RS256 tokens the way an identity provider would (plus deliberately bad ones)."""

    def __init__(self, private_key: rsa.RSAPrivateKey, kid: str = KID) -> None:
        super().__init__(ISSUER, private_key, kid=kid)
        # A second key under the SAME kid: its tokens parse and name a known key, but the
        # signature does not verify.
        self._impostor: rsa.RSAPrivateKey | None = None

    @classmethod
    def generate(cls) -> Signer:  # type: ignore[override]
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def from_pem(cls, pem: bytes) -> Signer:  # type: ignore[override]
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("load-test signing key must be RSA")
        return cls(key)

    def population_claims(self, subject: str, plan: str, *,
                          lifetime: float = 3600.0) -> dict[str, Any]:
        # The extra claims (name, email, scope, ...) are what a real IdP puts in an access
        # token; they bring the token to ~850 bytes, as large as real ones (the bench
        # request).
        now = int(time.time())
        return self.claims(subject, plan=plan, ttl=lifetime, extra_claims={
            "nbf": now - 5, "jti": uuid.uuid4().hex, "azp": "inference-portal",
            "scope": "openid profile email models:predict models:infer",
            "email": f"{subject}@customers.example.com"})

    def token(self, subject: str, plan: str, *, lifetime: float = 3600.0) -> str:
        return self.sign(self.population_claims(subject, plan, lifetime=lifetime))

    def expired_token(self, subject: str, plan: str) -> str:
        return self.sign(self.population_claims(subject, plan, lifetime=-600.0))

    def wrong_audience_token(self, subject: str, plan: str) -> str:
        claims = self.population_claims(subject, plan)
        claims["aud"] = "some-other-api"
        return self.sign(claims)

    def bad_signature_token(self, subject: str, plan: str) -> str:
        if self._impostor is None:
            self._impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.sign(self.population_claims(subject, plan), key=self._impostor)


# Kinds of invalid credentials sent by the "invalid" share of the population, each a 401.
INVALID_KINDS = ("expired", "bad_signature", "wrong_audience", "garbage", "missing")


def invalid_authorization(signer: Signer, kind: str, subject: str) -> str | None:
    """The Authorization header value for an invalid credential of `kind` (None: no header)."""
    if kind == "expired":
        return "Bearer " + signer.expired_token(subject, "free")
    if kind == "bad_signature":
        return "Bearer " + signer.bad_signature_token(subject, "free")
    if kind == "wrong_audience":
        return "Bearer " + signer.wrong_audience_token(subject, "free")
    if kind == "garbage":
        return "Bearer not-a-jwt." + uuid.uuid4().hex
    if kind == "missing":
        return None
    raise ValueError(f"unknown invalid-token kind {kind!r}; expected one of {INVALID_KINDS}")


def check_request(
    authorization: str | None,
    *,
    path: str = "/v1/models/llama-3-8b:predict",
    method: str = "POST",
    request_id: str | None = None,
    traceparent: str = TRACEPARENT,
    raw_body: bytes = b"",
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest shaped like the ones an Istio sidecar sends (see envoy-istio-contract)."""
    rid = request_id or str(uuid.uuid4())
    headers = {
        ":authority": HOST,
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "content-type": "application/json",
        "content-length": "412",
        "accept": "application/json",
        "accept-encoding": "gzip, deflate",
        "user-agent": "python-requests/2.32.3",
        "x-request-id": rid,
        "x-forwarded-proto": "https",
        "x-forwarded-for": "203.0.113.24",
        "x-envoy-attempt-count": "1",
        "traceparent": traceparent,
    }
    if authorization is not None:
        headers["authorization"] = authorization
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.source.address.socket_address.address = "10.244.1.17"
    attrs.source.address.socket_address.port_value = 43512
    attrs.source.principal = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
    attrs.destination.address.socket_address.address = "10.244.2.9"
    attrs.destination.address.socket_address.port_value = 8080
    attrs.destination.principal = "spiffe://cluster.local/ns/models/sa/inference"
    http = attrs.request.http
    http.id = "13557416227460934101"
    http.method = method
    http.path = path
    http.host = HOST
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    http.size = 412
    for k, v in headers.items():
        http.headers[k] = v
    if raw_body:  # includeRequestBodyInCheck with packAsBytes
        http.raw_body = raw_body
        http.size = len(raw_body)
        http.headers["content-length"] = str(len(raw_body))
        http.headers["x-envoy-auth-partial-body"] = "false"
    attrs.request.time.GetCurrentTime()
    return req


def v1_batch_body(size: int = 16 * 1024) -> bytes:
    """A KServe v1 predict body of about `size` bytes: rows of 16 floats."""
    row = [round(0.1 + i / 7, 6) for i in range(16)]
    one = len(json.dumps(row)) + 2
    return json.dumps({"instances": [row] * max(1, (size - 20) // one)}).encode()


# The HTTP edge's check requests carry the shipped registration's pathPrefix.
HTTP_PATH_PREFIX = "/check"


def http_check_headers(authorization: str | None, *,
                       traceparent: str = TRACEPARENT) -> dict[str, str]:
    """The headers of the check request Envoy's HTTP client sends for a client's request, as
    the shipped envoyExtAuthzHttp registration includes them (authorization and the trace
    headers), plus the two Envoy adds (seen on Envoy 1.40). Host, method and path come from the
    client's request."""
    headers = {"traceparent": traceparent, "x-envoy-internal": "true",
               "x-envoy-expected-rq-timeout-ms": "500"}
    if authorization is not None:
        headers["authorization"] = authorization
    return headers


def model_path(rng: random.Random) -> str:
    model = rng.choice(MODELS)
    if rng.random() < 0.5:
        return f"/v1/models/{model}:predict"
    return f"/v2/models/{model}/infer"


@dataclass(frozen=True)
class World:
    """Paths of a written world (all absolute)."""

    root: Path
    key_file: Path
    jwks_file: Path
    quota_file: Path
    config_file: Path

    @classmethod
    def at(cls, root: Path) -> World:
        root = root.resolve()
        return cls(
            root=root,
            key_file=root / "signing-key.pem",
            jwks_file=root / "jwks.json",
            quota_file=root / "quota.yaml",
            config_file=root / "config.yaml",
        )

    @classmethod
    def load(cls, root: Path) -> World:
        world = cls.at(root)
        for p in (world.key_file, world.jwks_file, world.quota_file):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} missing: write a world first (python -m loadtests.population --out "
                    f"{root})"
                )
        return world

    def signer(self) -> Signer:
        return Signer.from_pem(self.key_file.read_bytes())

    def config_yaml(
        self,
        *,
        grpc_port: int,
        http_port: int = 0,
        redis_url: str = "",
        token_cache_size: int | None = None,
        log_level: str = "WARNING",
        metrics_port: int = 0,
        store: dict[str, Any] | None = None,
    ) -> str:
        """A service config for this world (JSON is valid YAML: no quoting surprises)."""
        auth: dict[str, Any] = {
            "issuers": [
                {"issuer": ISSUER, "jwks_file": str(self.jwks_file), "algorithms": ["RS256"]}
            ],
            "audience": AUDIENCE,
        }
        if token_cache_size is not None:
            auth["token_cache_size"] = token_cache_size
        config = {
            # metrics_port 0: several servers run side by side in one benchmark. No drain delay:
            # nothing routes around a load-test server, and the benchmark restarts servers.
            "server": {"host": "127.0.0.1", "grpc_port": grpc_port, "metrics_port": metrics_port,
                       "http_port": http_port, "http_path_prefix": HTTP_PATH_PREFIX,
                       "drain_delay": "0s", "shutdown_grace": "2s"},
            "auth": auth,
            "store": {"redis_url": redis_url, **(store or {})},
            "quota_file": str(self.quota_file),
            "telemetry": {"log_level": log_level, "log_format": "text"},
        }
        return json.dumps(config, indent=2) + "\n"

    def write_config(self, path: Path, **kwargs: Any) -> Path:
        path.write_text(self.config_yaml(**kwargs))
        return path


def write_world(
    root: Path, *, grpc_port: int = 9000, redis_url: str = "", signer: Signer | None = None
) -> World:
    """Write key, JWKS, quota and a default config.yaml under `root` (created if missing)."""
    root.mkdir(parents=True, exist_ok=True)
    world = World.at(root)
    signer = signer or Signer.generate()
    world.key_file.write_bytes(signer.pem())
    world.key_file.chmod(0o600)
    world.jwks_file.write_text(json.dumps(signer.jwks, indent=2) + "\n")
    world.quota_file.write_text(QUOTA_YAML)
    world.write_config(world.config_file, grpc_port=grpc_port, redis_url=redis_url)
    return world


def mint_many(pem: bytes, subjects: Sequence[str], plan: str) -> list[str]:
    """Tokens for many subjects (picklable entry point for a process pool)."""
    signer = Signer.from_pem(pem)
    return [signer.token(s, plan) for s in subjects]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write the world to")
    ap.add_argument("--grpc-port", type=int, default=9000)
    ap.add_argument("--redis-url", default="", help="store.redis_url (empty: in-memory store)")
    args = ap.parse_args(argv)
    world = write_world(args.out, grpc_port=args.grpc_port, redis_url=args.redis_url)
    # A fixed request for h2load: a `bench`-plan user (never out of tokens), valid for a day.
    body = world.root / "check-bench.bin"
    token = world.signer().token("bench-user-0001", "bench", lifetime=86400)
    body.write_bytes(grpc_frame(check_request("Bearer " + token).SerializeToString()))
    print(f"world written to {world.root}; serve it with: authz serve --config {world.config_file}")
    print(f"h2load -c 16 -m 8 -D 10 -d {body} -H 'content-type: application/grpc' "
          f"-H 'te: trailers' http://127.0.0.1:{args.grpc_port}{CHECK_METHOD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
