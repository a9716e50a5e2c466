"""Deterministic factory load profiles: the simulator's ground truth.

Power is piecewise constant on fixed steps of ``step_s`` seconds aligned to the Unix epoch, and
each step's value is an integer number of watts.  A step's value depends only on the profile's
parameters and the step index (noise is a hash of seed, meter key and step index, not a random
stream), so any instant can be evaluated in any order, in any process, and gives the same answer.

Because every step is an integer number of watts and times are integer microseconds, the energy
between any two instants is an exact integer in microjoules (``energy_uj``): energy over [a, c]
equals [a, b] + [b, c] bit for bit, and a counter derived from it never disagrees with itself.
``energy_kwh`` is that integer converted to kWh.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
UJ_PER_KWH = 3_600_000_000_000  # 1 kWh = 3.6e6 J = 3.6e12 uJ
# Full steps are summed in cached blocks of this many steps, so long ranges stay cheap.
_BLOCK_STEPS = 360


class _ProfileBase(BaseModel):
    """Parameters shared by every profile.  ``key`` (normally the meter id) and ``seed`` select
    the noise stream, so two meters with the same shape still differ."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = ""
    seed: int = 0
    step_s: Annotated[int, Field(ge=1, le=3600)] = 10
    noise: Annotated[float, Field(ge=0, le=0.5)] = 0.05  # +- fraction of the shape value
    utc_offset_hours: Annotated[float, Field(ge=-14, le=14)] = 8.0  # site local time (no DST)
    power_factor: Annotated[float, Field(gt=0, le=1)] = 0.92


class Shift(BaseModel):
    """A production shift in local hours; ``end_h`` may exceed 24 for a shift past midnight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start_h: Annotated[float, Field(ge=0, lt=24)]
    end_h: Annotated[float, Field(gt=0, le=48)]
    days: tuple[int, ...] = (0, 1, 2, 3, 4)  # weekday of the shift start, Monday = 0

    @model_validator(mode="after")
    def _check(self) -> Shift:
        if self.end_h <= self.start_h:
            raise ValueError(f"shift end_h {self.end_h} must be after start_h {self.start_h}")
        if any(not 0 <= d <= 6 for d in self.days):
            raise ValueError("shift days are weekdays 0 (Monday) .. 6 (Sunday)")
        return self


class Break(BaseModel):
    """A break inside shifts (local hour), when the line drops to ``break_fraction`` of peak."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start_h: Annotated[float, Field(ge=0, lt=24)]
    minutes: Annotated[float, Field(gt=0, le=240)]


_DEFAULT_SHIFTS = (Shift(start_h=8, end_h=16), Shift(start_h=16, end_h=24))
_DEFAULT_BREAKS = (Break(start_h=12, minutes=45), Break(start_h=19.5, minutes=30))


class ProductionProfile(_ProfileBase):
    """A production line: ``base_kw`` idle, ramping to ``peak_kw`` in shifts, dipping in breaks."""

    kind: Literal["production"] = "production"
    base_kw: Annotated[float, Field(ge=0)]
    peak_kw: Annotated[float, Field(gt=0)]
    shifts: tuple[Shift, ...] = _DEFAULT_SHIFTS
    breaks: tuple[Break, ...] = _DEFAULT_BREAKS
    ramp_minutes: Annotated[float, Field(ge=0, le=120)] = 20.0
    break_fraction: Annotated[float, Field(ge=0, le=1)] = 0.35

    @model_validator(mode="after")
    def _check(self) -> ProductionProfile:
        if self.peak_kw < self.base_kw:
            raise ValueError("peak_kw must be >= base_kw")
        return self


class HvacProfile(_ProfileBase):
    """HVAC/chillers: load follows outdoor temperature (daily and seasonal curves) above a
    balance point, plus extra load while the plant is occupied."""

    kind: Literal["hvac"] = "hvac"
    base_kw: Annotated[float, Field(ge=0)]
    peak_kw: Annotated[float, Field(gt=0)]
    annual_mean_c: float = 22.5  # Shenzhen
    annual_amplitude_c: float = 6.5
    daily_amplitude_c: float = 4.0
    hottest_hour: Annotated[float, Field(ge=0, lt=24)] = 15.0
    balance_point_c: float = 18.0
    design_c: float = 35.0  # outdoor temperature at which the plant runs at peak
    occupied_from_h: Annotated[float, Field(ge=0, le=24)] = 7.0
    occupied_to_h: Annotated[float, Field(ge=0, le=24)] = 24.0
    occupied_boost: Annotated[float, Field(ge=0, le=1)] = 0.25  # fraction of (peak - base)

    @model_validator(mode="after")
    def _check(self) -> HvacProfile:
        if self.peak_kw < self.base_kw:
            raise ValueError("peak_kw must be >= base_kw")
        if self.design_c <= self.balance_point_c:
            raise ValueError("design_c must be above balance_point_c")
        return self


class CompressorProfile(_ProfileBase):
    """A load/unload air compressor: ``peak_kw`` loaded, ``base_kw`` unloaded; the loaded share of
    each cycle follows air demand, which is high in production shifts and low otherwise."""

    kind: Literal["compressor"] = "compressor"
    base_kw: Annotated[float, Field(ge=0)]
    peak_kw: Annotated[float, Field(gt=0)]
    cycle_s: Annotated[int, Field(ge=20, le=3600)] = 120
    demand_in_shift: Annotated[float, Field(ge=0, le=1)] = 0.7
    demand_off_shift: Annotated[float, Field(ge=0, le=1)] = 0.15
    shifts: tuple[Shift, ...] = _DEFAULT_SHIFTS

    @model_validator(mode="after")
    def _check(self) -> CompressorProfile:
        if self.peak_kw < self.base_kw:
            raise ValueError("peak_kw must be >= base_kw")
        return self


LoadProfile = ProductionProfile | HvacProfile | CompressorProfile
ProfileSpec = Annotated[LoadProfile, Field(discriminator="kind")]


# --- shape functions: local time in, kW out (no noise) ------------------------------------------


def _local(profile: _ProfileBase, t_s: float) -> tuple[int, float]:
    """(days since epoch in local time, local hour of day) for Unix seconds ``t_s``."""
    local = t_s + profile.utc_offset_hours * 3600.0
    day = math.floor(local / 86400.0)
    return day, (local - day * 86400.0) / 3600.0


def _weekday(day: int) -> int:
    return (day + 3) % 7  # 1970-01-01 was a Thursday


def _in_shift(shifts: tuple[Shift, ...], day: int, hour: float) -> float | None:
    """Hours since the start of the shift running at (day, hour), or None outside shifts."""
    for shift in shifts:
        # A shift that started yesterday may still be running (end_h > 24).
        for start_day, h in ((day, hour), (day - 1, hour + 24.0)):
            if _weekday(start_day) in shift.days and shift.start_h <= h < shift.end_h:
                return h - shift.start_h
    return None


def _production_kw(p: ProductionProfile, t_s: float) -> float:
    day, hour = _local(p, t_s)
    for shift in p.shifts:
        for start_day, h in ((day, hour), (day - 1, hour + 24.0)):
            if _weekday(start_day) not in shift.days or not shift.start_h <= h < shift.end_h:
                continue
            ramp_h = p.ramp_minutes / 60.0
            level = 1.0
            if ramp_h > 0:
                level = min(1.0, (h - shift.start_h) / ramp_h, (shift.end_h - h) / ramp_h)
            for brk in p.breaks:
                into = (hour - brk.start_h) % 24.0
                if into < brk.minutes / 60.0:
                    level = min(level, p.break_fraction)
            return p.base_kw + (p.peak_kw - p.base_kw) * max(0.0, level)
    return p.base_kw


def _outdoor_c(p: HvacProfile, t_s: float) -> float:
    day, hour = _local(p, t_s)
    day_of_year = day % 365.2425
    seasonal = p.annual_mean_c + p.annual_amplitude_c * math.cos(2 * math.pi * (day_of_year - 200) / 365.2425)
    return seasonal + p.daily_amplitude_c * math.cos(2 * math.pi * (hour - p.hottest_hour) / 24.0)


def _hvac_kw(p: HvacProfile, t_s: float) -> float:
    _, hour = _local(p, t_s)
    cooling = (_outdoor_c(p, t_s) - p.balance_point_c) / (p.design_c - p.balance_point_c)
    level = min(1.0, max(0.0, cooling))
    if p.occupied_from_h <= hour < p.occupied_to_h:
        level = min(1.0, level + p.occupied_boost)
    return p.base_kw + (p.peak_kw - p.base_kw) * level


def _compressor_kw(p: CompressorProfile, t_s: float) -> float:
    day, hour = _local(p, t_s)
    demand = p.demand_in_shift if _in_shift(p.shifts, day, hour) is not None else p.demand_off_shift
    phase = (t_s % p.cycle_s) / p.cycle_s
    return p.peak_kw if phase < demand else p.base_kw


def _shape_kw(profile: LoadProfile, t_s: float) -> float:
    if isinstance(profile, ProductionProfile):
        return _production_kw(profile, t_s)
    if isinstance(profile, HvacProfile):
        return _hvac_kw(profile, t_s)
    return _compressor_kw(profile, t_s)


# --- exact, random-access power and energy -------------------------------------------------------


def unit_noise(seed: int, key: str, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, key, index): random access."""
    digest = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def step_power_w(profile: LoadProfile, step: int) -> int:
    """Power in whole watts during step ``step`` (steps of ``step_s`` counted from the epoch)."""
    shape = _shape_kw(profile, float(step * profile.step_s))
    factor = 1.0 + profile.noise * (2.0 * unit_noise(profile.seed, profile.key, step) - 1.0)
    return max(0, round(shape * factor * 1000.0))


def to_us(t: datetime) -> int:
    """Integer microseconds since the epoch; naive datetimes are refused (they hide bugs)."""
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return (t - EPOCH) // _US


def power_w(profile: LoadProfile, t: datetime) -> int:
    return step_power_w(profile, to_us(t) // (profile.step_s * 1_000_000))


def power_kw(profile: LoadProfile, t: datetime) -> float:
    """Instantaneous active power at ``t`` (constant over each step)."""
    return power_w(profile, t) / 1000.0


@lru_cache(maxsize=200_000)
def _block_uj(profile: LoadProfile, block: int) -> int:
    step_us = profile.step_s * 1_000_000
    first = block * _BLOCK_STEPS
    return sum(step_power_w(profile, k) for k in range(first, first + _BLOCK_STEPS)) * step_us


def _steps_uj(profile: LoadProfile, k0: int, k1: int) -> int:
    """Energy of whole steps k0 .. k1-1."""
    step_us = profile.step_s * 1_000_000
    total = 0
    k = k0
    while k < k1:
        if k % _BLOCK_STEPS == 0 and k + _BLOCK_STEPS <= k1:
            total += _block_uj(profile, k // _BLOCK_STEPS)
            k += _BLOCK_STEPS
        else:
            total += step_power_w(profile, k) * step_us
            k += 1
    return total


def energy_uj(profile: LoadProfile, t0: datetime, t1: datetime) -> int:
    """Exact energy in microjoules (W*us) drawn in [t0, t1]; negative if t1 < t0."""
    us0, us1 = to_us(t0), to_us(t1)
    if us1 < us0:
        return -energy_uj(profile, t1, t0)
    step_us = profile.step_s * 1_000_000
    k0, k1 = us0 // step_us, us1 // step_us
    if k0 == k1:
        return step_power_w(profile, k0) * (us1 - us0)
    head = step_power_w(profile, k0) * ((k0 + 1) * step_us - us0)
    tail = step_power_w(profile, k1) * (us1 - k1 * step_us)
    return head + _steps_uj(profile, k0 + 1, k1) + tail


def energy_kwh(profile: LoadProfile, t0: datetime, t1: datetime) -> float:
    """Energy in kWh drawn in [t0, t1] (``energy_uj`` converted; exact up to float rounding)."""
    return energy_uj(profile, t0, t1) / UJ_PER_KWH
