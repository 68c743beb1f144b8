"""Every form of the provider registration also sets the path normalization that closes the
`//` and `%2F` bypass of the `/v1/models/*` policies (see deploy/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ISTIO = Path(__file__).resolve().parents[2] / "deploy" / "istio"


def mesh(name: str) -> dict[str, object]:
    doc = yaml.safe_load((ISTIO / name).read_text())
    if name == "istio-operator.yaml":
        return doc["spec"]["meshConfig"]  # type: ignore[no-any-return]
    if name == "helm-values.yaml":
        return doc["meshConfig"]  # type: ignore[no-any-return]
    return doc  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["istio-operator.yaml", "helm-values.yaml", "mesh-config.yaml"])
def test_registration_sets_decode_and_merge_slashes(name: str) -> None:
    m = mesh(name)
    assert m["pathNormalization"] == {"normalization": "DECODE_AND_MERGE_SLASHES"}
    providers = m["extensionProviders"]
    assert isinstance(providers, list) and providers[0]["name"] == "rate-limiter"
