"""Helpers around the shared simulated clock (``ops.settings.ClockSettings``) and the checks that
keep readings with an implausible gateway time out of the data."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from edge.wire import EARLIEST_TS, LATEST_TS
from ops.settings import ClockSettings


def now_ms(clock: ClockSettings) -> datetime:
    """The clock's now truncated to whole milliseconds: the precision readings are stamped with."""
    now = clock.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def wall_seconds_until(clock: ClockSettings, sim_t: datetime) -> float:
    """Wall seconds to wait until the simulated clock reaches ``sim_t`` (0 if already past)."""
    return max(0.0, (sim_t - clock.now()).total_seconds() / clock.speed)


# --- Gateway clock health ----------------------------------------------------------------------
# Gateways often have no RTC battery and no NTP through the factory firewall; their clock is the
# only time stamp readings get, so it is measured against a reference the gateway can reach
# anyway: the Date header of an HTTP(S) server (the htpdate technique; 1 s resolution, which is
# far below the 300 s the agent tolerates).


def measure_http_offset(url: str, now: Callable[[], datetime], timeout_s: float = 5.0) -> float:
    """Reference minus gateway clock in seconds, from one HEAD request's Date header.

    The Date header is truncated to the second, so its midpoint (+0.5 s) is compared with the
    midpoint of the request on the gateway clock.
    """
    request = urllib.request.Request(url, method="HEAD")
    before = now()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            date = resp.headers.get("Date")
    except urllib.error.HTTPError as exc:  # any answer carries a Date
        date = exc.headers.get("Date")
    after = now()
    if not date:
        raise ValueError(f"{url}: no Date header")
    reference = parsedate_to_datetime(date) + timedelta(seconds=0.5)
    local = before + (after - before) / 2
    return (reference - local).total_seconds()


@dataclass
class ClockCheck:
    """Decides which readings are plausible in time; keeps the newest accepted ts per meter."""

    max_offset_s: float
    offset_s: float | None = None  # last measured reference - gateway offset
    last_ts: dict[str, datetime] = field(default_factory=dict)

    def verdict(self, meter_id: str, ts: datetime) -> str | None:
        """None if the reading may be sent, else the quarantine reason."""
        if not EARLIEST_TS <= ts < LATEST_TS:
            return "outside_wire_window"
        if self.offset_s is not None and abs(self.offset_s) > self.max_offset_s:
            return "clock_offset"
        last = self.last_ts.get(meter_id)
        if last is not None and ts <= last:
            return "clock_went_back"
        return None

    def accept(self, meter_id: str, ts: datetime) -> None:
        self.last_ts[meter_id] = ts

    def dumps(self) -> str:
        return json.dumps({k: v.isoformat() for k, v in self.last_ts.items()}, sort_keys=True)

    def load(self, text: str | None) -> None:
        if text:
            self.last_ts = {k: datetime.fromisoformat(v) for k, v in json.loads(text).items()}
