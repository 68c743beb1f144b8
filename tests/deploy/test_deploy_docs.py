"""The deploy guide stays true to the files: every path it names exists, the install order's
label selectors split the overlays into exactly two groups, and the registration snippet in
the guide is the one in deploy/istio/."""

from __future__ import annotations

import re

import pytest
import yaml
from deploykit import authzconfig, render
from deploykit.tools import DEPLOY, REPO

SERVICE = "app.kubernetes.io/part-of"
POLICIES = "app.kubernetes.io/managed-by"


def test_paths_named_in_the_guide_exist(readme: str) -> None:
    # Anywhere, code blocks included (commands name files too).
    # `deploy/istiod` in `kubectl logs deploy/istiod` is a Deployment, not a path.
    named = {p for p in re.findall(r"(?<![\w/])((?:deploy|tests)/[\w./-]*\w)", readme)
             if p.count("/") > 1 or "." in p}
    # Paths relative to deploy/ (the guide lives there).
    relative = r"`((?:base|mesh|components|overlays|istio)/[\w./-]+)`"
    named |= {"deploy/" + p for p in re.findall(relative, readme)}
    assert len(named) > 10
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"the deploy guide names files that do not exist: {missing}"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_install_steps_select_every_object_exactly_once(rendered, overlay: str) -> None:
    """Step 3 applies `-l part-of=authz`, step 4 the rest: nothing may fall between them."""
    for doc in rendered[overlay]:
        labels = doc["metadata"].get("labels", {})
        service = labels.get(SERVICE) == "authz"
        policy = labels.get(POLICIES) == "ml-platform-policies"
        assert service != policy, f"{render.ref(doc)}: service={service} policy={policy}"
        if doc["kind"] == "AuthorizationPolicy" and doc["spec"].get("action") == "CUSTOM":
            assert policy, "the CUSTOM policy must come after the service (step 4)"


def test_registration_snippet_in_the_guide_matches_the_files(readme: str) -> None:
    m = re.search(r"```yaml\n(extensionProviders:\n.*?)```", readme, re.S)
    assert m, "registration snippet not found"
    assert yaml.safe_load(m.group(1))["extensionProviders"] == \
        authzconfig.registrations()["IstioOperator"]


def test_guide_documents_every_alert(readme: str) -> None:
    path = DEPLOY / "components" / "monitoring" / "prometheusrule.yaml"
    rule = yaml.safe_load(path.read_text())
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for alert in alerts:
        stem = alert.removesuffix("High").removesuffix("Critical")
        assert stem in readme, f"{alert} is not described in the deploy guide"
