"""Rate-limited warnings: a flood writes a few lines and a count (issue 11, item 6)."""

from __future__ import annotations

import logging

import pytest

from ops.ratelog import RateLimitedLog


def test_a_flood_of_warnings_writes_a_burst_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t.ratelog"), interval_s=60, burst=5, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.ratelog"):
        for i in range(100_000):
            limited.warning("schema", "DLQ schema: message %d", i)
        limited.warning("too_large", "DLQ too_large")  # another key has its own budget
        limited.flush()  # the window is still open: nothing to summarise yet
        assert len(caplog.records) == 6
        now[0] = 61.0
        limited.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:5] == [f"DLQ schema: message {i}" for i in range(5)]
    assert lines[6] == "schema: 99995 more warnings like the above in 60 s (not logged one by one)"
    assert len(lines) == 7  # too_large had nothing suppressed
