"""Rate-limited warnings: a flood of the same warning writes a few lines and a count, not a line each.

A client can make a process warn once per message it sends; 100k junk messages must not become
100k log lines (disk, log shipping, and the operator's attention). Per key (e.g. a DLQ reason), the
first ``burst`` warnings of each ``interval_s`` window are logged; the rest are counted, and the
count is logged when the window closes (on the next warning of that key or on ``flush``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 60.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._burst = burst
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self._interval:
            if window is not None:
                self._summarise(key, window)
            window = self._windows[key] = _Window(now)
        if window.logged < self._burst:
            window.logged += 1
            self._log.warning(msg, *args)
        else:
            window.suppressed += 1

    def flush(self) -> None:
        """Log the counts of windows that have closed; call it now and then (cheap)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if now - window.start >= self._interval:
                self._summarise(key, window)
                del self._windows[key]

    def _summarise(self, key: str, window: _Window) -> None:
        if window.suppressed:
            self._log.warning(
                "%s: %d more warnings like the above in %.0f s (not logged one by one)",
                key, window.suppressed, self._interval,
            )  # fmt: skip
