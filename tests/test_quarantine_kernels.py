"""Per-meter plausibility in the kernels: max_kw × interval bounds a counter step, NaN/Infinity never
reach a bucket; the kernel equals the plain-Python reference with the bound and non-finite values."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from compute.kernels import (
    BUCKET_MS,
    F_IMPLAUSIBLE,
    bucket_energy,
    event_counts,
    rollup_sites,
)
from compute.reference import bucket_energy_ref
from edge.wire import Quality

T0 = 1_793_001_600_000  # a 15-minute boundary (2026-10-26T08:00Z), epoch ms
MIN = 60_000


def test_jump_beyond_max_kw_is_implausible_and_counts_nothing() -> None:
    # 100 kW meter, one reading a minute: at most 100/60 kWh per interval. The third step is a
    # 1e6 kWh spike; the counter then goes on from where the spike left it.
    ts = np.array([T0 + k * MIN for k in range(5)], dtype=np.int64)
    value = np.array([10.0, 11.0, 12.5, 1e6 + 12.5, 1e6 + 13.5])
    e = bucket_energy(ts, value, max_kw=100.0)
    assert e.interval_flags.tolist() == [0, 0, F_IMPLAUSIBLE, 0]
    assert e.kwh.sum() == 1.0 + 1.5 + 1.0
    assert event_counts(e.interval_flags)["implausible"] == 1
    # Not measured: coverage leaves the held-back minute out.
    assert int(e.measured_ms.sum()) == 3 * MIN
    # Without a bound the same step is counted (only the bridge's physical bounds applied).
    assert bucket_energy(ts, value).kwh.sum() == 1e6 + 3.5


def test_bound_is_max_kw_times_the_interval() -> None:
    ts = np.array([T0, T0 + 15 * MIN, T0 + 30 * MIN], dtype=np.int64)
    # 50 kW for 15 minutes is 12.5 kWh: exactly at the bound is plausible, a bit more is not.
    at = bucket_energy(ts, np.array([0.0, 12.5, 25.0]), max_kw=50.0)
    assert at.interval_flags.tolist() == [0, 0] and at.kwh.sum() == 25.0
    over = bucket_energy(ts, np.array([0.0, 12.5, 25.01]), max_kw=50.0)
    assert over.interval_flags.tolist() == [0, F_IMPLAUSIBLE] and over.kwh.sum() == 12.5


def test_a_float32_counter_tick_is_not_a_jump() -> None:
    # A float32 register at 1e7 kWh moves in steps of 1 kWh (IEEE 754 binary32: 24-bit significand),
    # far more than 100 kW can add in a second; the tick is plausible, two ticks are not.
    at = float(np.float32(1e7))
    tick = float(np.spacing(np.float32(at)))
    assert tick == 1.0
    ts = np.array([T0, T0 + 1000, T0 + 2000], dtype=np.int64)
    one = bucket_energy(ts, np.array([at, at + tick, at + tick]), max_kw=100.0)
    assert one.interval_flags.tolist() == [0, 0]
    two = bucket_energy(ts, np.array([at, at + 2 * tick, at + 2 * tick]), max_kw=100.0)
    assert two.interval_flags.tolist() == [F_IMPLAUSIBLE, 0]


def test_wrap_and_reset_are_bounded_too() -> None:
    ts = np.array([T0, T0 + MIN, T0 + 2 * MIN], dtype=np.int64)
    q = np.array([0, int(Quality.COUNTER_RESET), 0], dtype=np.int64)
    # After a reset the energy is the new value: 5000 kWh in a minute is not a 100 kW meter.
    e = bucket_energy(ts, np.array([900.0, 5000.0, 5001.0]), q, max_kw=100.0)
    assert e.interval_flags.tolist() == [F_IMPLAUSIBLE, 0]
    wrap = bucket_energy(ts, np.array([99_999.0, 50.0, 51.0]), counter_max=100_000.0, max_kw=100.0)
    assert wrap.interval_flags.tolist() == [F_IMPLAUSIBLE, 0]


def test_nan_and_infinity_never_reach_a_bucket() -> None:
    ts = np.array([T0 + k * MIN for k in range(7)], dtype=np.int64)
    value = np.array([1.0, 2.0, math.nan, 3.0, math.inf, -math.inf, 4.0])
    for max_kw in (0.0, 1e9):
        e = bucket_energy(ts, value, max_kw=max_kw)
        assert np.all(np.isfinite(e.kwh)) and np.all(np.isfinite(e.kwh_estimated))
        assert e.interval_flags.tolist() == [0] + [F_IMPLAUSIBLE] * 5
        assert e.kwh.sum() == 1.0


def test_the_batch_kernel_applies_the_bound_per_meter() -> None:
    ts = np.array([T0, T0 + MIN, T0 + 2 * MIN] * 2, dtype=np.int64)
    value = np.array([0.0, 1.0, 500.0, 0.0, 1.0, math.nan])
    kwh, est = rollup_sites(
        np.array([0, 3, 6], dtype=np.int64),
        np.array([0, 1], dtype=np.int64),
        2,
        ts,
        value,
        np.zeros(6, dtype=np.int64),
        np.zeros(2),
        np.zeros(2, dtype=np.int64),
        BUCKET_MS,
        T0,
        1,
        np.array([100.0, 0.0]),
    )
    assert kwh.tolist() == [[1.0], [1.0]] and np.all(np.isfinite(est))


@st.composite
def series(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    n = draw(st.integers(0, 40))
    gaps = draw(st.lists(st.integers(1, 3 * BUCKET_MS), min_size=max(n - 1, 0), max_size=max(n - 1, 0)))
    ts = np.array([T0 + sum(gaps[:i]) for i in range(n)], dtype=np.int64)
    steps = draw(
        st.lists(
            st.one_of(
                st.floats(0, 100, allow_nan=False),
                st.floats(-50, 1e7, allow_nan=False),
                st.sampled_from([math.nan, math.inf, -math.inf]),
            ),
            min_size=n,
            max_size=n,
        )
    )
    value = np.cumsum(np.nan_to_num(steps, nan=0.0, posinf=0.0, neginf=0.0))
    for i, s in enumerate(steps):
        if not math.isfinite(s):
            value[i] = s
    bits = [0, 0, 0, int(Quality.ESTIMATED), int(Quality.COUNTER_RESET), int(Quality.METER_REPLACED)]
    quality = np.array(draw(st.lists(st.sampled_from(bits), min_size=n, max_size=n)), dtype=np.int64)
    return ts, value, quality, draw(st.sampled_from([0.0, 1e4])), draw(st.sampled_from([0.0, 10.0, 400.0]))


@settings(max_examples=300, deadline=None)
@given(series())
def test_kernel_equals_reference_with_bounds_and_non_finite_values(
    s: tuple[np.ndarray, np.ndarray, np.ndarray, float, float],
) -> None:
    ts, value, quality, cmax, max_kw = s
    got = bucket_energy(ts, value, quality, counter_max=cmax, max_gap_ms=BUCKET_MS, max_kw=max_kw)
    ref = bucket_energy_ref(
        ts.tolist(),
        value.tolist(),
        quality.tolist(),
        counter_max=cmax,
        max_gap_ms=BUCKET_MS,
        max_kw=max_kw,
    )
    assert got.interval_flags.tolist() == ref.interval_flags
    assert got.flags.tolist() == ref.flags
    assert got.measured_ms.tolist() == ref.measured_ms
    assert np.all(np.isfinite(got.kwh)) and np.all(np.isfinite(got.kwh_estimated))
    assert np.allclose(got.kwh, ref.kwh, rtol=1e-9, atol=1e-6)
    # An implausible interval is never also estimated energy.
    assert all(f == F_IMPLAUSIBLE for f in got.interval_flags.tolist() if f & F_IMPLAUSIBLE)
