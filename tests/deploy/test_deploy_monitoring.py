"""Monitoring (issue #5, deploy side): the scrape target, the alert rules (checked and unit
tested with promtool), and the Grafana dashboard use only the metric names the service
exports."""

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
from deploykit.tools import DEPLOY, promtool

HERE = Path(__file__).parent
MONITORING = DEPLOY / "components" / "monitoring"

HISTOGRAMS = {"rpc_server_call_duration_seconds", "authz_store_duration_seconds"}
METRICS = {
    "authz_decisions_total", "authz_store_errors_total", "authz_token_cache_hits_total",
    "authz_token_cache_misses_total", "authz_token_cache_entries", "authz_jwks_refreshes_total",
    "authz_config_reloads_total", "authz_checks_inflight",
    *(h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")),
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
    return set(re.findall(r"\b((?:authz|rpc)_[a-z_]+)\b(?!\s*(?:[=:]|!=|!~))", expr))


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_expressions_use_only_exported_metrics(source: str) -> None:
    exprs = _rule_exprs() if source == "rules" else _dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        used |= {m for m in _metric_names(expr) if not m.startswith("authz:")}
        for values in re.findall(r'outcome\s*[!=]~?\s*"([^"]+)"', expr):
            unknown = set(values.split("|")) - OUTCOMES
            assert not unknown, f"unknown outcome {unknown} in {expr}"
    unknown = used - METRICS
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


def test_servicemonitor_targets_the_metrics_port(rendered) -> None:
    docs = rendered["production"]
    sm = render.one(docs, "ServiceMonitor", "rate-limiter", "authz-system")
    svc = render.one(docs, "Service", "rate-limiter", "authz-system")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    cm = render.one(docs, "ConfigMap", "authz-grafana-dashboard", "authz-system")
    assert json.loads(cm["data"]["authz.json"]) == _dashboard()
    assert not render.find(rendered["dev"], "ServiceMonitor")


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
