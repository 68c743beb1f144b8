"""JSON logs with trace ids, the sampled deny line, and the masked effective configuration."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from opentelemetry import trace

from authz.config.settings import ServerSettings, Settings, StoreSettings, TelemetrySettings
from authz.errors import ConfigError
from authz.telemetry import configure_logging, log_effective_config
from authz.telemetry.logs import DenySampler, RepeatFilter, mask_url
from tests.telemetry.conftest import (
    ALLOWED,
    PARENT_SPAN_ID,
    RATE_LIMITED,
    TOKEN,
    TRACE_ID,
    TRACEPARENT,
    UNAUTHENTICATED,
    MakeHarness,
    make_settings,
    request_headers,
)

pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def setup(settings: Settings) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    return stream


def test_json_lines_carry_the_current_trace_and_span_ids(make_harness: MakeHarness) -> None:
    h = make_harness()
    stream = setup(make_settings())
    log = logging.getLogger("authz.test")
    with h.telemetry.start_check(request_headers(traceparent=TRACEPARENT)) as scope:
        log.info("deciding", extra={"stage": "charge"})
        span_id = format(scope.span.get_span_context().span_id, "016x")  # type: ignore[union-attr]
        scope.finish(ALLOWED)
    log.warning("outside")
    inside, outside = lines(stream)
    assert inside["msg"] == "deciding" and inside["level"] == "INFO"
    assert inside["logger"] == "authz.test" and inside["stage"] == "charge"
    assert inside["trace_id"] == TRACE_ID
    assert inside["span_id"] == span_id != PARENT_SPAN_ID
    assert inside["ts"].endswith("Z")
    assert "trace_id" not in outside


def test_exceptions_are_one_json_line() -> None:
    stream = setup(make_settings())
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("authz.test").exception("failed")
    [line] = lines(stream)
    assert "ValueError: bad" in line["exc"]


def test_one_deny_line_per_deny_with_the_checks_trace_id(make_harness: MakeHarness) -> None:
    h = make_harness()
    stream = setup(make_settings())
    h.check(ALLOWED, request_headers(traceparent=TRACEPARENT))  # allows are not logged
    # The lead's server calls finish after leaving the `with` block: the ids still come along.
    scope = h.telemetry.start_check(request_headers(traceparent=TRACEPARENT))
    with scope:
        pass
    h.telemetry.finish_check(scope, RATE_LIMITED, "user-1", path="/v1/models/x:predict?key=k")
    [line] = [x for x in lines(stream) if x["logger"] == "authz.deny"]
    assert line["msg"] == "deny" and line["level"] == "INFO"
    assert line["outcome"] == "rate_limited" and line["status"] == 429
    assert line["plan"] == "free" and line["limit"] == "per-minute"
    assert line["path"] == "/v1/models/x:predict"  # never the query string
    assert line["trace_id"] == TRACE_ID
    assert len(line["subject_hash"]) == 16
    raw = stream.getvalue()
    assert "user-1" not in raw and TOKEN not in raw and "key=k" not in raw


def test_deny_lines_are_rate_limited_and_report_what_was_dropped(
    make_harness: MakeHarness,
) -> None:
    settings = make_settings(deny_log_rate=5.0)
    h = make_harness(settings)
    stream = setup(settings)
    for _ in range(200):
        h.check(UNAUTHENTICATED)
    denies = [x for x in lines(stream) if x["logger"] == "authz.deny"]
    # Burst of 5, plus whatever refilled while the loop ran (well under a second).
    assert 5 <= len(denies) <= 15
    # Every deny is still counted in the metrics.
    assert h.metrics()["authz.decisions"][0].value == 200


def test_deny_sampler_refills_and_counts_suppressed() -> None:
    s = DenySampler(2.0, clock=lambda: 0.0)
    assert [s.allow(0.0) for _ in range(4)] == [True, True, False, False]
    assert s.suppressed == 2
    assert s.allow(0.5)  # one token back after half a second at 2/s
    assert not s.allow(0.5)
    off = DenySampler(0.0, clock=lambda: 0.0)
    assert not off.allow(100.0)


def test_suppressed_count_appears_on_the_next_deny_line(make_harness: MakeHarness) -> None:
    settings = make_settings(deny_log_rate=1.0)
    h = make_harness(settings)
    stream = setup(settings)
    for _ in range(4):
        h.check(UNAUTHENTICATED)
    h.telemetry._deny_sampler._tokens = 1.0  # as if a second had passed
    h.check(UNAUTHENTICATED)
    first, second = [x for x in lines(stream) if x["logger"] == "authz.deny"]
    assert "suppressed" not in first
    assert second["suppressed"] == 3


def test_deny_level_below_the_log_level_writes_nothing(make_harness: MakeHarness) -> None:
    settings = make_settings(deny_log_level="DEBUG", log_level="INFO")
    h = make_harness(settings)
    stream = setup(settings)
    h.check(UNAUTHENTICATED)
    assert [x for x in lines(stream) if x["logger"] == "authz.deny"] == []


def test_deny_level_warning(make_harness: MakeHarness) -> None:
    settings = make_settings(deny_log_level="warning")
    h = make_harness(settings)
    stream = setup(settings)
    h.check(UNAUTHENTICATED)
    [line] = [x for x in lines(stream) if x["logger"] == "authz.deny"]
    assert line["level"] == "WARNING"


def test_text_format() -> None:
    stream = setup(make_settings(log_format="text"))
    tracer = trace.NoOpTracer()
    with tracer.start_as_current_span("x"):
        logging.getLogger("authz.test").info("hello", extra={"port": 9000})
    out = stream.getvalue()
    assert " INFO authz.test hello port=9000" in out
    assert not out.startswith("{")


def test_configure_logging_is_idempotent_and_validates_levels() -> None:
    setup(make_settings())
    stream = setup(make_settings())
    logging.getLogger("authz.test").info("once")
    assert len(lines(stream)) == 1
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_authz_handler", False)]
    assert len(ours) == 1
    with pytest.raises(ConfigError, match=r"telemetry\.log_level: 'chatty'"):
        configure_logging(make_settings(log_level="chatty"))


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:s3cret@redis.example.com:6380", "rediss://default:***@redis.example.com:6380"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
        ("https://TOKEN@idp.example.com/jwks", "https://***@idp.example.com/jwks"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_effective_configuration_is_logged_with_secrets_masked(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer abc123,x-tenant=t1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://user:pw@collector:4318")
    settings = Settings(
        server=ServerSettings(metrics_port=0),
        store=StoreSettings(redis_url="redis://:hunter2@redis:6379/0"),
        telemetry=TelemetrySettings(subject_salt="pepper-salt"),
    )
    h = make_harness(settings)
    stream = setup(settings)
    log_effective_config(settings, h.telemetry)
    raw = stream.getvalue()
    for secret in ("hunter2", "pepper-salt", "abc123", "t1", ":pw@"):
        assert secret not in raw
    [line] = lines(stream)
    assert line["msg"] == "effective configuration"
    assert line["settings"]["store"]["redis_url"] == "redis://:***@redis:6379/0"
    assert line["settings"]["telemetry"]["subject_salt"] == "***"
    assert line["settings"]["server"]["grpc_port"] == 9000
    tele = line["telemetry"]
    assert tele["OTEL_EXPORTER_OTLP_HEADERS"] == "authorization=***,x-tenant=***"
    assert tele["traces"]["enabled"] is True
    assert tele["service_name"] == "authz"


def test_deny_line_of_an_unsampled_caller_has_its_trace_id(make_harness: MakeHarness) -> None:
    h = make_harness()
    stream = setup(make_settings())
    h.check(RATE_LIMITED, request_headers(traceparent=f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"))
    [line] = [x for x in lines(stream) if x["logger"] == "authz.deny"]
    assert line["trace_id"] == TRACE_ID
    assert "span_id" not in line


def test_a_repeated_sdk_warning_is_written_once_a_minute() -> None:
    """The BatchSpanProcessor warns once per dropped span when its queue is full."""
    stream = setup(make_settings())
    sdk = logging.getLogger("opentelemetry.sdk.test")
    for _ in range(500):
        sdk.warning("Queue full, dropping %s.", "span")
    sdk.warning("something else")
    logging.getLogger("authz.test").warning("ours")
    logging.getLogger("authz.test").warning("ours")
    assert [x["msg"] for x in lines(stream)] == [
        "Queue full, dropping span.", "something else", "ours", "ours"]


def test_the_repeat_filter_counts_what_it_dropped() -> None:
    now = [0.0]
    f = RepeatFilter(60.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        return logging.LogRecord("opentelemetry.sdk.x", logging.WARNING, __file__, 1,
                                 "Queue full, dropping %s.", ("span",), None)

    assert f.filter(record())
    assert [f.filter(record()) for _ in range(3)] == [False, False, False]
    now[0] = 61.0
    passed = record()
    assert f.filter(passed)
    assert passed.suppressed == 3  # type: ignore[attr-defined]



def test_shadow_decisions_are_logged_and_counted_like_denials(make_harness: MakeHarness) -> None:
    """What shadow mode let through shows up where denials do: the sampled line (message
    "shadow", with the would-be reason) and the decision counts (outcome "shadow")."""
    from authz.decision import Decision, Outcome

    shadow = Decision(allowed=True, status=200, outcome=Outcome.SHADOW, reason="rate_limited",
                      plan="free", model="*", limit="per-minute")
    h = make_harness()
    stream = setup(make_settings())
    h.check(shadow)
    [line] = [x for x in lines(stream) if x["logger"] == "authz.deny"]
    assert (line["msg"], line["outcome"], line["reason"], line["limit"]) == (
        "shadow", "shadow", "rate_limited", "per-minute")
    [point] = h.metrics()["authz.decisions"]
    assert point.attributes["outcome"] == "shadow" and point.value == 1
