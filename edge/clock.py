"""Helpers around the shared simulated clock (``ops.settings.ClockSettings``)."""

from __future__ import annotations

import time
from datetime import datetime

from ops.settings import ClockSettings


def pinned(clock: ClockSettings) -> ClockSettings:
    """A clock whose simulated start is anchored to a wall instant.

    ``ClockSettings.now()`` with ``sim_start`` set but no ``wall_start`` re-anchors on every call
    (time would stand still), so a process given only ``sim_start`` anchors it once, here.
    """
    if clock.sim_start is not None and clock.wall_start is None:
        return clock.model_copy(update={"wall_start": time.time()})
    return clock


def now_ms(clock: ClockSettings) -> datetime:
    """The clock's now truncated to whole milliseconds: the precision readings are stamped with."""
    now = clock.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def wall_seconds_until(clock: ClockSettings, sim_t: datetime) -> float:
    """Wall seconds to wait until the simulated clock reaches ``sim_t`` (0 if already past)."""
    return max(0.0, (sim_t - clock.now()).total_seconds() / clock.speed)
