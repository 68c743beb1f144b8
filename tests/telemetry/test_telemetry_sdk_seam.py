"""The one SDK internal authz uses, and the version range pyproject.toml admits for it.

`metrics.HistogramBridge` wraps `MetricReader._collect` through `MetricReader._set_collect_callback`
(the OpenTelemetry API has no observable histogram; metrics.py says why the SDK's Histogram is
not used). pyproject.toml bounds opentelemetry-sdk above: before raising the bound, run this file
on the new version. Everything else in authz/ uses public OpenTelemetry names only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from authz.telemetry.metrics import BridgedHistogram, HistogramBridge, LocalHistogram

REPO = Path(__file__).resolve().parents[2]


def _sdk_bounds() -> tuple[tuple[int, ...], tuple[int, ...]]:
    text = (REPO / "pyproject.toml").read_text()
    found = re.search(r'"opentelemetry-sdk>=([\d.]+),<([\d.]+)"', text)
    assert found, "pyproject.toml must bound opentelemetry-sdk: >=low,<high"
    low, high = (tuple(int(p) for p in v.split(".")) for v in found.groups())
    return low, high


def test_the_installed_sdk_is_in_the_admitted_range() -> None:
    low, high = _sdk_bounds()
    installed = tuple(int(p) for p in re.findall(r"\d+", version("opentelemetry-sdk"))[:3])
    assert low <= installed < high


class _Kept(MetricExporter):
    """A push exporter that keeps what it is given (PeriodicExportingMetricReader's path)."""

    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: object) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        pass


def _bridge(histogram: LocalHistogram) -> HistogramBridge:
    return HistogramBridge(InstrumentationScope("authz", "1"), Resource({"service.name": "t"}),
                           [BridgedHistogram("h", "s", "d", {"k": "v"}, histogram)])


def _points(data: MetricsData | None) -> list[tuple[str, str, float]]:
    """(scope, metric, count or value) of every data point."""
    assert data is not None
    return [(sm.scope.name, m.name, getattr(p, "count", None) or p.value)  # type: ignore[union-attr]
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            for p in m.data.data_points]


@pytest.mark.parametrize("with_sdk_metric", [False, True])
def test_the_collect_seam_pull_reader(with_sdk_metric: bool) -> None:
    """The reader's own collection goes through the wrapped callback; the bridged histogram
    lands in the authz scope, next to the SDK's metrics or alone."""
    reader = InMemoryMetricReader()
    assert callable(getattr(MetricReader, "_set_collect_callback", None))
    provider = MeterProvider(metric_readers=[reader])
    histogram = LocalHistogram((1.0,))
    _bridge(histogram).attach(reader)
    if with_sdk_metric:
        provider.get_meter("authz").create_counter("c").add(1)
    histogram.record(0.5)
    points = _points(reader.get_metrics_data())
    assert points == [("authz", "c", 1), ("authz", "h", 1)] if with_sdk_metric else \
        [("authz", "h", 1)]
    provider.shutdown()


def test_the_collect_seam_push_reader() -> None:
    exporter = _Kept()
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    histogram = LocalHistogram((1.0,))
    _bridge(histogram).attach(reader)
    histogram.record(2.0)
    provider.force_flush()
    assert [p for data in exporter.exported for p in _points(data)] == [("authz", "h", 1)]
    provider.shutdown()


def test_attaching_before_the_provider_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="attach after creating the MeterProvider"):
        _bridge(LocalHistogram((1.0,))).attach(InMemoryMetricReader())


def _private_uses(path: Path) -> Sequence[str]:
    """`_name`s taken from opentelemetry modules: imports, and attributes of names so imported
    (module aliases included), in one source file."""
    tree = ast.parse(path.read_text())
    otel_names: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opentelemetry"):
            parts = (node.module or "").split(".")
            for alias in node.names:
                if any(p.startswith("_") for p in parts) or alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                otel_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("opentelemetry"):
                    if any(p.startswith("_") for p in alias.name.split(".")):
                        found.append(f"import {alias.name}")
                    otel_names.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in otel_names):
            found.append(f"{node.value.id}.{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "getattr" and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")):
            found.append(f"getattr(..., {node.args[1].value!r})")
    return found


def test_no_other_private_opentelemetry_names_in_authz() -> None:
    uses = {str(p.relative_to(REPO)): _private_uses(p)
            for p in sorted((REPO / "authz").rglob("*.py"))}
    assert {p: u for p, u in uses.items() if u} == {
        "authz/telemetry/metrics.py": ["getattr(..., '_collect')"],
    }
    # The bridge's seam by its method's name: only there.
    seam = [p.name for p in (REPO / "authz").rglob("*.py")
            if "_set_collect_callback" in p.read_text()]
    assert seam == ["metrics.py"]
