"""At most one log line per second for a warning that can repeat on every check.

During a Redis outage every check fails the same way: one line each was ~2,900 lines/s here,
which buries everything else and costs CPU when the service can least spare it. A
`ThrottledLog` writes the first occurrence at once (so it is seen immediately), counts the
ones that follow, and once a second writes one line with the count and the latest detail:

    bucket store failed: Redis did not answer within 50 ms ...
    bucket store failed x2871 in the last 1s: Redis did not answer within 50 ms ...

When a second passes with nothing new it goes quiet, and the next occurrence is written at
once again. The summary is written by a timer on the running event loop (or by the next
occurrence when there is no loop), so counts are never lost. Use from one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

# One line per second per message: enough to follow an incident in the log as it happens.
DEFAULT_INTERVAL = 1.0


class ThrottledLog:
    def __init__(self, logger: logging.Logger, level: int, message: str, *,
                 interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._level = level
        self._message = message
        self._interval = interval
        self._clock = clock
        self._window_end = -float("inf")  # until then, occurrences are counted
        self._window_start = 0.0
        self._count = 0
        self._last = ""
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0  # every occurrence, written or counted

    def __call__(self, detail: str, *, exc_info: Any = None) -> None:
        """One occurrence. `exc_info` (an exception or True) adds a traceback to the line
        written at once; counted occurrences only add to the summary."""
        self.total += 1
        now = self._clock()
        if now >= self._window_end:
            self._flush(now)
        if now < self._window_end:
            self._count += 1
            self._last = detail
            self._arm()
            return
        self._logger.log(self._level, "%s: %s", self._message, detail, exc_info=exc_info)
        self._window_start = now
        self._window_end = now + self._interval

    def flush(self) -> None:
        """Write the pending summary now (e.g. at shutdown)."""
        self._flush(self._clock(), force=True)

    def _flush(self, now: float, *, force: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._count:
            return
        if not force and now < self._window_end:
            return
        elapsed = max(now, self._window_end) - self._window_start
        self._logger.log(self._level, "%s x%d in the last %.0fs: %s", self._message,
                         self._count, max(1.0, elapsed), self._last,
                         extra={"count": self._count})
        self._count = 0
        # A new window starts now: a steady stream gives one line per interval.
        self._window_start = now
        self._window_end = now + self._interval

    def _arm(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next occurrence writes the summary
        delay = max(0.0, self._window_end - self._clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._flush(self._clock(), force=True)
