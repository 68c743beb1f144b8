"""The mesh registration of the provider: the three forms (IstioOperator, Helm values, istio
ConfigMap) say the same thing, and it points at the Service the overlays deploy. Two providers
for the one service: `rate-limiter` (envoyExtAuthzGrpc, what the CUSTOM policy names) and
`rate-limiter-http` (envoyExtAuthzHttp, the service's HTTP edge; components/http-provider);
and `rate-limiter-body`, the gRPC one with the request body in the check (components/body-costs)."""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase

import pytest
import yaml
from deploykit import authzconfig, invariants, istio, render
from deploykit.authzconfig import BODY_PROVIDER, GRPC_PROVIDER, HTTP_PROVIDER, REGISTRATION_DIR

from authz.buckets.store import BucketState, ChargeResult
from authz.decision import Answers
from authz.mesh.sidecar import MAX_BUFFERED_BODY
from authz.quota.resolve import Grant, Refusal
from authz.tokens.identity import Identity, TokenFailure


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for unit in ("ms", "s", "m"):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    raise AssertionError(f"not a duration: {duration!r}")


def test_all_registration_forms_are_identical() -> None:
    forms = authzconfig.registrations()
    assert len(forms) == 3
    first = next(iter(forms.values()))
    for name, providers in forms.items():
        assert providers == first, f"{name} differs"
    assert [p["name"] for p in first] == [GRPC_PROVIDER, HTTP_PROVIDER, BODY_PROVIDER]


@pytest.mark.parametrize(("name", "kind", "fields"), [
    (GRPC_PROVIDER, "envoyExtAuthzGrpc",
     {"service", "port", "timeout", "failOpen", "statusOnError"}),
    (HTTP_PROVIDER, "envoyExtAuthzHttp",
     {"service", "port", "timeout", "failOpen", "statusOnError", "pathPrefix",
      "includeRequestHeadersInCheck", "headersToUpstreamOnAllow", "headersToDownstreamOnAllow",
      "headersToDownstreamOnDeny"}),
])
def test_registration_values_are_deliberate(name: str, kind: str, fields: set[str]) -> None:
    provider = authzconfig.provider(name)
    assert set(provider) == {"name", kind}
    entry = provider[kind]
    assert set(entry) == fields
    # Never let traffic through unmetered. For the HTTP provider also: Envoy takes every 5xx
    # of an HTTP provider for a failed call, so failOpen would pass the service's own 503s.
    assert entry["failOpen"] is False
    # A valid Envoy StatusCode as a string (istiod parses it with ParseInt).
    assert entry["statusOnError"] == "503"
    assert 0.2 <= _seconds(entry["timeout"]) <= 1.0


def _matches(patterns: list[str], header: str) -> bool:
    """Istio's header list semantics: exact, "prefix*", "*suffix", case-insensitive."""
    return any(fnmatchcase(header.lower(), p.lower()) for p in patterns)


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_registration_points_at_the_deployed_service(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    settings, _ = authzconfig.settings_and_quota(docs)
    for name, kind, protocol, setting in (
            (GRPC_PROVIDER, "envoyExtAuthzGrpc", "grpc", settings.server.grpc_port),
            (HTTP_PROVIDER, "envoyExtAuthzHttp", "http", settings.server.http_port)):
        entry = authzconfig.provider(name)[kind]
        svc_name, namespace, *rest = entry["service"].split(".")
        assert rest == ["svc", "cluster", "local"]
        svc = render.one(docs, "Service", svc_name, namespace)
        port = next(p for p in svc["spec"]["ports"] if p["port"] == entry["port"])
        # The port's protocol is what Istio speaks to it (gRPC over HTTP/1.1 fails every check).
        assert port["appProtocol"] == protocol and port["name"] == protocol
        assert setting == entry["port"], name
        # The service must answer (even with a 503 of its own) before the mesh gives up on it.
        assert settings.store.timeout < _seconds(entry["timeout"]) / 4
    http = authzconfig.provider(HTTP_PROVIDER)["envoyExtAuthzHttp"]
    assert http["pathPrefix"] == settings.server.http_path_prefix


def _answers(docs: list[render.Doc]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """What the deployed config makes the service answer: header names by destination, for
    allows ("upstream", "client") and denials ("client")."""
    settings, _ = authzconfig.settings_and_quota(docs)
    answers = Answers(settings)
    identity = Identity("https://idp", "alice", "k" * 32, 2e9, {})
    grant = Grant("free", "*", 1, ())
    state = BucketState("per-second", 5, 0, 1, 1)
    allows = [answers.charged(identity, grant, ChargeResult(True, (state,), 0)),
              answers.unlimited(identity, grant),
              dataclasses.replace(answers.charged(identity, grant,
                                                  ChargeResult(True, (state,), 0)))]
    allow_on_error = Answers(dataclasses.replace(
        settings, store=dataclasses.replace(settings.store, on_error="allow")))
    allows.append(allow_on_error.store_failed(identity, grant))
    denials = [answers.charged(identity, grant, ChargeResult(False, (state,), 1)),
               answers.refused(identity, Refusal("free", "model_not_allowed")),
               answers.other_path(), answers.invalid_request("invalid_path"),
               *(answers.unauthenticated(f) for f in TokenFailure)]
    allow = {"upstream": {k for d in allows for k, _ in d.upstream_headers},
             "client": {k for d in allows for k, _ in d.response_headers}}
    deny = {"client": {k for d in denials for k, _ in d.response_headers}}
    return allow, deny


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_http_registration_lets_every_header_go_where_it_belongs(rendered, overlay: str) -> None:
    http = authzconfig.provider(HTTP_PROVIDER)["envoyExtAuthzHttp"]
    allow, deny = _answers(rendered[overlay])
    settings, _ = authzconfig.settings_and_quota(rendered[overlay])
    identity = {settings.headers.subject, settings.headers.issuer, settings.headers.plan,
                settings.headers.degraded}
    upstream = http["headersToUpstreamOnAllow"]
    # Every identity header is SET by Envoy (a missing one would leave a client's forged copy
    # in place: tests/e2e/test_http_provider.py shows it), and nothing else is.
    for header in identity | allow["upstream"]:
        assert _matches(upstream, header), f"{header} would not reach the model server"
    for header in allow["client"]:
        assert not _matches(upstream, header), f"{header} is for the client"
        assert _matches(http["headersToDownstreamOnAllow"], header), header
    for header in identity:
        assert not _matches(http["headersToDownstreamOnAllow"], header), \
            f"{header} must not reach the client"
    for header in deny["client"]:
        assert _matches(http["headersToDownstreamOnDeny"], header), \
            f"{header} of a denial would not reach the client"
    # Envoy sends authorization by itself; the trace headers must be asked for.
    for header in ("traceparent", "b3", "x-b3-traceid"):
        assert _matches(http["includeRequestHeadersInCheck"], header), header
    # istiod refuses a lone "*" in these lists.
    for key in ("includeRequestHeadersInCheck", "headersToUpstreamOnAllow",
                "headersToDownstreamOnAllow", "headersToDownstreamOnDeny"):
        assert "*" not in http[key]


def test_http_component_switches_the_custom_policy_and_keeps_the_invariants(rendered) -> None:
    docs = render.render_with_components("dev", ["http-provider"])
    [custom] = [p for p in render.find(docs, "AuthorizationPolicy")
                if p["spec"].get("action") == "CUSTOM"]
    assert custom["spec"]["provider"]["name"] == HTTP_PROVIDER
    # Everything else is the dev overlay's: the same objects, one field changed.
    assert len(docs) == len(rendered["dev"])
    view = dataclasses.replace(authzconfig.view(docs), provider=HTTP_PROVIDER)
    problems = invariants.protected_path_problems(docs, view)
    assert not problems, "\n".join(problems)


def test_registration_files_cannot_clobber_the_mesh_config() -> None:
    """None of them is a ConfigMap that `kubectl apply -f deploy/istio/` would write over the
    whole mesh config."""
    for path in REGISTRATION_DIR.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "ConfigMap"), path


def test_body_provider_carries_the_body_within_the_connection_buffer() -> None:
    body = authzconfig.provider(BODY_PROVIDER)
    grpc = body["envoyExtAuthzGrpc"]
    # The same service and answer policy as the plain gRPC provider, plus the body.
    plain = authzconfig.provider(authzconfig.GRPC_PROVIDER)["envoyExtAuthzGrpc"]
    assert {k: v for k, v in grpc.items() if k != "includeRequestBodyInCheck"} == plain
    included = grpc["includeRequestBodyInCheck"]
    # Below the connection manager's 1 MiB buffer (past it Envoy answers 413 before the check),
    # longer bodies checked cut (the rule's fallback) rather than refused by Envoy, and as bytes
    # (a binary body would not decode as the text field).
    assert 0 < included["maxRequestBytes"] < MAX_BUFFERED_BODY
    assert included["allowPartialMessage"] is True and included["packAsBytes"] is True


def test_body_component_switches_the_provider_and_covers_the_llm_routes() -> None:
    docs = render.render_with_components("dev", ["body-costs"])
    [custom] = [p for p in render.find(docs, "AuthorizationPolicy")
                if p["spec"].get("action") == "CUSTOM"]
    assert custom["spec"]["provider"]["name"] == BODY_PROVIDER
    view = dataclasses.replace(authzconfig.view(docs), provider=BODY_PROVIDER)
    problems = invariants.protected_path_problems(docs, view)
    assert not problems, "\n".join(problems)
    settings, _ = authzconfig.settings_and_quota(docs)
    assert settings.paths.llm_routes
    ns, labels = authzconfig.WORKLOAD_NAMESPACE, authzconfig.WORKLOAD_LABELS
    token = {"request_principal": f"{view.issuer}/user-1",
             "claims": {"aud": [view.audience]}}
    for route in settings.paths.llm_routes:
        with_token = istio.evaluate(docs, ns, labels, istio.Request("POST", route, **token))
        assert with_token.allowed and BODY_PROVIDER in with_token.custom_providers, route
        assert not istio.evaluate(docs, ns, labels, istio.Request("POST", route)).allowed
    # Without the component the routes are not admitted at all (the config's llm_routes are
    # then never sent a check).
    plain = render.render("dev")
    for route in settings.paths.llm_routes:
        assert not istio.evaluate(plain, ns, labels,
                                  istio.Request("POST", route, **token)).allowed, route
