"""The load profiles are the simulator's ground truth: they must be exact, additive and realistic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from simulators.loadprofile import (
    UJ_PER_KWH,
    CompressorProfile,
    HvacProfile,
    LoadProfile,
    ProductionProfile,
    energy_kwh,
    energy_uj,
    power_kw,
    power_w,
    step_power_w,
)

T0 = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday, 08:00 in Shenzhen
PROFILES: list[LoadProfile] = [
    ProductionProfile(key="line", seed=1, base_kw=40, peak_kw=180),
    HvacProfile(key="hvac", seed=2, base_kw=60, peak_kw=220),
    CompressorProfile(key="comp", seed=3, base_kw=5, peak_kw=75),
]
# Offsets in microseconds within ~3 days, so ranges cross steps, cached blocks, shifts and days.
offsets = st.integers(min_value=0, max_value=3 * 86_400 * 1_000_000)


def at(us: int) -> datetime:
    return T0 + timedelta(microseconds=us)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.kind)
@settings(max_examples=60, deadline=None)
@given(a=offsets, b=offsets, c=offsets)
def test_energy_is_exactly_additive(profile: LoadProfile, a: int, b: int, c: int) -> None:
    a, b, c = sorted((a, b, c))
    assert energy_uj(profile, at(a), at(c)) == energy_uj(profile, at(a), at(b)) + energy_uj(
        profile, at(b), at(c)
    )
    assert energy_uj(profile, at(c), at(a)) == -energy_uj(profile, at(a), at(c))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.kind)
@settings(max_examples=30, deadline=None)
@given(a=offsets, length_us=st.integers(min_value=0, max_value=2 * 3600 * 1_000_000))
def test_energy_matches_integrating_power(profile: LoadProfile, a: int, length_us: int) -> None:
    """Independent check: walk the range instant by instant, using power_w at each piece's start."""
    t0, t1 = at(a), at(a + length_us)
    step = timedelta(seconds=profile.step_s)
    total, t = 0, t0
    while t < t1:
        boundary = T0 + ((t - T0) // step + 1) * step  # T0 is step-aligned
        end = min(boundary, t1)
        total += power_w(profile, t) * ((end - t) // timedelta(microseconds=1))
        t = end
    assert energy_uj(profile, t0, t1) == total
    assert energy_kwh(profile, t0, t1) == pytest.approx(total / UJ_PER_KWH, rel=1e-12, abs=1e-15)


def test_power_is_random_access_and_seeded() -> None:
    p = PROFILES[0]
    steps = [1_786_000_000 // 10 + k for k in (5, 0, 3, 5)]
    assert [step_power_w(p, k) for k in steps] == [step_power_w(p, k) for k in steps]
    other_seed = p.model_copy(update={"seed": 99})
    assert [step_power_w(p, k) for k in range(100)] != [step_power_w(other_seed, k) for k in range(100)]
    assert power_kw(p, T0 + timedelta(hours=3)) == power_w(p, T0 + timedelta(hours=3)) / 1000


def test_production_follows_shifts_and_breaks() -> None:
    quiet = ProductionProfile(key="line", base_kw=40, peak_kw=180, noise=0)
    local = T0 - timedelta(hours=8)  # local midnight Monday (UTC+8)
    assert power_kw(quiet, local + timedelta(hours=3)) == 40  # night, no shift
    assert power_kw(quiet, local + timedelta(hours=10)) == 180  # mid shift
    assert 40 < power_kw(quiet, local + timedelta(hours=8, minutes=10)) < 180  # ramping up
    assert power_kw(quiet, local + timedelta(hours=12, minutes=10)) == pytest.approx(
        40 + 140 * 0.35, abs=0.001
    )
    assert power_kw(quiet, local + timedelta(days=6, hours=10)) == 40  # Sunday


def test_hvac_is_warmer_in_the_afternoon_and_in_summer() -> None:
    quiet = HvacProfile(key="hvac", base_kw=60, peak_kw=220, noise=0, occupied_boost=0)
    local = T0 - timedelta(hours=8)
    assert power_kw(quiet, local + timedelta(hours=15)) > power_kw(quiet, local + timedelta(hours=5))
    july = datetime(2026, 7, 20, 7, tzinfo=UTC)
    assert power_kw(quiet, july) > power_kw(quiet, local + timedelta(hours=15))


def test_compressor_cycles_between_load_and_unload() -> None:
    quiet = CompressorProfile(key="comp", base_kw=5, peak_kw=75, noise=0, cycle_s=120)
    in_shift = T0 + timedelta(hours=2)
    levels = [power_kw(quiet, in_shift + timedelta(seconds=10 * k)) for k in range(12)]
    assert set(levels) == {5.0, 75.0}
    assert levels.count(75.0) == 9  # steps whose start lies in the first 70 % of the cycle
    night = T0 + timedelta(hours=18)
    assert [power_kw(quiet, night + timedelta(seconds=10 * k)) for k in range(12)].count(75.0) == 2


def test_invalid_profiles_are_refused() -> None:
    with pytest.raises(ValidationError, match="peak_kw must be >= base_kw"):
        ProductionProfile(base_kw=100, peak_kw=50)
    with pytest.raises(ValidationError):
        CompressorProfile(base_kw=5, peak_kw=75, unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="timezone-aware"):
        power_w(PROFILES[0], datetime(2026, 1, 1))
