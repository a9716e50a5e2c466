"""Counter sanity at the source: a cumulative register that goes down is flagged, never hidden.

A decrease is one of three things, told apart by what the gateway can see:

* wrap -- the previous value was near the register's rollover and the new one is near zero;
* meter replaced -- the meter's serial number changed, or the counter restarted from a value
  that is not near zero (a refurbished meter's reading);
* reset -- the counter restarted near zero with the same serial (someone cleared it).

An increase larger than ``max_power_w`` can explain is a spike (bad read, bit flip): it is sent
flagged OUT_OF_RANGE and does not become the baseline, so the next good value is not mistaken for
a reset.  The state survives restarts (stored in the outbox file) so a reset while the agent was
down is still seen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime

from edge.wire import Quality

# Near zero: below this share of the rollover, or below this many units, a restart is a reset.
RESET_MAX_UNITS = 10.0
WRAP_NEAR = 0.1  # previous value within the top 10 % of the range and new within the bottom 10 %
SPIKE_TOLERANCE = 2.0  # increases up to twice max_power_w * elapsed time are plausible


@dataclass
class CounterState:
    value: float
    ts: datetime
    serial: int | None = None


class CounterGuard:
    """Per (meter, quantity) last good counter value; ``check`` returns the quality bits."""

    def __init__(self, states: dict[str, CounterState] | None = None) -> None:
        self.states: dict[str, CounterState] = states or {}

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
            elapsed = max((ts - prev.ts).total_seconds(), 1.0)
            if max_rate_per_s is not None and delta > SPIKE_TOLERANCE * max_rate_per_s * elapsed:
                return Quality.OUT_OF_RANGE  # the baseline stays: the next good value is compared to it
            self.states[key] = CounterState(value, ts, serial)
            return Quality.GOOD
        self.states[key] = CounterState(value, ts, serial)
        near_top = prev.value >= (1 - WRAP_NEAR) * wraps_at
        if math.isfinite(wraps_at) and near_top and value <= WRAP_NEAR * wraps_at:
            return Quality.COUNTER_WRAP
        if value <= RESET_MAX_UNITS:
            return Quality.COUNTER_RESET
        return Quality.METER_REPLACED

    def dumps(self) -> str:
        return json.dumps(
            {k: [s.value, s.ts.isoformat(), s.serial] for k, s in self.states.items()}, sort_keys=True
        )

    @classmethod
    def loads(cls, text: str | None) -> CounterGuard:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls({k: CounterState(v, datetime.fromisoformat(t), s) for k, (v, t, s) in raw.items()})
