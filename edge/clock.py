"""Helpers around the shared simulated clock (``ops.settings.ClockSettings``)."""

from __future__ import annotations

from datetime import datetime

from ops.settings import ClockSettings


def now_ms(clock: ClockSettings) -> datetime:
    """The clock's now truncated to whole milliseconds: the precision readings are stamped with."""
    now = clock.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def wall_seconds_until(clock: ClockSettings, sim_t: datetime) -> float:
    """Wall seconds to wait until the simulated clock reaches ``sim_t`` (0 if already past)."""
    return max(0.0, (sim_t - clock.now()).total_seconds() / clock.speed)
