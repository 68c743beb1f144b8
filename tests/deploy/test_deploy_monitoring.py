"""Monitoring (issue #5, deploy side; #17): the scrape target, the alert rules (checked and unit
tested with promtool, each linked to its runbook section), and the Grafana dashboard (scoped by
cluster and namespace) use only the metric names the service exports; the component renders
with every overlay."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploykit import render
from deploykit.tools import DEPLOY, REPO, promtool

HERE = Path(__file__).parent
MONITORING = DEPLOY / "components" / "monitoring"
RUNBOOKS = REPO / "docs" / "runbooks.md"

HISTOGRAMS = {"rpc_server_call_duration_seconds", "authz_store_duration_seconds"}
METRICS = {
    "authz_decisions_total", "authz_store_errors_total", "authz_token_cache_hits_total",
    "authz_token_cache_misses_total", "authz_token_cache_entries", "authz_jwks_refreshes_total",
    "authz_config_reloads_total", "authz_checks_inflight",
    *(h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")),
}
# prometheus_client's process and Python collectors, on the same endpoint (issue #17): allowed in
# queries, not every one needs a panel.
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds", "process_max_fds", "process_start_time_seconds",
    "python_gc_objects_collected_total", "python_gc_objects_uncollectable_total",
    "python_gc_collections_total", "python_info",
}
OUTCOMES = {"allowed", "public_path", "unauthenticated", "forbidden", "rate_limited",
            "invalid_request", "backend_error", "internal_error"}
# One alert per concern the issue names.
REQUIRED_ALERTS = {"AuthzHighDenyRatio", "AuthzRedisErrors", "AuthzJWKSRefreshFailing",
                   "AuthzCheckLatencyHigh"}


def _rule_groups() -> list[dict[str, Any]]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return rule["spec"]["groups"]


def _dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "dashboards" / "authz.json").read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


def _rule_exprs() -> list[str]:
    return [r["expr"] for g in _rule_groups() for r in g["rules"]]


def _metric_names(expr: str) -> set[str]:
    # Names followed by `=`, `!=`, `=~` are label matchers (rpc_method="Check"), not metrics.
    return set(re.findall(r"\b((?:authz|rpc|process|python)_[a-z_]+)\b(?!\s*(?:[=:]|!=|!~))",
                          expr))


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_expressions_use_only_exported_metrics(source: str) -> None:
    exprs = _rule_exprs() if source == "rules" else _dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        used |= {m for m in _metric_names(expr) if not m.startswith("authz:")}
        for values in re.findall(r'outcome\s*[!=]~?\s*"([^"]+)"', expr):
            unknown = set(values.split("|")) - OUTCOMES
            assert not unknown, f"unknown outcome {unknown} in {expr}"
    unknown = used - METRICS - PROCESS_METRICS
    assert not unknown, f"{source} uses metrics the service does not export: {unknown}"
    assert used, "no metric found: the name pattern is wrong"


def test_required_alerts_exist_with_severity_and_summary() -> None:
    alerts = {r["alert"]: r for g in _rule_groups() for r in g["rules"] if "alert" in r}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_dashboard_covers_every_metric() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    used = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    base = {m for m in METRICS if not m.endswith(("_sum", "_count"))}
    missing = base - used
    assert not missing, f"dashboard has no panel for {missing}"


def _with_monitoring(rendered: dict[str, list[render.Doc]], overlay: str) -> list[render.Doc]:
    """The overlay with components/monitoring: as shipped (production), or added to it the way a
    user would (dev: its own kustomization listing the overlay and the component)."""
    docs = rendered[overlay]
    if render.find(docs, "ServiceMonitor"):
        return docs
    return render.render_with_components(overlay, ["monitoring"])


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_monitoring_component_works_with_every_overlay(rendered, overlay: str) -> None:
    docs = _with_monitoring(rendered, overlay)
    [sm] = render.find(docs, "ServiceMonitor")
    namespace = sm["metadata"]["namespace"]
    # No namespaceSelector: the operator looks in the monitor's own namespace, so the Service
    # must be there (whatever namespace the overlay puts both in).
    assert "namespaceSelector" not in sm["spec"]
    svc = render.one(docs, "Service", "rate-limiter", namespace)
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [endpoint] = sm["spec"]["endpoints"]
    [port] = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert endpoint["path"] == "/metrics"
    # The port the Deployment's container serves metrics on, behind that Service port.
    dep = render.one(docs, "Deployment", "rate-limiter", namespace)
    container_ports = {p["name"]: p["containerPort"]
                       for c in dep["spec"]["template"]["spec"]["containers"]
                       for p in c.get("ports", [])}
    assert port["targetPort"] in container_ports
    cm = render.one(docs, "ConfigMap", "authz-grafana-dashboard", namespace)
    assert json.loads(cm["data"]["authz.json"]) == _dashboard()
    rule = render.one(docs, "PrometheusRule", "authz", namespace)
    # The one rule that must name the namespace (absent() needs a selector) names this one.
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    for expr in exprs:
        for ns in re.findall(r'namespace="([^"]+)"', expr):
            assert ns == namespace, expr
    assert any(f'namespace="{namespace}"' in e for e in exprs)
    # Step 3 of the install (`-l app.kubernetes.io/part-of=authz`) applies all of it.
    for doc in (sm, cm, rule):
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "authz", render.ref(doc)
    refs = [render.ref(d) for d in docs]
    assert len(refs) == len(set(refs)), "an object rendered twice"


def test_dev_ships_without_monitoring_unless_added(rendered) -> None:
    """The dev overlay applies on clusters without the Prometheus Operator CRDs."""
    assert not render.find(rendered["dev"], "ServiceMonitor")
    assert not render.find(rendered["dev"], "PrometheusRule")


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _runbook_sections() -> dict[str, str]:
    """Anchor -> text of each `## ` section of docs/runbooks.md."""
    sections: dict[str, str] = {}
    for chunk in re.split(r"^## ", RUNBOOKS.read_text(encoding="utf-8"), flags=re.M)[1:]:
        heading, _, body = chunk.partition("\n")
        sections[_slug(heading)] = body
    return sections


def test_every_alert_links_its_own_runbook_section() -> None:
    alerts = {r["alert"]: r for g in _rule_groups() for r in g["rules"] if "alert" in r}
    sections = _runbook_sections()
    bases = set()
    for name, rule in alerts.items():
        url = rule["annotations"].get("runbook_url")
        assert url, f"{name} has no runbook_url"
        base, _, anchor = url.partition("#")
        assert base.startswith("https://") and base.endswith("/docs/runbooks.md"), url
        assert anchor == _slug(name), f"{name} links #{anchor}, not its own section"
        assert anchor in sections, f"{name}: docs/runbooks.md has no section #{anchor}"
        bases.add(base)
        body = sections[anchor]
        for part in ("**What it means.**", "**How to check.**", "**What to do.**"):
            assert part in body, f"runbook #{anchor} lacks {part}"
        # How to check: a query and a command, or a pointer to a section that has them.
        linked = re.findall(r"\]\(#([\w-]+)\)", body)
        assert ("```promql" in body and "kubectl" in body) or (
            "kubectl" in body and any("```promql" in sections.get(a, "") for a in linked)
        ), f"runbook #{anchor} shows no PromQL or no kubectl command"
    assert len(bases) == 1, f"runbook links to several documents: {bases}"
    # And no runbook for an alert that does not exist (a renamed alert leaves one behind).
    assert set(sections) == {_slug(a) for a in alerts}


def test_runbook_queries_use_only_exported_metrics() -> None:
    text = RUNBOOKS.read_text(encoding="utf-8")
    blocks = re.findall(r"```promql\n(.*?)```", text, re.S)
    assert blocks
    used = set().union(*(_metric_names(b) for b in blocks))
    unknown = {m for m in used if not m.startswith("authz:")} - METRICS - PROCESS_METRICS - {
        "authz_worker_up"}
    assert not unknown, f"docs/runbooks.md queries unknown metrics: {unknown}"


SCOPE = ('cluster=~"$cluster"', 'namespace=~"$namespace"')


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, its `{...}` matchers or "") for every metric named in a query."""
    return re.findall(r"\b((?:authz|rpc|process|python)_[a-z_]+)\b(?!\s*(?:[=:]|!=|!~))"
                      r"(\{[^}]*\})?", expr)


def test_dashboard_has_cluster_and_namespace_variables() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    for name in ("cluster", "namespace"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})"), query
        assert _metric_names(query) <= METRICS
        # "All" must also match series without the label (a Prometheus of one cluster has no
        # `cluster` label): ".*" matches the empty value, Grafana's default all-value does not.
        assert var["includeAll"] is True and var["allValue"] == ".*"
    # The namespace list follows the chosen cluster.
    assert 'cluster=~"$cluster"' in variables["namespace"]["query"]["query"]


def test_every_panel_query_is_scoped_by_cluster_and_namespace() -> None:
    checked = 0
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            selectors = _selectors(target["expr"])
            assert selectors, f"{panel['title']}: no metric in {target['expr']}"
            for metric, matchers in selectors:
                for m in SCOPE:
                    assert m in matchers, f"{panel['title']}: {metric} lacks {m}"
                checked += 1
    assert checked >= len(_dashboard()["panels"])


def test_an_error_counter_born_at_zero_alerts_on_the_first_error(tmp_path: Path) -> None:
    """Why the service exports authz_store_errors_total at 0 from the start: a series that
    appears at 1 has no increase to see, so AuthzRedisErrors would miss the first error of a
    process; from 0 it fires."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _rule_groups()}))
    [rule] = [r for g in _rule_groups() for r in g["rules"] if r.get("alert") == "AuthzRedisErrors"]
    fired = {"exp_labels": {"severity": "critical"}, "exp_annotations": {
        "summary": "authz cannot reach or use Redis (3.333m errors/s)",  # 1 error in 5 min
        "runbook_url": rule["annotations"]["runbook_url"]}}
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m",
         "input_series": [{"series": 'authz_store_errors_total{error_type="timeout", pod="a"}',
                           "values": "0 0 0 0 1 1 1 1 1 1"}],
         "alert_rule_test": [{"eval_time": "7m", "alertname": "AuthzRedisErrors",
                              "exp_alerts": [fired]}]},
        {"interval": "1m",
         "input_series": [{"series": 'authz_store_errors_total{error_type="timeout", pod="a"}',
                           "values": "_ _ _ _ 1 1 1 1 1 1"}],
         "alert_rule_test": [{"eval_time": "7m", "alertname": "AuthzRedisErrors",
                              "exp_alerts": []}]},
    ]}
    (tmp_path / "first-error-test.yaml").write_text(yaml.safe_dump(tests))
    result = _promtool("test", "rules", "first-error-test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("promrules")
    (d / "rules.yaml").write_text(yaml.safe_dump({"groups": _rule_groups()}))
    shutil.copy(HERE / "fixtures" / "alerts-test.yaml", d / "alerts-test.yaml")
    return d


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    result = _promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_the_alerts(rules_dir: Path) -> None:
    result = _promtool("test", "rules", "alerts-test.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel query, with Grafana's $__rate_interval filled in, is valid PromQL."""
    rules = [{"record": f"dashboard:panel_query_{i}",
              "expr": e.replace("$__rate_interval", "5m")}
             for i, e in enumerate(_dashboard_exprs())]
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump({"groups": [
        {"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", "dash.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
