"""Counter sanity at the source: a cumulative register that goes down is flagged, never hidden,
and one bad read never becomes the baseline.

The baseline is always the last plausible reading.  A reading below it is one of:

* wrap -- the baseline was near the register's rollover and the new value is near zero;
* glitch -- a dip of at most ``tolerance`` units (a bad read, a meter rounding differently):
  flagged OUT_OF_RANGE, the baseline is held;
* a drop -- larger than the tolerance.  One read is not enough to tell a bad read from a new
  counter, so the drop is flagged OUT_OF_RANGE with the baseline held until ``confirmations``
  consecutive reads agree (each at or above the previous one, all below the baseline).  The
  confirming read is flagged COUNTER_RESET when the counter restarted near zero, METER_REPLACED
  otherwise (a refurbished meter's reading), and becomes the new baseline.  A read back at or above
  the baseline cancels the suspicion: the drop was a glitch.
* meter replaced at once -- when the meter's serial number changed.

An increase larger than ``max_power_w`` can explain is a spike: flagged OUT_OF_RANGE, the baseline
is held.  The state survives restarts (stored in the outbox file) so a reset while the agent was
down is still seen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime

from edge.wire import Quality

# Near zero: below this many units a confirmed restart is a reset, not a replacement.
RESET_MAX_UNITS = 10.0
WRAP_NEAR = 0.1  # previous value within the top 10 % of the range and new within the bottom 10 %
SPIKE_TOLERANCE = 2.0  # increases up to twice max_power_w * elapsed time are plausible


@dataclass
class CounterState:
    value: float  # the baseline: the last plausible reading
    ts: datetime
    serial: int | None = None
    pending: list[float] = field(default_factory=list)  # consecutive reads of an unconfirmed drop


class CounterGuard:
    """Per (meter, quantity) baseline; ``check`` returns the quality bits of a new reading."""

    def __init__(
        self,
        states: dict[str, CounterState] | None = None,
        *,
        tolerance: float = 1.0,
        confirmations: int = 3,
    ) -> None:
        self.states: dict[str, CounterState] = states or {}
        self.tolerance = tolerance
        self.confirmations = confirmations

    def check(
        self,
        key: str,
        value: float,
        ts: datetime,
        *,
        wraps_at: float = math.inf,
        serial: int | None = None,
        max_rate_per_s: float | None = None,
    ) -> Quality:
        prev = self.states.get(key)
        if prev is None:
            self.states[key] = CounterState(value, ts, serial)
            return Quality.GOOD
        if serial is not None and prev.serial is not None and serial != prev.serial:
            self.states[key] = CounterState(value, ts, serial)
            return Quality.METER_REPLACED
        serial = serial if serial is not None else prev.serial
        delta = value - prev.value
        if delta >= 0:
            prev.pending.clear()  # back at the baseline: any suspected drop was a glitch
            elapsed = max((ts - prev.ts).total_seconds(), 1.0)
            if max_rate_per_s is not None and delta > SPIKE_TOLERANCE * max_rate_per_s * elapsed:
                return Quality.OUT_OF_RANGE  # the baseline stays: the next good value is compared to it
            self.states[key] = CounterState(value, ts, serial)
            return Quality.GOOD
        near_top = prev.value >= (1 - WRAP_NEAR) * wraps_at
        if math.isfinite(wraps_at) and near_top and value <= WRAP_NEAR * wraps_at:
            self.states[key] = CounterState(value, ts, serial)
            return Quality.COUNTER_WRAP
        if -delta <= self.tolerance:
            return Quality.OUT_OF_RANGE  # a glitch: flagged, baseline held
        if prev.pending and value < prev.pending[-1]:
            prev.pending.clear()  # not a counter running on from a new level: start over
        prev.pending.append(value)
        if len(prev.pending) < self.confirmations:
            return Quality.OUT_OF_RANGE
        start = prev.pending[0]
        self.states[key] = CounterState(value, ts, serial)
        return Quality.COUNTER_RESET if start <= RESET_MAX_UNITS else Quality.METER_REPLACED

    def dumps(self) -> str:
        return json.dumps(
            {k: [s.value, s.ts.isoformat(), s.serial, s.pending] for k, s in self.states.items()},
            sort_keys=True,
        )

    @classmethod
    def loads(cls, text: str | None) -> CounterGuard:
        if not text:
            return cls()
        states: dict[str, CounterState] = {}
        for key, (value, ts, serial, *rest) in json.loads(text).items():
            states[key] = CounterState(
                value, datetime.fromisoformat(ts), serial, list(rest[0]) if rest else []
            )
        return cls(states)
