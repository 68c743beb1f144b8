"""Bounds of every number in both files, every problem reported at once, bounded parsing.

Each bound is tested at its edge (accepted) and just past it (refused, naming the key).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from authz.config.service_file import load_settings
from authz.config.yaml_reader import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, parse_yaml
from authz.errors import ConfigError, ConfigErrors
from authz.quota import load_quota, parse_quota
from authz.quota.loader import MAX_COST, MAX_LIMITS_PER_REQUEST, MAX_TIME_TO_FULL, MAX_TOKENS

# Service config: (key path, accepted edge values, refused values)
SERVICE_BOUNDS = [
    ("server.grpc_port", [0, 65535], [-1, 65536, 10**400]),
    ("server.metrics_port", [0, 65535], [-1, 65536]),
    ("server.http_port", [0, 65535], [-1, 65536, 10**400]),
    ("server.workers", [0, 256], [-1, 257]),
    ("server.drain_delay", [0, "300s"], ["301s", "-1s", 1e300]),
    ("server.shutdown_grace", ["1ms", "600s"], [0, "601s", "1us"]),
    ("auth.leeway", [0, "5m"], ["301s", ".inf"]),
    ("auth.max_token_bytes", [256, 65536], [255, 65537]),
    ("auth.token_cache_size", [0, 1_000_000], [-1, 1_000_001]),
    ("auth.jwks_refresh_min_interval", [0, "1d"], ["2d"]),
    ("auth.jwks_refresh_interval", ["1s", "1d"], ["999ms", "25h", 0]),
    ("auth.jwks_timeout", ["1ms", "60s"], ["61s", "1us", 0]),
    ("store.timeout", ["1ms", "10s"], ["11s", "1us", 0, 1e300]),
    ("store.max_batch", [1, 100_000], [0, 100_001]),
    ("quota_reload_interval", [0, "1s", "1d"], ["500ms", "2d", 1e300]),
    ("internal_error_status", [500, 599], [499, 600]),
    ("telemetry.deny_log_rate", [0, 10_000], [-1, 10_001, ".nan"]),
]


def _config(key: str, value: object) -> str:
    parts = key.split(".")
    doc: dict[str, object] = {}
    node = doc
    for p in parts[:-1]:
        node = node.setdefault(p, {})  # type: ignore[assignment]
    node[parts[-1]] = value
    text = yaml.safe_dump(doc)
    # YAML's own spellings for the special floats
    return text.replace("'.inf'", ".inf").replace("'.nan'", ".nan")


@pytest.mark.parametrize(("key", "ok", "bad"), SERVICE_BOUNDS, ids=[b[0] for b in SERVICE_BOUNDS])
def test_service_config_bounds(tmp_path: Path, key: str, ok: list[object],
                               bad: list[object]) -> None:
    f = tmp_path / "config.yaml"
    for value in ok:
        f.write_text(_config(key, value))
        load_settings(f, env={})
    for value in bad:
        f.write_text(_config(key, value))
        with pytest.raises(ConfigError) as e:
            load_settings(f, env={})
        assert f"{f}: {key}: " in str(e.value), (value, str(e.value))


def _quota(limit: str, cost: object = None) -> str:
    rule = f", models: {{m: {{cost: {cost}}}}}" if cost is not None else ""
    return f"default_plan: p\nplans: {{p: {{limits: [{limit}]{rule}}}}}\n"


@pytest.mark.parametrize(("limit", "key"), [
    ("{name: a, rate: 1.0e+13}", "rate"),              # over MAX_TOKENS
    ("{name: a, rate: 1, burst: 1.0e+13}", "burst"),
    ("{name: a, rate: 1, burst: 0.5}", "burst"),
    ("{name: a, rate: 1, per: 1us}", "per"),           # below 1 ms
    ("{name: a, rate: 1, per: 367d}", "per"),
    ("{name: a, rate: 1.0e+308, per: 1us}", "rate"),   # the infinite rate
    ("{name: a, rate: 1, per: 1.0e+300}", "per"),      # the PX overflow
    ("{name: a, rate: 1, per: 366d, burst: 11}", "rate"),  # 11 years to refill
    ("{name: a, rate: 1.0e-300, burst: 1}", "rate"),
    ("{name: a, rate: 1.0e-300}", "burst"),  # burst defaults to the rate
    ("{name: a, rate: 5e-324}", "rate"),
    (f"{{name: a, rate: {10**400}}}", "rate"),
])
def test_quota_limit_bounds(limit: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_quota(yaml.safe_load(_quota(limit)), "q.yaml")
    assert f"q.yaml: plans.p.limits[0].{key}: " in str(e.value)


def test_quota_edges_are_accepted() -> None:
    for limit in (f"{{name: a, rate: {MAX_TOKENS:.0f}, per: 1ms}}",
                  f"{{name: a, rate: 1000, per: 1ms, burst: {MAX_TOKENS:.0f}}}",
                  "{name: a, rate: 1, per: 366d}",
                  f"{{name: a, rate: 1, per: 1s, burst: {MAX_TIME_TO_FULL:.0f}}}",
                  "{name: a, rate: 1, burst: 1}"):
        parse_quota(yaml.safe_load(_quota(limit)), "q.yaml")
    parse_quota(yaml.safe_load(_quota(f"{{name: a, rate: {MAX_COST}}}", MAX_COST)), "q")
    with pytest.raises(ConfigError, match=r"plans\.p\.models\.m\.cost: expected an integer"):
        parse_quota(yaml.safe_load(_quota(f"{{name: a, rate: {MAX_COST + 1}}}", MAX_COST + 1)),
                    "q")


def test_too_many_limits_for_one_request() -> None:
    limits = ", ".join(f"{{name: l{i}, rate: 1}}" for i in range(MAX_LIMITS_PER_REQUEST + 1))
    with pytest.raises(ConfigError, match=r"plans\.p\.limits: 17 limits; at most 16"):
        parse_quota(yaml.safe_load(_quota(limits)), "q")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n", "{}", "---\n"])
def test_empty_quota_file_is_an_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "quota.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="the quota file is empty"):
        load_quota(f)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("server: {grpc_prot: 1, workers: many}\nstore: {timout: 1s, on_eror: deny}\n"
                 "auth: {issuers: [{issuer: a, jwks_uri: 'https://a/jwks'}, {jwks_file: x}]}\n")
    with pytest.raises(ConfigErrors) as e:
        load_settings(f, env={})
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "server.workers", "server.grpc_prot", "auth.issuers[0].jwks_uri",
        "auth.issuers[1].issuer", "store.timout", "store.on_eror"]
    assert all(line.startswith(f"{f}: ") for line in lines)
    assert "auth.issuers[0].jwks_uri: unknown key (did you mean 'jwks_url'?)" in str(e.value)
    assert "store.timout: unknown key (did you mean 'timeout'?)" in str(e.value)
    # the jwks_uri slip is not also reported as a missing key source
    assert "needs exactly one key source" not in str(e.value)
    assert len(e.value.errors) == 6


def test_quota_problems_are_all_reported() -> None:
    text = ("default_plan: gold\nplans:\n  free: {limits: [{name: a, rate: 0}, {name: b, rate: 1,"
            " brust: 2}]}\n  pro: {limits: [{name: a, rate: 1, per: soon}]}\n"
            "overrides: [{issuer: i, subject: s, plan: x}]\n")
    with pytest.raises(ConfigErrors) as e:
        parse_quota(yaml.safe_load(text), "q")
    keys = [err.key for err in e.value.errors]
    assert keys == ["plans.free.limits[0].rate", "plans.free.limits[1].brust",
                    "plans.pro.limits[0].per", "default_plan", "overrides[0].plan"]


def test_unknown_key_without_a_near_match() -> None:
    with pytest.raises(ConfigError, match=r"zzz: unknown key \(check the spelling\)"):
        parse_quota({"default_plan": "blocked", "zzz": 1}, "q")


# ---- parsing bounds -------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "[" * 5000 + "]" * 5000,                                   # flow style, past libyaml's 1000
    "[" * 500 + "]" * 500,
    "a:\n" + "".join("  " * i + "- \n" for i in range(1, 300)),  # block style
    "x: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
])
def test_deep_nesting_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_yaml(text, "deep.yaml")
    assert str(e.value).startswith("deep.yaml: ")
    assert "nest" in str(e.value)


def test_depth_limit_is_far_above_real_files() -> None:
    assert parse_yaml("x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), "f") is not None


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES} YAML nodes"):
        parse_yaml("\n".join(lines), "bomb.yaml")


def test_file_size_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "quota.yaml"
    f.write_text("# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_quota(f)


def test_quota_file_reference_names_the_referring_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_quota(tmp_path / "nope.yaml", referrer=("config.yaml", "quota_file"))
    assert str(e.value).startswith(f"config.yaml: quota_file: cannot read {tmp_path}/nope.yaml")


def test_huge_integers_are_refused_not_raised(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(f"store: {{timeout: {10**400}}}\ntelemetry: {{deny_log_rate: {10**400}}}\n")
    with pytest.raises(ConfigErrors) as e:
        load_settings(f, env={})
    assert [err.key for err in e.value.errors] == ["store.timeout", "telemetry.deny_log_rate"]


# ---- the store's topology ---------------------------------------------------------------

@pytest.mark.parametrize(("store", "expected"), [
    ({"redis_mode": "cluster"}, "store.redis_url: redis_mode cluster needs redis_url"),
    ({"redis_mode": "cluster", "redis_url": "redis://a:6379/2"},
     "store.redis_url: Redis Cluster has only database 0"),
    ({"redis_mode": "cluster", "redis_url": "unix:///r.sock"}, "not a unix socket"),
    ({"redis_mode": "cluster", "redis_url": "redis://a:6379", "sentinel_master": "m"},
     "store.sentinel_master: only for redis_mode sentinel"),
    ({"redis_mode": "sentinel", "redis_url": "redis://s1:26379"},
     "store.sentinel_master: is required with redis_mode sentinel"),
    ({"redis_url": "redis://a:6379", "redis_nodes": ["b:6379"]},
     "store.redis_nodes: only for redis_mode sentinel or cluster"),
    ({"redis_url": "redis://a:6379", "replica_acks": 1},
     "store.replica_acks: only for redis_mode sentinel or cluster"),
    ({"redis_mode": "cluster", "redis_url": "redis://a:6379", "redis_nodes": ["b"]},
     "store.redis_nodes: expected host:port, got 'b'"),
    ({"redis_mode": "cluster", "redis_url": "redis://a:6379", "replica_acks": 6},
     "store.replica_acks: expected an integer between 0 and 5"),
    ({"redis_mode": "proxy"}, "store.redis_mode: expected one of standalone, sentinel, cluster"),
])
def test_store_topology_errors(tmp_path: Path, store: dict[str, object], expected: str) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump({"store": store}))
    with pytest.raises(ConfigError) as e:
        load_settings(f, env={})
    assert expected in str(e.value)


def test_store_topologies_accepted(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump({"store": {
        "redis_mode": "sentinel", "redis_url": "rediss://app:pw@s1:26379/3",
        "redis_nodes": ["s2:26379", "[::1]:26379"], "sentinel_master": "mymaster",
        "sentinel_password": "from-file", "replica_acks": 1}}))
    s = load_settings(f, env={"AUTHZ_REDIS_SENTINEL_PASSWORD": "from-env"}).store
    assert (s.redis_mode, s.sentinel_master, s.sentinel_password) == (
        "sentinel", "mymaster", "from-env")
    assert s.redis_nodes == ("s2:26379", "[::1]:26379")
    f.write_text(yaml.safe_dump({"store": {"redis_mode": "cluster",
                                           "redis_url": "redis://cfg.example:6379"}}))
    assert load_settings(f, env={}).store.redis_mode == "cluster"
    # the environment's URL is checked against the mode too
    with pytest.raises(ConfigError, match="Redis Cluster has only database 0"):
        load_settings(f, env={"AUTHZ_REDIS_URL": "redis://cfg.example:6379/1"})
