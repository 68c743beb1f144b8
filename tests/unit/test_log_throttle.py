"""ThrottledLog: the first occurrence at once, then one counted summary per second."""

from __future__ import annotations

import asyncio
import logging

import pytest

from authz.log_throttle import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_first_at_once_then_one_summary_per_second(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    t = ThrottledLog(logging.getLogger("t"), logging.WARNING, "bucket store failed", clock=clock)
    with caplog.at_level(logging.WARNING):
        t("down")  # written at once
        for i in range(2871):
            clock.now += 0.0003
            t(f"down {i}")
        assert lines(caplog) == ["bucket store failed: down"]
        clock.now = 101.5
        t("still down")  # the window has passed: the summary, then counting goes on
        assert lines(caplog)[1] == "bucket store failed x2871 in the last 2s: down 2870"
        assert caplog.records[1].count == 2871  # type: ignore[attr-defined]
    assert t.total == 2873


def test_quiet_period_resets(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    t = ThrottledLog(logging.getLogger("t"), logging.WARNING, "m", clock=clock)
    with caplog.at_level(logging.WARNING):
        t("a")
        clock.now += 5
        t("b")  # nothing was counted: written at once, no summary
    assert lines(caplog) == ["m: a", "m: b"]


async def test_summary_written_by_a_timer(caplog: pytest.LogCaptureFixture) -> None:
    t = ThrottledLog(logging.getLogger("t"), logging.WARNING, "m", interval=0.05)
    with caplog.at_level(logging.WARNING):
        t("a")
        t("b")
        t("c")
        await asyncio.sleep(0.2)  # no further occurrence: the timer writes the count
    assert lines(caplog) == ["m: a", "m x2 in the last 1s: c"]


def test_flush_writes_what_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    t = ThrottledLog(logging.getLogger("t"), logging.ERROR, "m", clock=clock)
    with caplog.at_level(logging.ERROR):
        t("a", exc_info=ValueError("x"))
        t("b")
        t.flush()
        t.flush()
    assert lines(caplog) == ["m: a", "m x1 in the last 1s: b"]
    assert caplog.records[0].exc_info is not None
