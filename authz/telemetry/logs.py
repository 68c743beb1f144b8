"""Logs: JSON lines on stderr with the trace and span ids, a rate-limited deny line, and the
effective configuration with its secrets masked."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from authz.config.settings import Settings
from authz.errors import ConfigError
from authz.redact import MASK, redact_url

if TYPE_CHECKING:
    from authz.telemetry.setup import Telemetry

# Setting names whose values are secrets wherever they appear.
SECRET_FIELDS = frozenset({"subject_salt", "password", "secret", "client_secret", "token"})

# LogRecord attributes that are not user fields.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

_handler_marker = "_authz_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, trace_id, span_id, then `extra` fields.

    trace_id/span_id come from `extra` when given (the deny line passes its check's span), else
    from the span current when the line is logged.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if "trace_id" not in record.__dict__:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                out["trace_id"] = format(ctx.trace_id, "032x")
                out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable lines for development; extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {
            k: v for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_")
        }
        if "trace_id" not in extra:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                extra["trace_id"] = format(ctx.trace_id, "032x")
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def _iso(created: float) -> str:
    secs = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + (
        f".{int((created - secs) * 1000):03d}Z"
    )


def parse_level(name: str, what: str = "telemetry.log_level") -> int:
    level = logging.getLevelName(name.strip().upper())
    if not isinstance(level, int):
        raise ConfigError("<settings>", what,
                          f"{name!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


class RepeatFilter(logging.Filter):
    """At most one line per `interval` seconds for each message of the OpenTelemetry SDK's own
    loggers; the next one that passes carries `suppressed`, the number dropped.

    Some SDK warnings come once per span: the BatchSpanProcessor logs "Queue full, dropping
    span." for every span it drops while an exporter is stuck (OTEL_BSP_MAX_QUEUE_SIZE), which
    at a few thousand checks a second would flood stderr.
    """

    def __init__(self, interval: float = 60.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        # (logger, message template) -> when last let through / how many dropped since: bounded
        # by the SDK's source, since the template is not the formatted message.
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("opentelemetry"):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.suppressed = dropped
        return True


def configure_logging(settings: Settings, stream: Any = None) -> None:
    """Send the root logger to stderr as JSON (or text) at `telemetry.log_level`.

    Idempotent: replaces the handler installed by an earlier call, leaves others alone.
    Repeated OpenTelemetry SDK messages pass at most once a minute (`RepeatFilter`).
    """
    tele = settings.telemetry
    level = parse_level(tele.log_level)
    parse_level(tele.deny_log_level, "telemetry.deny_log_level")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _handler_marker, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _handler_marker, True)
    handler.setFormatter(JsonFormatter() if tele.log_format == "json" else TextFormatter())
    handler.addFilter(RepeatFilter())
    root.addHandler(handler)
    root.setLevel(level)


class DenySampler:
    """At most `rate` lines per second (burst `max(1, rate)`), counting the ones dropped.

    rate <= 0 turns the deny line off.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens", "suppressed")

    def __init__(self, rate: float, clock: Any = time.monotonic) -> None:
        self._rate = rate
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._last = clock()
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if self._rate <= 0:
            return False
        tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        self.suppressed += 1
        return False


# ---- effective configuration -------------------------------------------------------------


def mask_url(url: str) -> str:
    """Hide the password in a URL's userinfo and secret-looking query values."""
    return redact_url(url)


def masked(value: Any, key: str = "") -> Any:
    """A JSON-able copy of settings (dataclasses, mappings, sequences) with secrets masked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: masked(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v, key) for v in value]
    if isinstance(value, str):
        name = key.lower()
        if name in SECRET_FIELDS or name.endswith(("_password", "_secret", "_token")):
            return MASK if value else ""
        return mask_url(value)
    return value


def log_effective_config(
    settings: Settings, telemetry: Telemetry | None = None, logger: logging.Logger | None = None,
    level: int = logging.INFO,
) -> None:
    """One line (INFO unless `level` says otherwise) with the effective settings (and
    telemetry setup), secrets masked."""
    log = logger or logging.getLogger("authz.config")
    if not log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"settings": masked(settings)}
    if telemetry is not None:
        fields["telemetry"] = telemetry.describe()
    log.log(level, "effective configuration", extra=fields)
