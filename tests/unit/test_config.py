"""The config loader: defaults, every key read, errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.config.service_file import DEV_ISSUER, load_settings, parse_settings
from authz.config.settings import Settings
from authz.errors import ConfigError


def parse(text: str, tmp_path: Path) -> Settings:
    f = tmp_path / "config.yaml"
    f.write_text(text)
    return load_settings(f, env={})


def error(text: str, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text, tmp_path)
    return str(e.value)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert parse("", tmp_path) == Settings()


def test_no_file_gives_defaults() -> None:
    s = load_settings(None, env={})
    assert s.server.grpc_port == 9000
    assert s.server.http_port == 0 and s.server.http_path_prefix == ""  # HTTP edge off
    assert s.auth.audience == "ml-inference-api"
    assert s.store.redis_url == ""


def test_full_config(tmp_path: Path) -> None:
    s = parse(
        """
server: {grpc_port: 9100, metrics_port: 0, workers: 2, drain_delay: 500ms, shutdown_grace: 10s}
auth:
  audience: my-api
  leeway: 2s
  issuers:
    - issuer: https://idp.example.com
      jwks_url: https://idp.example.com/jwks.json
      algorithms: [RS256, ES256]
    - issuer: https://other.example.com
      jwks_file: keys/jwks.json
store: {redis_url: "redis://localhost:6380/1", timeout: 20ms, on_error: allow, key_prefix: "rl:"}
paths: {protected_prefixes: [/v1/models/], public_paths: [/healthz], other: allow}
headers: {subject: X-User}
quota_file: quota.yaml
""",
        tmp_path,
    )
    assert s.server.grpc_port == 9100 and s.server.workers == 2
    assert s.server.drain_delay == pytest.approx(0.5)
    assert s.auth.leeway == 2.0 and s.auth.audience == "my-api"
    assert s.auth.issuers[0].algorithms == ("RS256", "ES256")
    assert s.auth.issuers[1].jwks_file == str(tmp_path / "keys/jwks.json")
    assert s.store.timeout == pytest.approx(0.02) and s.store.on_error == "allow"
    assert s.paths.other == "allow"
    assert s.headers.subject == "x-user"
    assert s.quota_file == str(tmp_path / "quota.yaml")


def test_env_overrides_redis_url(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("store: {redis_url: 'redis://a:6379'}")
    s = load_settings(f, env={"AUTHZ_REDIS_URL": "redis://b:6379/2"})
    assert s.store.redis_url == "redis://b:6379/2"



ONE_ISSUER = ("auth: {issuers: [{issuer: 'https://file.example', jwks_file: keys.json, "
              "algorithms: [RS256]}]}")


def test_env_overrides_the_one_issuer(tmp_path: Path) -> None:
    """AUTHZ_ISSUER / AUTHZ_JWKS_URL (deploy/: set once in an overlay's values.yaml) replace
    the issuer and its key source; everything else about the issuer stays."""
    f = tmp_path / "c.yaml"
    f.write_text(ONE_ISSUER)
    env = {"AUTHZ_ISSUER": "https://idp.example/realms/ml",
           "AUTHZ_JWKS_URL": "https://idp.example/realms/ml/certs"}
    [issuer] = load_settings(f, env=env).auth.issuers
    assert issuer.issuer == "https://idp.example/realms/ml"
    assert issuer.jwks_url == "https://idp.example/realms/ml/certs"
    assert issuer.jwks_file is None and issuer.pem_file is None
    assert issuer.algorithms == ("RS256",)
    [only_issuer] = load_settings(f, env={"AUTHZ_ISSUER": "https://b.example"}).auth.issuers
    assert only_issuer.issuer == "https://b.example"
    assert only_issuer.jwks_file == str(tmp_path / "keys.json")
    [unchanged] = load_settings(f, env={}).auth.issuers
    assert unchanged.issuer == "https://file.example"


@pytest.mark.parametrize(("config", "env", "expected"), [
    ("auth: {issuers: []}", {"AUTHZ_ISSUER": "https://a.example"},
     "AUTHZ_ISSUER: auth.issuers: overrides the config's only issuer, but the config lists 0"),
    ("auth: {issuers: [{issuer: a, jwks_file: k}, {issuer: b, jwks_file: k}]}",
     {"AUTHZ_JWKS_URL": "https://a.example/k"},
     "AUTHZ_JWKS_URL: auth.issuers: overrides the config's only issuer, but the config lists 2"),
    (ONE_ISSUER, {"AUTHZ_ISSUER": ""}, "AUTHZ_ISSUER: auth.issuers[0].issuer: expected the"),
    (ONE_ISSUER, {"AUTHZ_ISSUER": " https://a.example"}, "auth.issuers[0].issuer: expected"),
    (ONE_ISSUER, {"AUTHZ_ISSUER": DEV_ISSUER}, "'urn:authz:dev' is reserved"),
    (ONE_ISSUER, {"AUTHZ_JWKS_URL": "idp.example/certs"},
     "AUTHZ_JWKS_URL: auth.issuers[0].jwks_url: expected an https:// URL"),
    (ONE_ISSUER, {"AUTHZ_JWKS_URL": ""}, "AUTHZ_JWKS_URL: auth.issuers[0].jwks_url: expected"),
])
def test_issuer_overrides_are_checked(tmp_path: Path, config: str, env: dict[str, str],
                                      expected: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(config)
    with pytest.raises(ConfigError) as e:
        load_settings(f, env=env)
    assert expected in str(e.value)

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: {grpc_port: http}", "server.grpc_port: expected an integer"),
        ("server: {grpc_port: 70000}", "server.grpc_port: expected an integer between 0 and 65535"),
        ("server: {grpc_prot: 9000}", "server.grpc_prot: unknown key"),
        ("store: {timeout: fast}", "store.timeout: expected a duration"),
        ("store: {on_error: maybe}", "store.on_error: expected one of deny, allow"),
        ("store: {redis_url: 'http://x'}", "store.redis_url: invalid Redis URL"),
        ("store: {key_prefix: 'a{b}'}", "store.key_prefix: must not contain"),
        ("auth: {issuers: [{issuer: x}]}", "auth.issuers[0]: needs exactly one key source"),
        ("auth: {issuers: [{issuer: x, jwks_url: 'ftp://a'}]}", "auth.issuers[0].jwks_url"),
        ("auth: {issuers: [{issuer: x, jwks_file: a, algorithms: [none]}]}",
         "auth.issuers[0].algorithms: unsupported algorithm 'none'"),
        (f"auth: {{issuers: [{{issuer: '{DEV_ISSUER}', jwks_file: a}}]}}",
         "auth.issuers[0].issuer: 'urn:authz:dev' is reserved"),
        ("auth: {leeway: 1h}", "auth.leeway: more than 5 minutes"),
        ("paths: {protected_prefixes: [/v1/models]}", "must end with '/'"),
        ("paths: {public_paths: [/v1/models/x]}", "lies under protected prefix"),
        ("headers: {subject: 'bad header'}", "headers.subject: 'bad header' is not a valid"),
        ("headers: {plan: x-envoy-plan}", "headers.plan: 'x-envoy-plan' is reserved"),
        ("server: [1, 2]", "server: expected a mapping, got a list"),
        ("- a\n- b", "expected a mapping at the top level"),
        ("server: {grpc_port: 1\n", "invalid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error(text, tmp_path)
    assert message.startswith(str(tmp_path / "config.yaml"))
    assert expected in message


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "missing.yaml", env={})
    assert "missing.yaml: cannot read file" in str(e.value)


def test_parse_without_file() -> None:
    assert parse_settings(None, "x").server.grpc_port == 9000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auth: {leeway: .nan}", "auth.leeway: expected a duration"),
        ("auth: {leeway: .inf}", "auth.leeway: expected a duration"),
        ("store: {timeout: .inf}", "store.timeout: expected a duration"),
        ("store: {timeout: .nan}", "store.timeout: expected a duration"),
        ("store: {timeout: 1m}", "store.timeout: at most 10s"),
        ("telemetry: {deny_log_rate: .nan}", "telemetry.deny_log_rate: expected a finite"),
        ("auth: {audience: 'a\"b'}", "auth.audience: expected visible ASCII"),
        ("auth: {audience: 'a b'}", "auth.audience: expected visible ASCII"),
    ],
)
def test_non_finite_and_unsafe_values_are_refused(tmp_path: Path, text: str,
                                                  expected: str) -> None:
    assert expected in error(text, tmp_path)


def test_subject_salt_from_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("telemetry: {subject_salt: from-file}")
    assert load_settings(f, env={}).telemetry.subject_salt == "from-file"
    assert load_settings(f, env={"AUTHZ_SUBJECT_SALT": "s3cret"}).telemetry.subject_salt == "s3cret"


def test_http_edge_keys(tmp_path: Path) -> None:
    s = parse("server: {http_port: 8000, http_path_prefix: /check}", tmp_path)
    assert s.server.http_port == 8000 and s.server.http_path_prefix == "/check"
    assert parse("server: {http_path_prefix: /a/b-c_d.e~}", tmp_path).server.http_path_prefix \
        == "/a/b-c_d.e~"


@pytest.mark.parametrize(("server", "message"), [
    ("{http_port: 9000}", "server.http_port: must differ from grpc_port"),
    ("{http_port: 9464}", "server.http_port: must differ from metrics_port"),
    ("{http_path_prefix: check}", "server.http_path_prefix: expected a path starting with '/'"),
    ("{http_path_prefix: '/check?x=1'}", "server.http_path_prefix: expected at most 256"),
    ("{http_path_prefix: '/a%2Fb'}", "server.http_path_prefix: expected at most 256"),
    ("{http_path_prefix: '/a b'}", "server.http_path_prefix: expected at most 256"),
    ("{http_path_prefix: '/x#y'}", "server.http_path_prefix: expected at most 256"),
    ("{http_path_prefix: '/" + "a" * 256 + "'}", "server.http_path_prefix: expected at most 256"),
    ("{http_path_prefix: 7}", "server.http_path_prefix: expected a string"),
])
def test_http_edge_keys_refused(tmp_path: Path, server: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(f"server: {server}", tmp_path)
    assert message in str(e.value), str(e.value)


def test_command_line_ports_are_checked_too(tmp_path: Path) -> None:
    from authz.service_config import load_service_config

    f = tmp_path / "c.yaml"
    f.write_text("auth: {issuers: [{issuer: 'https://i', jwks_url: 'https://i/k'}]}\n")
    with pytest.raises(ConfigError) as e:
        load_service_config(f, env={}, server={"http_port": 9000})
    assert "server.http_port: must differ from grpc_port" in str(e.value)
