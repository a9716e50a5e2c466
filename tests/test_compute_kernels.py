"""Kernels vs. the plain-Python reference (hypothesis), conservation, and the counter edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute.kernels import (
    BUCKET_MS,
    EVENT_NAMES,
    F_DROP,
    F_GAP,
    F_REPLACED,
    F_RESET,
    F_WRAP,
    HOUR_MS,
    bucket_energy,
    bucket_energy_many,
    event_counts,
)
from compute.reference import bucket_energy_ref
from edge.wire import Quality

T_BASE = 1_793_000_000_000  # 2026-10-26 around midnight UTC, epoch ms
QUALITY_BITS = [
    0,
    0,
    0,
    0,
    int(Quality.ESTIMATED),
    int(Quality.COUNTER_WRAP),
    int(Quality.COUNTER_RESET),
    int(Quality.METER_REPLACED),
    int(Quality.ESTIMATED | Quality.COUNTER_RESET),
]


@st.composite
def counter_series(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    n = draw(st.integers(0, 60))
    counter_max = draw(st.sampled_from([0.0, 1e4, 99_999.9, 2.0**32]))
    max_gap_ms = draw(st.sampled_from([0, BUCKET_MS, HOUR_MS]))
    start = T_BASE + draw(st.integers(-3 * BUCKET_MS, 3 * BUCKET_MS))
    m = max(n - 1, 0)
    # Gaps from 0 ms (same-millisecond readings) to several buckets; some exactly on boundaries.
    gaps = draw(
        st.lists(
            st.one_of(st.integers(0, 5 * BUCKET_MS), st.sampled_from([BUCKET_MS, 60_000, 1])),
            min_size=m,
            max_size=m,
        )
    )
    limit = counter_max or 1e9
    values = draw(
        st.lists(
            st.one_of(
                st.floats(0, limit, allow_nan=False, exclude_max=True),
                st.floats(limit * 0.9, limit, allow_nan=False, exclude_max=True),  # near the top: wraps
                st.floats(0, limit * 0.1, allow_nan=False),
            ),
            min_size=n,
            max_size=n,
        )
    )
    # Mostly increasing, with drops where the draw says so.
    ordered = sorted(values)
    mix = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    value = np.array([o if k else v for o, v, k in zip(ordered, values, mix, strict=True)], dtype=np.float64)
    quality = np.array(draw(st.lists(st.sampled_from(QUALITY_BITS), min_size=n, max_size=n)), dtype=np.int64)
    ts = np.array([start, *(start + sum(gaps[: i + 1]) for i in range(m))][:n], dtype=np.int64)
    return ts, value, quality, counter_max, max_gap_ms


def _close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, scale))


@settings(max_examples=300, deadline=None)
@given(counter_series(), st.sampled_from([BUCKET_MS, HOUR_MS]))
def test_kernel_equals_reference(
    series: tuple[np.ndarray, np.ndarray, np.ndarray, float, int], bucket_ms: int
) -> None:
    ts, value, quality, cmax, gap = series
    got = bucket_energy(ts, value, quality, bucket_ms=bucket_ms, counter_max=cmax, max_gap_ms=gap)
    ref = bucket_energy_ref(
        ts.tolist(), value.tolist(), quality.tolist(), bucket_ms=bucket_ms, counter_max=cmax, max_gap_ms=gap
    )
    scale = float(np.abs(value).max()) if len(value) else 1.0
    assert got.starts.tolist() == ref.starts
    assert got.interval_flags.tolist() == ref.interval_flags
    assert got.flags.tolist() == ref.flags
    assert got.measured_ms.tolist() == ref.measured_ms
    assert all(_close(a, b, scale) for a, b in zip(got.kwh.tolist(), ref.kwh, strict=True))
    assert all(
        _close(a, b, scale) for a, b in zip(got.kwh_estimated.tolist(), ref.kwh_estimated, strict=True)
    )


@settings(max_examples=200, deadline=None)
@given(counter_series())
def test_conservation_boundaries_and_coverage(
    series: tuple[np.ndarray, np.ndarray, np.ndarray, float, int],
) -> None:
    ts, value, quality, cmax, gap = series
    got = bucket_energy(ts, value, quality, counter_max=cmax, max_gap_ms=gap)
    scale = float(np.abs(value).max()) if len(value) else 1.0
    # Buckets hold exactly the interval energies: plain increases, wraps, and post-reset values.
    expected = 0.0
    for i, f in enumerate(got.interval_flags.tolist()):
        if f & F_WRAP:
            expected += cmax - value[i] + value[i + 1]
        elif f & F_RESET:
            expected += value[i + 1]
        elif not f & (F_DROP | F_REPLACED):
            expected += value[i + 1] - value[i]
    assert math.isclose(float(got.kwh.sum()), expected, rel_tol=1e-9, abs_tol=1e-6 * max(1.0, scale))
    assert np.all(got.kwh_estimated <= got.kwh + 1e-6 * max(1.0, scale))
    assert np.all((got.measured_ms >= 0) & (got.measured_ms <= BUCKET_MS))
    if len(ts) < 2:
        assert len(got.starts) == 0
        return
    assert all(int(b) % BUCKET_MS == 0 for b in got.starts)
    assert np.all(np.diff(got.starts) == BUCKET_MS)
    assert got.starts[0] <= ts[0] < got.starts[0] + BUCKET_MS
    assert got.starts[-1] < ts[-1] <= got.starts[-1] + BUCKET_MS
    assert np.all(got.kwh >= -1e-9 * max(1.0, scale))


@settings(max_examples=100, deadline=None)
@given(counter_series())
def test_hour_buckets_are_the_sum_of_quarter_hours(
    series: tuple[np.ndarray, np.ndarray, np.ndarray, float, int],
) -> None:
    ts, value, quality, cmax, gap = series
    q = bucket_energy(ts, value, quality, counter_max=cmax, max_gap_ms=gap)
    h = bucket_energy(ts, value, quality, bucket_ms=HOUR_MS, counter_max=cmax, max_gap_ms=gap)
    scale = float(np.abs(value).max()) if len(value) else 1.0
    for start, kwh, mms in zip(h.starts, h.kwh, h.measured_ms, strict=True):
        inside = (q.starts >= start) & (q.starts < start + HOUR_MS)
        assert _close(float(q.kwh[inside].sum()), float(kwh), scale)
        assert int(q.measured_ms[inside].sum()) == int(mms)


T = T_BASE - T_BASE % HOUR_MS
MIN = 60_000


def _ts(*minutes: int) -> np.ndarray:
    return np.array([T + m * MIN for m in minutes], dtype=np.int64)


def test_straddling_interval_split_linearly() -> None:
    # 10 kWh over 10:10 → 10:40: 5 min in the first bucket, 15 in the second, 10 in the third.
    got = bucket_energy(_ts(10, 40), np.array([100.0, 130.0]))
    assert got.starts.tolist() == [T, T + BUCKET_MS, T + 2 * BUCKET_MS]
    assert np.allclose(got.kwh, [5.0, 15.0, 10.0])
    assert got.measured_ms.tolist() == [5 * MIN, 15 * MIN, 10 * MIN]


def test_wrap_from_quality_bit_and_from_counter_max() -> None:
    v = np.array([99_990.0, 99_998.0, 3.0, 10.0])
    by_bit = bucket_energy(
        _ts(0, 1, 2, 3), v, np.array([0, 0, int(Quality.COUNTER_WRAP), 0]), counter_max=100_000
    )
    by_range = bucket_energy(_ts(0, 1, 2, 3), v, counter_max=100_000)
    assert by_bit.kwh.tolist() == by_range.kwh.tolist() == [20.0]
    assert event_counts(by_range.interval_flags)["wraps"] == 1
    # Without the rollover value the wrap cannot be undone: counted as a drop, 0 kWh, unmeasured.
    unknown = bucket_energy(_ts(0, 1, 2, 3), v)
    assert unknown.kwh.tolist() == [15.0] and event_counts(unknown.interval_flags)["drops"] == 1
    assert unknown.measured_ms.tolist() == [2 * MIN]


def test_reset_replacement_and_unexplained_drop() -> None:
    v = np.array([500.0, 501.0, 2.0, 4.0])
    reset = bucket_energy(_ts(0, 1, 2, 3), v, np.array([0, 0, int(Quality.COUNTER_RESET), 0]))
    assert reset.kwh.tolist() == [5.0]  # 1 + the 2 counted since the reset + 2
    replaced = bucket_energy(_ts(0, 1, 2, 3), v, np.array([0, 0, int(Quality.METER_REPLACED), 0]))
    assert replaced.kwh.tolist() == [3.0]
    assert replaced.flags.tolist() == [F_REPLACED]
    assert replaced.measured_ms.tolist() == [2 * MIN]
    drop = bucket_energy(_ts(0, 1, 2, 3), v)
    assert drop.kwh.tolist() == [3.0] and drop.flags.tolist() == [F_DROP]


def test_gap_is_estimated_not_measured() -> None:
    # Readings at 0, 5 and 65 min with max gap 15 min: the 60-minute interval is a gap.
    got = bucket_energy(_ts(0, 5, 65), np.array([0.0, 5.0, 65.0]), max_gap_ms=BUCKET_MS)
    assert got.kwh.sum() == pytest.approx(65.0)
    assert got.kwh_estimated.sum() == pytest.approx(60.0)
    assert got.measured_ms.tolist() == [5 * MIN, 0, 0, 0, 0]
    assert all(f & F_GAP for f in got.flags.tolist())


def test_estimated_reading_makes_both_intervals_estimated() -> None:
    q = np.array([0, 0, int(Quality.ESTIMATED), 0, 0])
    got = bucket_energy(_ts(0, 1, 2, 3, 4), np.array([0.0, 1.0, 2.0, 3.0, 4.0]), q)
    assert got.kwh.tolist() == [4.0] and got.kwh_estimated.tolist() == [2.0]
    assert got.measured_ms.tolist() == [2 * MIN]


def test_bad_input_rejected() -> None:
    with pytest.raises(ValueError, match="sorted"):
        bucket_energy(np.array([2, 1], dtype=np.int64), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="same length"):
        bucket_energy(np.array([1, 2], dtype=np.int64), np.array([0.0]))


def test_subrange_recompute_is_bit_identical() -> None:
    """A bucket's value depends only on the intervals overlapping it (what recompute relies on)."""
    rng = np.random.default_rng(7)
    ts = np.cumsum(rng.integers(1, 3 * BUCKET_MS // 2, 400)).astype(np.int64) + T_BASE
    value = np.cumsum(rng.random(400) * 5)
    full = bucket_energy(ts, value, max_gap_ms=BUCKET_MS)
    by_start = dict(zip(full.starts.tolist(), zip(full.kwh, full.kwh_estimated, strict=True), strict=True))
    lo, hi = 120, 260
    part = bucket_energy(ts[lo:hi], value[lo:hi], max_gap_ms=BUCKET_MS)
    # Interior buckets (not touching the slice's first/last interval) must match bit for bit.
    for b, k, e in zip(part.starts[1:-1], part.kwh[1:-1], part.kwh_estimated[1:-1], strict=True):
        assert by_start[int(b)] == (k, e)


def test_rollup_sites_equals_per_meter_kernels_and_pandas() -> None:
    from compute.benchmark import check_equal, rollup_numba, rollup_pandas, synthetic

    f = synthetic(meters=7, readings_per_meter=300, meters_per_site=3, seed=5)
    grid = rollup_numba(f, BUCKET_MS)
    for m in range(7):
        a, b = f.bounds[m], f.bounds[m + 1]
        e = bucket_energy(f.ts[a:b], f.value[a:b], max_gap_ms=BUCKET_MS)
        site = m // 3
        cols = (e.starts - grid.first) // BUCKET_MS
        grid.kwh[site, cols] -= e.kwh
        grid.est[site, cols] -= e.kwh_estimated
    assert np.allclose(grid.kwh, 0.0, atol=1e-9) and np.allclose(grid.est, 0.0, atol=1e-9)
    ref = rollup_pandas(f, BUCKET_MS)
    check_equal(rollup_numba(f, BUCKET_MS), ref)
    broken = rollup_numba(f, BUCKET_MS)
    broken.kwh[1, 3] += 1e-3
    with pytest.raises(AssertionError):
        check_equal(broken, ref)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(counter_series(), st.integers(-2, 8), st.integers(0, 10), st.integers(0, 3)),
        min_size=0,
        max_size=6,
    )
)
def test_many_segments_in_one_call_equal_the_reference_per_segment(
    segments: list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray, float, int], int, int, int]],
) -> None:
    """The set-based recompute's single kernel call: each segment's kept buckets are those of the
    plain-Python reference for that segment alone, within its window (windows need not align)."""
    ts = [s[0][0] for s in segments]
    bounds = np.cumsum([0, *(len(t) for t in ts)]).astype(np.int64)
    base = T_BASE // BUCKET_MS * BUCKET_MS
    keep_from = np.array([base + a * BUCKET_MS + odd for (_, a, _, odd) in segments], dtype=np.int64)
    keep_to = np.array(
        [f + n * BUCKET_MS for f, (_, _, n, _) in zip(keep_from, segments, strict=True)], dtype=np.int64
    )
    seg, starts, kwh, est, mms, flags, events, iflags = bucket_energy_many(
        bounds,
        np.concatenate([np.zeros(0, np.int64), *ts]),
        np.concatenate([np.zeros(0), *(s[0][1] for s in segments)]),
        np.concatenate([np.zeros(0, np.int64), *(s[0][2] for s in segments)]),
        np.array([s[0][3] for s in segments], dtype=np.float64),
        np.array([s[0][4] for s in segments], dtype=np.int64),
        keep_from,
        keep_to,
        BUCKET_MS,
        np.zeros(len(segments)),  # no per-meter bound (tests/test_quarantine_* cover max_kw)
    )
    assert np.all(np.diff(seg) >= 0)
    for g, ((t, v, q, cmax, gap), *_rest) in enumerate(segments):
        ref = bucket_energy_ref(t.tolist(), v.tolist(), q.tolist(), counter_max=cmax, max_gap_ms=gap)
        keep = [k for k, b in enumerate(ref.starts) if keep_from[g] <= b < keep_to[g]]
        mine = seg == g
        scale = float(np.abs(v).max()) if len(v) else 1.0
        assert starts[mine].tolist() == [ref.starts[k] for k in keep]
        assert flags[mine].tolist() == [ref.flags[k] for k in keep]
        assert mms[mine].tolist() == [ref.measured_ms[k] for k in keep]
        assert all(_close(a, ref.kwh[k], scale) for a, k in zip(kwh[mine].tolist(), keep, strict=True))
        assert all(
            _close(a, ref.kwh_estimated[k], scale) for a, k in zip(est[mine].tolist(), keep, strict=True)
        )
        assert iflags[bounds[g] : bounds[g] + len(ref.interval_flags)].tolist() == ref.interval_flags
        counts = event_counts(np.array(ref.interval_flags, dtype=np.int32))
        assert dict(zip(EVENT_NAMES, events[g].tolist(), strict=True)) == counts
