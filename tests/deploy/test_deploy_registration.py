"""The mesh registration of the provider: the three forms (IstioOperator, Helm values, istio
ConfigMap) say the same thing, and it points at the Service the overlays deploy."""

from __future__ import annotations

import pytest
import yaml
from deploykit import authzconfig, render
from deploykit.authzconfig import REGISTRATION_DIR


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


def test_registration_values_are_deliberate() -> None:
    [provider] = authzconfig.registrations()["IstioOperator"]
    assert provider["name"] == "rate-limiter"
    grpc = provider["envoyExtAuthzGrpc"]
    assert set(grpc) == {"service", "port", "timeout", "failOpen", "statusOnError"}
    assert grpc["failOpen"] is False
    # A valid Envoy StatusCode as a string (istiod parses it with ParseInt).
    assert grpc["statusOnError"] == "503"
    assert 0.2 <= _seconds(grpc["timeout"]) <= 1.0


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_registration_points_at_the_deployed_service(rendered, overlay: str) -> None:
    docs = rendered[overlay]
    [provider] = authzconfig.registrations()["IstioOperator"]
    grpc = provider["envoyExtAuthzGrpc"]
    name, namespace, *rest = grpc["service"].split(".")
    assert rest == ["svc", "cluster", "local"]
    svc = render.one(docs, "Service", name, namespace)
    port = next(p for p in svc["spec"]["ports"] if p["port"] == grpc["port"])
    assert port["appProtocol"] == "grpc"
    settings, _ = authzconfig.settings_and_quota(docs)
    assert settings.server.grpc_port == grpc["port"]
    # The service must answer (even with a 503 of its own) before the mesh gives up on it.
    assert settings.store.timeout < _seconds(grpc["timeout"]) / 4


def test_registration_files_cannot_clobber_the_mesh_config() -> None:
    """None of them is a ConfigMap that `kubectl apply -f deploy/istio/` would write over the
    whole mesh config."""
    for path in REGISTRATION_DIR.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "ConfigMap"), path
