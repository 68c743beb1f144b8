"""Fixtures for the telemetry tests: Telemetry objects wired to in-memory exporters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authz.config.settings import ServerSettings, Settings, TelemetrySettings
from authz.decision import Decision, Outcome
from authz.telemetry import Telemetry

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
TOKEN = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJl"

ALLOWED = Decision(
    allowed=True, status=200, outcome=Outcome.ALLOWED, reason="ok",
    plan="pro", model="llama-*", limit="per-second", token_cache_hit=True,
)
UNAUTHENTICATED = Decision(
    allowed=False, status=401, outcome=Outcome.UNAUTHENTICATED, reason="token_expired",
    token_cache_hit=False,
)
RATE_LIMITED = Decision(
    allowed=False, status=429, outcome=Outcome.RATE_LIMITED, reason="rate_limited",
    plan="free", model="*", limit="per-minute", token_cache_hit=True,
)
BACKEND_ERROR = Decision(
    allowed=False, status=503, outcome=Outcome.BACKEND_ERROR, reason="store_unavailable",
    plan="free", model="*",
)


def make_settings(**telemetry: Any) -> Settings:
    return Settings(
        server=ServerSettings(metrics_port=0),
        telemetry=TelemetrySettings(**{"subject_salt": "pepper", **telemetry}),
    )


def request_headers(**extra: str) -> dict[str, str]:
    return {
        ":authority": "models.example.com",
        ":method": "POST",
        ":path": "/v1/models/llama-3:predict",
        "authorization": TOKEN,
        **extra,
    }


class Harness:
    def __init__(self, telemetry: Telemetry, spans: InMemorySpanExporter,
                 reader: InMemoryMetricReader) -> None:
        self.telemetry = telemetry
        self.spans = spans
        self.reader = reader

    def finished_spans(self) -> list[Any]:
        self.telemetry.force_flush()
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> data points, from one collection."""
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def check(self, decision: Decision, headers: Mapping[str, str] | None = None,
              subject: str | None = "user-1") -> None:
        with self.telemetry.start_check(headers or request_headers()) as scope:
            scope.finish(decision, subject, path="/v1/models/llama-3:predict?api_key=secret")


MakeHarness = Callable[..., Harness]


@pytest.fixture
def make_harness() -> Iterator[MakeHarness]:
    """Build Telemetry objects with in-memory exporters; all are shut down after the test."""
    made: list[Telemetry] = []

    def make(settings: Settings | None = None, environ: Mapping[str, str] | None = None,
             tracing: bool = True) -> Harness:
        spans = InMemorySpanExporter()
        reader = InMemoryMetricReader()
        telemetry = Telemetry.from_settings(
            settings or make_settings(),
            span_exporter=spans if tracing else None,
            metric_reader=reader,
            install_global=False,
            environ=environ if environ is not None else {},
        )
        made.append(telemetry)
        return Harness(telemetry, spans, reader)

    yield make
    for telemetry in made:
        telemetry.shutdown()


@pytest.fixture
def harness(make_harness: MakeHarness) -> Harness:
    return make_harness()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Tests that reconfigure the root logger get it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
