"""The JSON Schemas in schemas/ are the loaders' own: regenerated they are the committed files,
every shipped file validates, and schema and loader agree on documents built from the schema
and on mutations of them (wrong types, numbers out of bounds, unknown keys, bad choices).

Where they cannot agree, the schema is the looser one: rules across keys and checks of free
text stay in the loaders (`ONE_WAY`). For those the schema accepts what the loader refuses,
never the other way round, and each such rule has a document that shows it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.config.schema import (
    CONFIG_FILE,
    QUOTA_FILE,
    SchemaDefinitionError,
    SchemaRecorder,
    build,
    config_schema,
    dumps,
)
from authz.config.service_file import parse_settings
from authz.config.settings import Settings
from authz.config.yaml_reader import Node
from authz.errors import ConfigError
from authz.quota.loader import parse_quota
from authz.quota.schema import quota_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
CONFIG_FILES = ["deploy/base/config/config.yaml", "deploy/overlays/production/config.yaml"]
QUOTA_FILES = ["deploy/base/config/quota.yaml", "deploy/overlays/production/quota.yaml",
               "authz/quota/default.yaml", "authz/demo/quota.yaml"]

CONFIG = config_schema()
QUOTA = quota_schema()
KINDS: dict[str, tuple[dict[str, Any], Callable[[Any], object]]] = {
    "config": (CONFIG, lambda doc: parse_settings(doc, "config.yaml")),
    "quota": (QUOTA, lambda doc: parse_quota(doc, "quota.yaml")),
}


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


# --- the committed files -------------------------------------------------------------------

@pytest.mark.parametrize(("name", "schema"), [(CONFIG_FILE, CONFIG), (QUOTA_FILE, QUOTA)])
def test_committed_schema_is_what_the_loader_generates(name: str, schema: dict[str, Any]) -> None:
    committed = (SCHEMAS / name).read_text(encoding="utf-8")
    assert committed == dumps(schema), f"schemas/{name} is stale: run `authz schema --write`"


@pytest.mark.parametrize("schema", [CONFIG, QUOTA], ids=["config", "quota"])
def test_schema_is_draft_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_cli_writes_the_committed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from authz.cli import main

    assert main(["schema", "--write", str(tmp_path)]) == 0
    for name in (CONFIG_FILE, QUOTA_FILE):
        assert (tmp_path / name).read_text() == (SCHEMAS / name).read_text()
    capsys.readouterr()
    assert main(["schema", "quota"]) == 0
    assert json.loads(capsys.readouterr().out) == QUOTA


@pytest.mark.parametrize("file", CONFIG_FILES + QUOTA_FILES)
def test_shipped_file_names_its_schema_and_validates(file: str) -> None:
    path = ROOT / file
    first = path.read_text().splitlines()[0]
    kind = "config" if file in CONFIG_FILES else "quota"
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m, f"{file}: the first line is not a yaml-language-server modeline: {first!r}"
    target = (path.parent / m.group(1)).resolve()
    assert target == SCHEMAS / (CONFIG_FILE if kind == "config" else QUOTA_FILE)
    doc = yaml.safe_load(path.read_text())
    errors = [e.message for e in _validator(KINDS[kind][0]).iter_errors(doc)]
    assert not errors, (file, errors)
    KINDS[kind][1](doc)  # and the loader, which ignores the modeline, still reads it


# --- what the recorder records ---------------------------------------------------------------

def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v["default"] for k, v in schema["properties"].items() if "default" in v}


def test_schema_defaults_are_the_loaders_defaults() -> None:
    """A file spelling out every default the schema states reads as the built-in Settings."""
    doc = {name: _defaults(section) for name, section in CONFIG["properties"].items()
           if "properties" in section}
    doc.update(_defaults(CONFIG))
    assert _validator(CONFIG).is_valid(doc)
    assert parse_settings(doc, "defaults.yaml") == Settings()
    assert doc["store"]["timeout"] == "50ms" and doc["auth"]["audience"] == "ml-inference-api"


def test_a_bound_in_the_loader_is_a_bound_in_the_schema() -> None:
    server = CONFIG["properties"]["server"]["properties"]
    assert (server["grpc_port"]["minimum"], server["grpc_port"]["maximum"]) == (0, 65535)
    limit = QUOTA["properties"]["plans"]["additionalProperties"]["properties"]["limits"]
    assert limit["items"]["required"] == ["name", "rate"]
    assert limit["items"]["additionalProperties"] is False
    auth = CONFIG["properties"]["auth"]["properties"]
    assert "HS256" not in auth["issuers"]["items"]["properties"]["algorithms"]["items"]["enum"]


def test_a_key_without_a_description_fails_generation() -> None:
    def read(root: Node) -> None:
        root.integer("answer", 42, maximum=100)
        root.done()

    assert build(read, title="t", description="d", docs={"answer": "The answer."})[
        "properties"]["answer"]["maximum"] == 100
    with pytest.raises(SchemaDefinitionError, match="answer: no description"):
        build(read, title="t", description="d", docs={})
    with pytest.raises(SchemaDefinitionError, match="no loader reads"):
        build(read, title="t", description="d", docs={"answer": "a", "question": "q"})


def test_a_raw_read_cannot_be_recorded() -> None:
    with pytest.raises(SchemaDefinitionError, match="x: read as raw data"):
        SchemaRecorder("").raw("x")


# --- what the schema cannot say (schema accepts, loader refuses) -------------------------------

@dataclass(frozen=True)
class OneWay:
    """A loader rule the schema cannot carry: errors at `key` (a regex over the error's key)
    whose problem matches `problem`; `value`, when given, must hold for the offending value."""

    name: str
    kind: str
    key: str
    problem: str
    example: Any
    value: Callable[[Any], bool] | None = None

    def explains(self, error: ConfigError, doc: Any) -> bool:
        if not (re.search(self.key, error.key) and re.search(self.problem, error.problem)):
            return False
        return self.value is None or self.value(value_at(doc, error.key))


def _whole_float(v: Any) -> bool:
    return isinstance(v, float) and v.is_integer()


_I = {"issuer": "https://idp", "jwks_url": "https://idp/jwks"}
_P = {"limits": [{"name": "a", "rate": 1}]}

ONE_WAY = [
    # Both kinds. JSON Schema's integer is any number without a fraction; YAML's 5.0 is a float
    # and the loader wants an int.
    OneWay("integer written as 5.0", "config", r"", r"expected an integer",
           {"server": {"workers": 2.0}}, _whole_float),
    OneWay("integer written as 5.0", "quota", r"", r"expected an integer",
           {"plans": {"p": {**_P, "models": {"m": {"cost": 1.0}}}}, "default_plan": "p"},
           _whole_float),
    # A duration's bounds hold for its number of seconds; a string's value is not a schema's.
    OneWay("duration string out of bounds", "config", r"",
           r"duration|at most 10s|more than 5 minutes",
           {"store": {"timeout": "1h"}}, lambda v: isinstance(v, str)),
    OneWay("duration string out of bounds", "quota", r"", r"duration",
           {"plans": {"p": {"limits": [{"name": "a", "rate": 1, "per": "400d"}]}},
            "default_plan": "p"}, lambda v: isinstance(v, str)),
    # Service config: across keys.
    OneWay("ports differ", "config", r"^server\.", r"must differ from",
           {"server": {"grpc_port": 9000, "metrics_port": 9000}}),
    OneWay("one key source per issuer", "config", r"^auth\.issuers\[\d+\]$",
           r"exactly one key source", {"auth": {"issuers": [{"issuer": "x"}]}}),
    OneWay("issuers distinct", "config", r"^auth\.issuers\[\d+\]\.issuer$", r"listed twice",
           {"auth": {"issuers": [_I, _I]}}),
    OneWay("redis_mode's requirements", "config", r"^store\.",
           r"only for redis_mode|needs redis_url|needs a redis://|only database 0|"
           r"is required with redis_mode", {"store": {"redis_mode": "sentinel"}}),
    OneWay("paths under protected prefixes", "config", r"^paths\.",
           r"lies under protected prefix|is also a public path",
           {"paths": {"llm_routes": ["/v1/models/x"]}}),
    OneWay("header names distinct", "config", r"^headers$", r"must be distinct",
           {"headers": {"plan": "x-a", "subject": "x-a"}}),
    # Service config: free text the loader parses.
    OneWay("http_path_prefix is a URL path", "config", r"^server\.http_path_prefix$",
           r"expected a path starting|characters of a URL path",
           {"server": {"http_path_prefix": "check"}}),
    OneWay("dev issuer reserved", "config", r"^auth\.issuers\[\d+\]\.issuer$",
           r"reserved for the development signer",
           {"auth": {"issuers": [{"issuer": "urn:authz:dev", "jwks_url": "https://x"}]}}),
    OneWay("jwks_url is https", "config", r"^auth\.issuers\[\d+\]\.jwks_url$",
           r"expected an https:// URL",
           {"auth": {"issuers": [{"issuer": "x", "jwks_url": "ftp://x"}]}}),
    OneWay("audience is a plain token", "config", r"^auth\.audience$", r"visible ASCII",
           {"auth": {"audience": "a b"}}),
    OneWay("Redis URL", "config", r"^store\.redis_url$", r"invalid Redis URL",
           {"store": {"redis_url": "http://x"}}),
    OneWay("Redis endpoints", "config", r"^store\.redis_nodes$", r"host:port",
           {"store": {"redis_mode": "cluster", "redis_url": "redis://a:1",
                      "redis_nodes": ["nope"]}}),
    OneWay("key_prefix characters", "config", r"^store\.key_prefix$",
           r"must not contain|printable characters", {"store": {"key_prefix": "a{b}"}}),
    OneWay("paths are absolute", "config", r"^paths\.",
           r"expected absolute paths|must end with '/'", {"paths": {"public_paths": ["x"]}}),
    OneWay("header names", "config", r"^headers\.", r"not a valid HTTP header|is reserved",
           {"headers": {"plan": "x plan"}}),
    # Quota file: across keys.
    OneWay("default_plan names a plan", "quota", r"^default_plan$",
           r"is required|is not defined", {"plans": {"p": _P}}),
    OneWay("overrides name a plan, once", "quota", r"^overrides\[\d+\]\.",
           r"is not defined|overridden twice",
           {"overrides": [{"issuer": "i", "subject": "s", "plan": "nope"}]}),
    OneWay("a plan has limits", "quota", r"^plans\..*limits$",
           r"at least one limit|no limit applies",
           {"plans": {"p": {}}, "default_plan": "p"}),
    OneWay("limit names unique, one scope, at most 16", "quota", r"^plans\..*limits$",
           r"used twice|one scope claim|at most 16",
           {"plans": {"p": {"limits": [{"name": "a", "rate": 1}, {"name": "a", "rate": 2}]}},
            "default_plan": "p"}),
    OneWay("a bucket refills, holds a request, within 10 years", "quota",
           r"^plans\..*limits\[\d+\]\.(rate|per|burst)$",
           r"to refill|rounds to no refill|a bucket holds one request",
           {"plans": {"p": {"limits": [{"name": "a", "rate": 1e-9}]}}, "default_plan": "p"}),
    OneWay("cost <= burst", "quota", r"^plans\..*\.cost$", r"exceeds the burst",
           {"plans": {"p": {**_P, "models": {"m": {"cost": 2}}}}, "default_plan": "p"}),
    OneWay("default_max_tokens <= max_tokens", "quota", r"\.cost\.default_max_tokens$",
           r"is above max_tokens",
           {"plans": {"p": {**_P, "models": {"m": {"cost": {"from": "tokens", "max_tokens": 9,
                                                            "default_max_tokens": 10}}}}},
            "default_plan": "p"}),
]


def value_at(doc: Any, key: str) -> Any:
    """The value an error's key names ("plans.a.b.limits[0].per"; names may hold dots)."""
    node = doc
    rest = key
    while rest:
        if isinstance(node, list):
            m = re.match(r"\[(\d+)\]\.?", rest)
            if not m or int(m.group(1)) >= len(node):
                return None
            node, rest = node[int(m.group(1))], rest[m.end():]
        elif isinstance(node, dict):
            names = [k for k in node if isinstance(k, str) and (
                rest == k or rest.startswith((k + ".", k + "[")))]
            if not names:
                return None
            name = max(names, key=len)
            node, rest = node[name], rest[len(name):].removeprefix(".")
        else:
            return None
    return node


@pytest.mark.parametrize("rule", ONE_WAY, ids=[f"{r.kind}: {r.name}" for r in ONE_WAY])
def test_one_way_rule_is_real(rule: OneWay) -> None:
    """Each listed difference exists: its example passes the schema, and the loader refuses
    it for that rule alone."""
    schema, load = KINDS[rule.kind]
    assert _validator(schema).is_valid(rule.example), list(
        _validator(schema).iter_errors(rule.example))
    with pytest.raises(ConfigError) as refused:
        load(rule.example)
    for error in refused.value.errors:
        assert rule.explains(error, rule.example), (rule.name, str(error))


# --- generated documents ---------------------------------------------------------------------

def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    patterns = [schema["pattern"], *(s["pattern"] for s in schema.get("allOf", []))] \
        if "pattern" in schema else []
    if not patterns:
        text = st.text(max_size=12)
    elif patterns[0] == r"\S":
        text = st.text(max_size=12).filter(lambda t: t.strip())
    else:
        text = st.from_regex(patterns[0], fullmatch=True).filter(lambda t: len(t) <= 64)
    if "minLength" in schema:
        text = text.filter(lambda t: len(t) >= schema["minLength"])
    return text


def _number(schema: dict[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum")
    if integer:
        return st.integers(low, high)
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False,
                       exclude_min="exclusiveMinimum" in schema)
    ints = st.integers(math.ceil(low) if low is not None else None,
                       math.floor(high) if high is not None else None)
    if "exclusiveMinimum" in schema:
        ints = ints.filter(lambda i: i > schema["exclusiveMinimum"])
    return floats | ints


def _object(schema: dict[str, Any], mutate: bool) -> st.SearchStrategy[dict[str, Any]]:
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required or draw(st.booleans()):
                out[name] = draw(value(sub, mutate))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):  # a mapping of names: plans, models
            names = _string(schema["propertyNames"]).filter(
                lambda n: n not in schema["propertyNames"].get("not", {}).get("enum", ()))
            for name in draw(st.lists(names, max_size=2, unique=True)):
                out[name] = draw(value(extra, mutate))
            if schema.get("minProperties", 0) > len(out):
                out[draw(names)] = draw(value(extra, mutate))
        elif schema.get("minProperties", 0) > len(out):  # the quota file: not empty
            name = draw(st.sampled_from(sorted(props)))
            out[name] = draw(value(props[name], mutate))
        return out

    return build()


def _mutation(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value wrong for `schema` in one way, or merely unusual."""
    out: list[st.SearchStrategy[Any]] = [
        st.sampled_from([True, "x", 3, 1.5, [], {}, None, -1, 2.0, "1s", ["a"]])]
    for kind in _types(schema):
        if kind in ("integer", "number"):
            for bound in ("minimum", "maximum", "exclusiveMinimum"):
                if bound in schema:
                    b = schema[bound]
                    out.append(st.sampled_from([b, b - 1, b + 1, b * 1.5, b - 0.5, b + 0.5]))
        if "enum" in schema:
            out.append(st.sampled_from([e.upper() for e in schema["enum"] if e] + ["bogus"]))
        if kind == "object":
            known = list(schema.get("properties", ()))
            typos = [k[:-1] for k in known if len(k) > 2] + ["bogus_key"]
            out.append(st.builds(lambda base, typo: {**base, typo: 1},
                                 _object(schema, False), st.sampled_from(typos)))
    return st.one_of(out)


def value(schema: dict[str, Any], mutate: bool) -> st.SearchStrategy[Any]:
    """Documents from the schema; with `mutate`, some values replaced by mutations."""
    choices: list[st.SearchStrategy[Any]] = []
    for alternative in schema.get("anyOf", []) + schema.get("oneOf", []):
        choices.append(value(alternative, mutate))
    if "const" in schema:
        choices.append(st.just(schema["const"]))
    for kind in _types(schema):
        if kind == "null":
            choices.append(st.none())
        elif "enum" in schema:
            choices.append(st.sampled_from([e for e in schema["enum"] if e is not None]))
        elif kind == "boolean":
            choices.append(st.booleans())
        elif kind in ("integer", "number"):
            choices.append(_number(schema, kind == "integer"))
        elif kind == "string":
            choices.append(_string(schema))
        elif kind == "array":
            choices.append(st.lists(value(schema["items"], mutate), max_size=3))
        elif kind == "object" and "oneOf" not in schema:
            choices.append(_object(schema, mutate))
    if "default" in schema:
        choices.append(st.just(schema["default"]))
    strategy = st.one_of(choices)
    if mutate:
        strategy = st.one_of(strategy, strategy, strategy, _mutation(schema))
    return strategy


def _errors(load: Callable[[Any], object], doc: Any) -> list[ConfigError]:
    try:
        load(doc)
    except ConfigError as e:
        return list(e.errors)
    return []


def _check_agreement(kind: str, doc: Any) -> bool:
    schema, load = KINDS[kind]
    schema_errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                     for e in _validator(schema).iter_errors(doc)]
    loader_errors = _errors(load, doc)
    if not loader_errors:
        assert not schema_errors, ("the loader accepts what the schema refuses", doc,
                                   schema_errors)
    elif not schema_errors:
        rules = [r for r in ONE_WAY if r.kind == kind]
        unexplained = [str(e) for e in loader_errors
                       if not any(r.explains(e, doc) for r in rules)]
        assert not unexplained, ("the schema accepts what the loader refuses, for a reason "
                                 "not in ONE_WAY", doc, unexplained)
    return not schema_errors


_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", ["config", "quota"])
@_SETTINGS
@given(data=st.data())
def test_documents_from_the_schema_validate_and_load_alike(kind: str, data: st.DataObject) -> None:
    """Built from the schema's fields only: the schema accepts them all, and the loader too,
    but for the ONE_WAY rules."""
    doc = data.draw(value(KINDS[kind][0], mutate=False))
    assert _check_agreement(kind, doc), doc


@pytest.mark.parametrize("kind", ["config", "quota"])
@_SETTINGS
@given(data=st.data())
def test_mutated_documents_are_refused_alike(kind: str, data: st.DataObject) -> None:
    """Wrong types, out-of-bound numbers, unknown keys and bad choices anywhere: the loader
    accepts exactly what the schema accepts, but for the ONE_WAY rules (schema only)."""
    doc = data.draw(value(KINDS[kind][0], mutate=True))
    _check_agreement(kind, doc)


def _walk(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for v in schema.values():
            yield from _walk(v)
    elif isinstance(schema, list):
        for v in schema:
            yield from _walk(v)


def test_every_closed_object_is_closed_in_the_schema() -> None:
    """The loaders refuse unknown keys everywhere (done() on every mapping): so does the
    schema, in every object it describes."""
    for schema in (CONFIG, QUOTA):
        for sub in _walk(schema):
            if "properties" in sub:
                assert sub.get("additionalProperties") is False, sorted(sub["properties"])
