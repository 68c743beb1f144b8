"""A span exporter that drops what it gets, for measuring what tracing costs in-process.

With `OTEL_TRACES_EXPORTER=authz_discard` (registered as an entry point in pyproject.toml) and
`OTEL_TRACES_SAMPLER=always_on`, every check builds, samples, batches and "exports" a span
exactly as with a real exporter, minus the OTLP encoding and network: the issue's "traces at
1.0 to an in-memory exporter" configuration, for the load benchmark. Never useful in production.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class DiscardSpanExporter(SpanExporter):
    """Counts spans and keeps none (an in-memory exporter that cannot grow)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.exported += len(spans)
        return SpanExportResult.SUCCESS
