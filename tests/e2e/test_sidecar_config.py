"""The generated sidecar config: Istio's shape, Envoy accepts it, the example is current."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.mesh import sidecar
from authz.mesh.sidecar import RequestBody, SidecarConfigError, SidecarSpec, render, to_yaml

pytestmark = pytest.mark.envoy

EXAMPLE = Path(sidecar.__file__).parent / "examples" / "envoy-sidecar.yaml"
EXAMPLE_HTTP = Path(sidecar.__file__).parent / "examples" / "envoy-sidecar-http.yaml"
# The shipped envoyExtAuthzHttp registration (deploy/istio/), as the generator renders it.
HTTP_SPEC = SidecarSpec(protocol="http", service_port=8000, endpoints=(("127.0.0.1", 8000),),
                        path_prefix="/check")


def _filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            found: dict[str, Any] = cluster
            return found
    raise AssertionError(f"no cluster {name}: {config['static_resources']['clusters']}")


def test_filter_chain_is_rbac_shadow_then_ext_authz_then_router() -> None:
    names = [f["name"] for f in _filters(render(SidecarSpec()))]
    assert names == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]


def test_rbac_holds_the_custom_rules_as_shadow_rules_only() -> None:
    rbac = _filters(render(SidecarSpec(policy_name="p", policy_namespace="ns")))[0]["typed_config"]
    assert "rules" not in rbac, "CUSTOM rules must never enforce by themselves"
    assert rbac["shadow_rules_stat_prefix"] == "istio_ext_authz_"
    shadow = rbac["shadow_rules"]
    assert shadow["action"] == "DENY"
    (policy_id,) = shadow["policies"]
    assert policy_id == "istio-ext-authz-rate-limiter-ns[ns]-policy[p]-rule[0]"
    paths = shadow["policies"][policy_id]["permissions"][0]["and_rules"]["rules"][0]["or_rules"]
    assert [p["url_path"]["path"] for p in paths["rules"]] == [
        {"prefix": "/v1/models/"},
        {"prefix": "/v2/models/"},
    ]


def test_ext_authz_is_gated_on_the_shadow_policy_and_speaks_v3() -> None:
    spec = SidecarSpec(timeout=0.25, status_on_error=503)
    ext = _filters(render(spec))[1]["typed_config"]
    assert ext["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
    assert ext["transport_api_version"] == "V3"
    assert ext["filter_enabled_metadata"] == {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}},
    }
    grpc = ext["grpc_service"]
    assert grpc["timeout"] == "0.250s"
    assert grpc["envoy_grpc"] == {
        "cluster_name": "outbound|9000||rate-limiter.authz.svc.cluster.local",
        "authority": "rate-limiter.authz.svc.cluster.local",
    }
    assert ext["status_on_error"] == {"code": "ServiceUnavailable"}
    assert not ext.get("failure_mode_allow", False)
    # Istio never sets these for a gRPC provider: the service must cope without them.
    for absent in ("allowed_headers", "encode_raw_headers", "with_request_body"):
        assert absent not in ext


def test_fail_open_and_istio_default_status() -> None:
    ext = _filters(render(SidecarSpec(fail_open=True, status_on_error=None)))[1]["typed_config"]
    assert ext["failure_mode_allow"] is True
    assert "status_on_error" not in ext  # Envoy's default: 403


def test_provider_cluster_is_http2_with_every_replica() -> None:
    spec = SidecarSpec(service_port=9000, endpoints=(("127.0.0.1", 9101), ("127.0.0.1", 9102)))
    cluster = _cluster(render(spec), "outbound|9000||rate-limiter.authz.svc.cluster.local")
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [9101, 9102]


@pytest.mark.parametrize(
    ("mode", "normalize", "merge", "escaped"),
    [
        ("BASE", True, False, "KEEP_UNCHANGED"),  # Istio's default
        ("NONE", False, False, "KEEP_UNCHANGED"),
        ("MERGE_SLASHES", True, True, "KEEP_UNCHANGED"),
        ("DECODE_AND_MERGE_SLASHES", True, True, "UNESCAPE_AND_FORWARD"),
    ],
)
def test_path_normalization_is_the_sidecars(
    mode: str, normalize: bool, merge: bool, escaped: str
) -> None:
    hcm = _hcm(render(SidecarSpec(path_normalization=mode)))
    assert hcm.get("normalize_path", False) is normalize
    assert hcm.get("merge_slashes", False) is merge
    assert hcm["path_with_escaped_slashes_action"] == escaped


@pytest.mark.parametrize(
    ("path", "matcher"),
    [
        ("/v1/models/*", {"prefix": "/v1/models/"}),
        ("/v1/models/x:predict", {"exact": "/v1/models/x:predict"}),
        ("*:predict", {"suffix": ":predict"}),
        ("*", {"prefix": "/"}),
    ],
)
def test_istio_path_forms(path: str, matcher: dict[str, str]) -> None:
    permission = sidecar.path_permission(path).to_dict(casing=sidecar.betterproto2.Casing.SNAKE)
    assert permission == {"url_path": {"path": matcher}}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"paths": ("/v1/{*}/infer",)}, "only exact"),
        ({"paths": ("v1/models/*",)}, "must start with"),
        ({"paths": ()}, "at least one"),
        ({"status_on_error": 299}, "not an Envoy StatusCode"),
        ({"timeout": 0}, "timeout"),
        ({"provider": "Rate_Limiter"}, "DNS label"),
        ({"endpoints": ()}, "at least one"),
        ({"app_port": 70000}, "app_port"),
        ({"lb_policy": "FASTEST"}, "lb policy"),
        ({"path_normalization": "MERGE"}, "path_normalization"),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SidecarConfigError, match=message):
        render(SidecarSpec(**options))


def test_committed_example_is_current() -> None:
    # Regenerate with: python -m authz.mesh.sidecar --out authz/mesh/examples/envoy-sidecar.yaml
    assert EXAMPLE.read_text() == to_yaml(SidecarSpec()), "example is stale: regenerate it"
    # python -m authz.mesh.sidecar --protocol http --service-port 8000 --path-prefix /check \
    #     --out authz/mesh/examples/envoy-sidecar-http.yaml
    assert EXAMPLE_HTTP.read_text() == to_yaml(HTTP_SPEC), "HTTP example is stale: regenerate"


def _matchers(*patterns: tuple[str, str]) -> dict[str, Any]:
    return {"patterns": [{kind: value, "ignore_case": True} for kind, value in patterns]}


def test_http_provider_is_istios_http_service() -> None:
    config = render(HTTP_SPEC)
    ext = _filters(config)[1]["typed_config"]
    assert "grpc_service" not in ext
    assert ext["transport_api_version"] == "V3"
    assert ext["status_on_error"] == {"code": "ServiceUnavailable"}
    assert ext["filter_enabled_metadata"]["value"] == {"string_match": {"prefix":
                                                                        "istio-ext-authz"}}
    service = ext["http_service"]
    assert service["server_uri"] == {
        "uri": "http://rate-limiter.authz.svc.cluster.local",
        "cluster": "outbound|8000||rate-limiter.authz.svc.cluster.local",
        "timeout": "0.500s",
    }
    assert service["path_prefix"] == "/check"
    # includeRequestHeadersInCheck: trace headers ("x-b3-*" a prefix); authorization is
    # Envoy's own default and need not be listed.
    assert ext["allowed_headers"] == _matchers(("exact", "traceparent"), ("exact", "tracestate"),
                                               ("exact", "b3"), ("prefix", "x-b3-"))
    assert "authorization_request" not in service
    response = service["authorization_response"]
    assert response["allowed_upstream_headers"] == _matchers(
        ("exact", "x-auth-subject"), ("exact", "x-auth-issuer"), ("exact", "x-auth-plan"),
        ("exact", "x-authz-degraded"), ("exact", "x-authz-shadow"))
    assert response["allowed_client_headers_on_success"] == _matchers(("prefix", "ratelimit"))
    assert response["allowed_client_headers"] == _matchers(
        ("exact", "www-authenticate"), ("exact", "retry-after"), ("prefix", "ratelimit"),
        ("exact", "content-type"), ("exact", "cache-control"))
    cluster = _cluster(config, "outbound|8000||rate-limiter.authz.svc.cluster.local")
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in options["explicit_http_config"]


def test_http_provider_in_the_older_istiod_shape() -> None:
    spec = SidecarSpec(protocol="http", allowed_headers_on_filter=False,
                       include_additional_headers=(("x-b", "2"), ("x-a", "1")),
                       request_body=RequestBody(2048, pack_as_bytes=False),
                       headers_to_upstream_on_allow=("*-suffix",))
    ext = _filters(render(spec))[1]["typed_config"]
    assert "allowed_headers" not in ext
    request = ext["http_service"]["authorization_request"]
    assert request["allowed_headers"]["patterns"][0] == {"exact": "traceparent",
                                                         "ignore_case": True}
    # includeAdditionalHeadersInCheck, sorted by key as istiod sorts them.
    assert request["headers_to_add"] == [{"key": "x-a", "value": "1"},
                                         {"key": "x-b", "value": "2"}]
    assert ext["with_request_body"] == {"max_request_bytes": 2048,
                                        "allow_partial_message": True}
    upstream = ext["http_service"]["authorization_response"]["allowed_upstream_headers"]
    assert upstream == _matchers(("suffix", "-suffix"))


def test_http_provider_without_header_lists_has_no_authorization_response() -> None:
    # istiod builds AuthorizationResponse only when one of the three lists is set.
    spec = SidecarSpec(protocol="http", headers_to_upstream_on_allow=(),
                       headers_to_downstream_on_allow=(), headers_to_downstream_on_deny=(),
                       include_request_headers=())
    service = _filters(render(spec))[1]["typed_config"]["http_service"]
    assert "authorization_response" not in service and "authorization_request" not in service


@pytest.mark.parametrize(("options", "message"), [
    ({"protocol": "tcp"}, "protocol"),
    ({"protocol": "http", "path_prefix": "check"}, "path_prefix"),
    ({"path_prefix": "/check"}, "path_prefix"),  # gRPC providers have none
    ({"protocol": "http", "headers_to_upstream_on_allow": ("*",)}, "not a header pattern"),
    ({"protocol": "http", "request_body": RequestBody(0)}, "max_request_bytes"),
])
def test_bad_http_parameters_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SidecarConfigError, match=message):
        render(SidecarSpec(**options))


@pytest.mark.parametrize("on_filter", [True, False], ids=["newer-istiod", "older-istiod"])
def test_envoy_validate_accepts_both_http_shapes(envoy_bin: Path, tmp_path: Path,
                                                 on_filter: bool) -> None:
    out = tmp_path / "envoy.yaml"
    sidecar.write(SidecarSpec(protocol="http", allowed_headers_on_filter=on_filter,
                              path_prefix="/check", request_body=RequestBody(4096),
                              include_additional_headers=(("x-a", "1"),)), out)
    result = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


SPECS = {
    "default": SidecarSpec(),
    "fail-open": SidecarSpec(fail_open=True, status_on_error=None),
    "http": HTTP_SPEC,
    "replicas-decode-slashes": SidecarSpec(
        endpoints=(("127.0.0.1", 9001), ("127.0.0.1", 9002)),
        lb_policy="ROUND_ROBIN",
        path_normalization="DECODE_AND_MERGE_SLASHES",
        access_log=True,
    ),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_envoy_validate_accepts_it(envoy_bin: Path, tmp_path: Path, name: str, fmt: str) -> None:
    out = tmp_path / f"envoy.{fmt}"
    assert sidecar.main([*_argv(SPECS[name]), "--out", str(out)]) == 0
    loaded = json.loads(out.read_text()) if fmt == "json" else yaml.safe_load(out.read_text())
    assert loaded == render(SPECS[name]), "the CLI must write what render() builds"
    result = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_envoy_validate_rejects_a_broken_config(envoy_bin: Path, tmp_path: Path) -> None:
    # The validation step above can fail: Envoy refuses a value it does not know.
    config = render(SidecarSpec())
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    out = tmp_path / "broken.yaml"
    out.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


def _argv(spec: SidecarSpec) -> list[str]:
    argv = [
        "--listener-port",
        str(spec.listener_port),
        "--admin-port",
        str(spec.admin_port),
        "--app-port",
        str(spec.app_port),
        "--service-port",
        str(spec.service_port),
        "--timeout",
        str(spec.timeout),
        "--status-on-error",
        str(spec.status_on_error or 0),
        "--lb-policy",
        spec.lb_policy,
        "--path-normalization",
        spec.path_normalization,
        "--protocol",
        spec.protocol,
        "--path-prefix",
        spec.path_prefix,
    ]
    for host, port in spec.endpoints:
        argv += ["--endpoint", f"{host}:{port}"]
    if spec.fail_open:
        argv.append("--fail-open")
    if spec.access_log:
        argv.append("--access-log")
    return argv


def test_cli_reports_bad_input_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert sidecar.main(["--path", "/v1/{*}/x"]) == 2
    assert "error: path" in capsys.readouterr().err
