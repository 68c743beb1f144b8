"""JSON Schemas (draft 2020-12) of the config and quota files, recorded from their loaders.

One source of truth: `SchemaRecorder` is a `Node` over no document. The loader's own functions
(`read_settings`, `read_quota`) run through it; every typed getter they call records its key
with the type, bounds, default and choices it was called with, and `done()` (the loader
refusing unknown keys) closes the object. Nothing is written twice: a new key or bound in a
loader is in the schema the next time it is generated, and tests/unit/test_schema.py fails
until the committed file is regenerated. Only descriptions are kept here, by key path, and
generating fails while a key has none (or a description names no key).

Rules across keys (cost <= burst, one key source per issuer, redis_mode's needs, ...) and the
free-text checks (Redis URLs, header names) stay in the loaders: the schema accepts what they
refuse there, never the other way round (tests/unit/test_schema.py lists them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .yaml_reader import DURATION_SYNTAX, Node, format_duration

T = TypeVar("T")

DRAFT = "https://json-schema.org/draft/2020-12/schema"
CONFIG_FILE = "authz-config.schema.json"
QUOTA_FILE = "authz-quota.schema.json"
# Non-empty after str.strip() (Python's \S is str.isspace's complement).
_NOT_BLANK = r"\S"
_NO_DEFAULT = object()


class SchemaDefinitionError(TypeError):
    """A loader reads a key in a way the recorder cannot describe, or a key lacks a
    description: a bug in this package, found when the schema is generated (and in tests)."""


@dataclass
class _Key:
    schema: Any  # a JSON Schema dict, possibly holding SchemaRecorders to render
    required: bool
    default: Any = _NO_DEFAULT
    nullable: bool = True  # an absent key and `key:` (null) read the same: the default


class SchemaRecorder(Node):
    """A `Node` over no document: each getter records its key and returns the default (or a
    placeholder for a required key), so the loader runs through every key it can read."""

    def __init__(self, path: str) -> None:
        super().__init__("<schema>", path, {})
        self.keys: dict[str, _Key] = {}
        self.closed = False
        self.variants: list[SchemaRecorder] = []

    def _put(self, name: str, key: _Key) -> None:
        if name in self.keys:
            raise SchemaDefinitionError(f"{self.key(name)}: read twice")
        self.keys[name] = key

    def _opt(self, name: str, schema: dict[str, Any], default: Any) -> None:
        self._put(name, _Key(schema, required=False, default=default))

    # What the loader's checks see; none of them can fail here.
    def report(self, name: str, problem: str) -> None:
        pass

    @property
    def failed(self) -> bool:
        return False

    @property
    def has_unknown_keys(self) -> bool:
        return False

    def has(self, name: str) -> bool:
        return True  # so the loader also reads what it reads only when the key is there

    def raw(self, name: str) -> Any:
        raise SchemaDefinitionError(
            f"{self.key(name)}: read as raw data, which no schema can be recorded from; "
            "read it with a typed Node getter")

    def done(self) -> None:
        self.closed = True

    def section(self, name: str) -> Node:
        child = SchemaRecorder(self.key(name))
        self._put(name, _Key(child, required=False))
        return child

    def child(self, path: str, value: Any) -> Node:
        if not isinstance(value, SchemaRecorder):  # only what items() yields reaches here
            raise SchemaDefinitionError(f"{path}: a child of no recorded list")
        return value

    def items(self, name: str) -> Iterator[tuple[str, Any]]:
        item = SchemaRecorder(f"{self.key(name)}[]")
        self._put(name, _Key({"type": "array", "items": item}, required=False))
        yield item.path, item

    def entries(self, name: str, *, pattern: re.Pattern[str], hint: str, limit: int,
                what: str, reserved: tuple[str, ...] = (), reserved_hint: str = "",
                empty: str = "") -> Iterator[tuple[str, Node]]:
        value = SchemaRecorder(f"{self.key(name)}.*")
        names: dict[str, Any] = {"pattern": pattern.pattern}
        if reserved:
            names["not"] = {"enum": list(reserved)}
        schema: dict[str, Any] = {"type": "object", "propertyNames": names,
                                  "additionalProperties": _Nullable(value),
                                  "maxProperties": limit}
        if empty:
            schema["minProperties"] = 1
        self._put(name, _Key(schema, required=False, nullable=not empty))
        yield "*", value

    def text(self, name: str, default: str | None = None, *, allow_empty: bool = True,
             pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
        patterns = [pattern.pattern] if pattern is not None else []
        if not allow_empty:
            patterns.append(_NOT_BLANK)
        schema = _with_patterns({"type": "string"}, patterns)
        if default is None:
            self._put(name, _Key(schema, required=True, nullable=False))
            return ""
        self._opt(name, schema, default)
        return default

    def opt_str(self, name: str, *, pattern: re.Pattern[str] | None = None,
                hint: str = "") -> str | None:
        patterns = [pattern.pattern] if pattern is not None else []
        self._opt(name, _with_patterns({"type": "string"}, [*patterns, _NOT_BLANK]),
                  _NO_DEFAULT)
        return None

    def integer(self, name: str, default: int, *, minimum: int = 0,
                maximum: int | None = None) -> int:
        self._opt(name, _bounded({"type": "integer"}, minimum, maximum), default)
        return default

    def number(self, name: str, default: float | None = None, *, positive: bool = True,
               minimum: float | None = None, maximum: float | None = None) -> float:
        schema = _number(positive, minimum, maximum)
        if default is None:
            self._put(name, _Key(schema, required=True, nullable=False))
            return math.nan  # a default computed from it (burst's) is then not recorded
        self._opt(name, schema, default if math.isfinite(default) else _NO_DEFAULT)
        return default

    def duration(self, name: str, default: float | None = None, *, allow_zero: bool = False,
                 minimum: float | None = None, maximum: float | None = None,
                 above: str = "") -> float:
        seconds = _number(not allow_zero, minimum, maximum)
        if allow_zero and minimum is not None:
            seconds = {"anyOf": [{"const": 0}, seconds]}
        # A string's value cannot be bounded by a schema: only its spelling is.
        schema = {"anyOf": [seconds, {"type": "string", "pattern": DURATION_SYNTAX.pattern}]}
        if default is None:
            self._put(name, _Key(schema, required=True, nullable=False))
            return math.nan
        self._opt(name, schema, format_duration(default) if default else 0)
        return default

    def flag(self, name: str, default: bool) -> bool:
        self._opt(name, {"type": "boolean"}, default)
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        self._opt(name, {"type": "string", "enum": list(choices)}, default)
        return default

    def opt_choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        self._opt(name, {"type": "string", "enum": list(choices)}, _NO_DEFAULT)
        return None

    def str_list(self, name: str, default: tuple[str, ...], *,
                 choices: tuple[str, ...] | None = None, unknown: str = "unknown value",
                 note: str = "") -> tuple[str, ...]:
        item: dict[str, Any] = {"type": "string", "minLength": 1}
        if choices is not None:
            item["enum"] = list(choices)
        self._opt(name, {"type": "array", "items": item}, list(default))
        return default

    def integer_or(self, name: str, word: str, *, minimum: int, maximum: int) -> int | None:
        self._opt(name, {"anyOf": [_bounded({"type": "integer"}, minimum, maximum),
                                   {"const": word}]}, word)
        return None

    def either(self, name: str, scalar: Callable[[], T], section: Callable[[Node], T]) -> T:
        result = scalar()
        plain = self.keys.pop(name)
        sub = self.section(name)
        self.keys.pop(name)
        section(sub)
        self._put(name, _Key({"anyOf": [plain.schema, sub]}, required=plain.required,
                             default=plain.default, nullable=plain.nullable))
        return result

    def variant(self, name: str, branches: Mapping[str, Callable[[Node], T]]) -> T:
        results = []
        for i, (value, read) in enumerate(branches.items()):
            branch = SchemaRecorder(self.path)
            # The first is the default: its `name` may be left out; the others need it.
            branch._put(name, _Key({"const": value}, required=i > 0,
                                   default=value if i == 0 else _NO_DEFAULT, nullable=i == 0))
            results.append(read(branch))
            self.variants.append(branch)
        return results[0]

    # Rendering

    def render(self, docs: Mapping[str, str], used: set[str]) -> dict[str, Any]:
        if not self.variants:
            return self._object(self.keys, self.closed, docs, used)
        return {"type": "object", "oneOf": [
            self._object({**self.keys, **b.keys}, self.closed or b.closed, docs, used)
            for b in self.variants]}

    def _object(self, keys: Mapping[str, _Key], closed: bool, docs: Mapping[str, str],
                used: set[str]) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for name, key in keys.items():
            path = self.key(name)
            if path not in docs:
                raise SchemaDefinitionError(f"{path}: no description (add one to the "
                                            "schema's descriptions)")
            used.add(path)
            rendered: dict[str, Any] = _render(key.schema, docs, used)
            if key.nullable:
                rendered = _or_null(rendered)
            out = {"description": docs[path], **rendered}
            if key.default is not _NO_DEFAULT:
                out["default"] = key.default
            props[name] = out
        schema: dict[str, Any] = {"type": "object", "properties": props}
        required = [name for name, key in keys.items() if key.required]
        if required:
            schema["required"] = required
        if closed:
            schema["additionalProperties"] = False
        return schema


@dataclass
class _Nullable:
    """A mapping's value that may be left empty (`free:` reads as `free: {}`)."""

    node: SchemaRecorder


def _render(obj: Any, docs: Mapping[str, str], used: set[str]) -> Any:
    if isinstance(obj, SchemaRecorder):
        schema = obj.render(docs, used)
        if obj.path.endswith(".*") and obj.path in docs:  # a named entry's (a plan, a rule)
            used.add(obj.path)
            schema = {"description": docs[obj.path], **schema}
        return schema
    if isinstance(obj, _Nullable):
        return _or_null(_render(obj.node, docs, used))
    if isinstance(obj, dict):
        return {k: _render(v, docs, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_render(v, docs, used) for v in obj]
    return obj


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        out = {**schema, "type": [kind, "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    return {"anyOf": [schema, {"type": "null"}]}


def _with_patterns(schema: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    if patterns:
        schema["pattern"] = patterns[0]
    if len(patterns) > 1:
        schema["allOf"] = [{"pattern": p} for p in patterns[1:]]
    return schema


def _bounded(schema: dict[str, Any], minimum: float | None,
             maximum: float | None) -> dict[str, Any]:
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _number(positive: bool, minimum: float | None, maximum: float | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    if minimum is None or (positive and minimum <= 0):
        schema["exclusiveMinimum" if positive else "minimum"] = 0
    return _bounded(schema, minimum, maximum)


def build(read: Callable[[Node], object], *, title: str, description: str,
          docs: Mapping[str, str], empty_file: bool = True) -> dict[str, Any]:
    """The schema of the file `read` reads (read_settings, read_quota). `empty_file`: whether
    its parser reads an empty file (YAML null) as one without keys, as `Node.root` does, or
    refuses it, as `parse_quota` does (then `{}` is refused too)."""
    root = SchemaRecorder("")
    read(root)
    used: set[str] = set()
    body = root.render(docs, used)
    unused = sorted(set(docs) - used)
    if unused:
        raise SchemaDefinitionError(f"descriptions of keys no loader reads: {unused}")
    body = _or_null(body) if empty_file else {**body, "minProperties": 1}
    return {"$schema": DRAFT, "title": title, "description": description, **body}


def dumps(schema: Mapping[str, Any]) -> str:
    """The committed form: stable, so a regenerated file differs only where the schema does."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def config_schema() -> dict[str, Any]:
    from .service_file import read_settings

    return build(lambda root: read_settings(root, None), title="authz service config",
                 description="The authz service config file (README \"Configuration "
                 "reference\"). Generated from authz/config/service_file.py by `authz schema "
                 "config`: do not edit.", docs=CONFIG_DOCS)


CONFIG_DOCS: dict[str, str] = {
    "server": "Listening and process lifecycle.",
    "server.host": "Listen address.",
    "server.grpc_port": "gRPC port: Authorization/Check and grpc.health.v1.Health.",
    "server.metrics_port": "Prometheus /metrics port (0: off). With N workers, worker i uses "
                           "port + 1 + i on loopback.",
    "server.http_port": "Envoy's HTTP ext_authz protocol on its own port (0: off).",
    "server.http_path_prefix": "What the HTTP provider's pathPrefix puts before every check "
                               "request's path (starts with '/'; empty: none).",
    "server.workers": "Worker processes (0: one per CPU). Needs store.redis_url.",
    "server.drain_delay": "After SIGTERM: health NOT_SERVING at once, connections still "
                          "accepted this long.",
    "server.shutdown_grace": "In-flight checks get this long to finish.",
    "auth": "Token verification.",
    "auth.issuers": "Trusted issuers, each with exactly one key source.",
    "auth.issuers[].issuer": "The tokens' iss.",
    "auth.issuers[].jwks_url": "The issuer's JWKS (https://). One of jwks_url, jwks_file, "
                               "pem_file.",
    "auth.issuers[].jwks_file": "A JWKS file (relative to the config file).",
    "auth.issuers[].pem_file": "A PEM public key file (relative to the config file).",
    "auth.issuers[].algorithms": "Allowed algorithms; 'none' and HS* are never accepted.",
    "auth.audience": "Required in aud (string or list).",
    "auth.leeway": "Clock skew tolerated for exp/nbf/iat.",
    "auth.max_token_bytes": "Longer tokens are refused before parsing.",
    "auth.token_cache_size": "Verified-token cache entries (~2 KB each).",
    "auth.jwks_refresh_min_interval": "An unknown kid refetches the JWKS at most this often.",
    "auth.jwks_refresh_interval": "Background JWKS refresh.",
    "auth.jwks_timeout": "JWKS fetch timeout.",
    "auth.on_jwks_unavailable": "At start: fail (exit 2) or retry (NOT_SERVING until keys "
                                "load).",
    "store": "The bucket store (Redis, or in-memory when redis_url is empty).",
    "store.redis_url": "redis://, rediss:// or unix:// URL; empty: the in-memory store "
                       "(development). Env AUTHZ_REDIS_URL overrides.",
    "store.key_prefix": "Prefix of every bucket key (at most 64 printable characters, no "
                        "spaces or braces).",
    "store.timeout": "Bound on every Redis call.",
    "store.on_error": "Redis down or slow: deny (503) or allow (marked x-authz-degraded).",
    "store.max_batch": "Decisions coalesced into one pipelined write at most.",
    "store.redis_mode": "How the Redis nodes are found.",
    "store.redis_nodes": "cluster: more seed nodes; sentinel: the other sentinels "
                         "(host:port each).",
    "store.sentinel_master": "sentinel: the name the sentinels monitor the master under.",
    "store.sentinel_username": "sentinel: the sentinels' own user.",
    "store.sentinel_password": "sentinel: the sentinels' own password (better: env "
                               "AUTHZ_REDIS_SENTINEL_PASSWORD).",
    "store.replica_acks": "cluster, sentinel: replicas that must have a write before its "
                          "decisions are answered.",
    "paths": "Which request paths are protected.",
    "paths.protected_prefixes": "Authenticated and rate-limited prefixes (each ends with "
                                "'/'; the next segment is the model).",
    "paths.public_paths": "Exact paths allowed without a token.",
    "paths.other": "Any other path: deny (403 path_not_covered) or allow.",
    "paths.llm_routes": "Exact OpenAI-compatible routes: protected, the model named by the "
                        "body's model field.",
    "headers": "Headers set on allowed requests.",
    "headers.subject": "The caller's subject, for the model server.",
    "headers.issuer": "The caller's issuer, for the model server.",
    "headers.plan": "The caller's plan, for the model server.",
    "headers.degraded": "Set when allowed under store.on_error: allow.",
    "headers.shadow": "Set on requests shadow mode let through: the would-be reason.",
    "headers.ratelimit_style": "The client's RateLimit fields: triple (RateLimit-Limit/"
                               "-Remaining/-Reset) or structured (draft-08 and later).",
    "telemetry": "Logs and traces (README \"Observability\").",
    "telemetry.subject_attribute": "Span attribute for the subject: none or hashed.",
    "telemetry.subject_salt": "Salt of the subject hash (better: env AUTHZ_SUBJECT_SALT); "
                              "empty: random per process.",
    "telemetry.deny_log_level": "Level of the one-line-per-deny log.",
    "telemetry.deny_log_rate": "Deny log lines per second, at most.",
    "telemetry.log_level": "Log level.",
    "telemetry.log_format": "Log format.",
    "quota_file": "The quota file, relative to the config file (default: the embedded "
                  "default quota).",
    "quota_reload_interval": "How often the quota file is checked for a change (0: on SIGHUP "
                             "only).",
    "internal_error_status": "Answer to an internal failure (never an allow).",
}
