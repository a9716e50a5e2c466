"""Kernel vs. plain-Python reference, conservation, and exact bucket boundaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute.kernels import BUCKET_MS, bucket_energy
from compute.reference import bucket_energy_ref

T_BASE = 1_793_000_000_000  # 2026-10-26 around midnight UTC, epoch ms


@st.composite
def counter_series(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 60))
    start = T_BASE + draw(st.integers(-3 * BUCKET_MS, 3 * BUCKET_MS))
    # Gaps from 0 ms (same-millisecond readings) to several buckets; some exactly on boundaries.
    gaps = draw(
        st.lists(
            st.one_of(st.integers(0, 4 * BUCKET_MS), st.sampled_from([BUCKET_MS, 60_000, 1])),
            min_size=max(n - 1, 0),
            max_size=max(n - 1, 0),
        )
    )
    steps = draw(
        st.lists(
            st.one_of(
                st.floats(0, 1e4, allow_nan=False),
                st.floats(-1e6, 0, allow_nan=False),  # resets / replacements
                st.just(0.0),
            ),
            min_size=max(n - 1, 0),
            max_size=max(n - 1, 0),
        )
    )
    v0 = draw(st.floats(0, 1e9, allow_nan=False))
    ts = np.array([start, *(start + sum(gaps[: i + 1]) for i in range(len(gaps)))][:n], dtype=np.int64)
    value = np.array([v0, *(v0 + sum(steps[: i + 1]) for i in range(len(steps)))][:n], dtype=np.float64)
    return ts, value


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=300, deadline=None)
@given(counter_series())
def test_kernel_equals_reference(series: tuple[np.ndarray, np.ndarray]) -> None:
    ts, value = series
    got = bucket_energy(ts, value)
    starts, kwh, negatives = bucket_energy_ref(ts.tolist(), value.tolist())
    assert got.starts.tolist() == starts
    assert got.negative_deltas == negatives
    assert all(_close(a, b) for a, b in zip(got.kwh.tolist(), kwh, strict=True))


@settings(max_examples=300, deadline=None)
@given(counter_series())
def test_conservation_and_boundaries(series: tuple[np.ndarray, np.ndarray]) -> None:
    ts, value = series
    got = bucket_energy(ts, value)
    deltas = np.diff(value)
    expected = float(deltas[deltas >= 0].sum()) if len(deltas) else 0.0
    assert math.isclose(float(got.kwh.sum()), expected, rel_tol=1e-9, abs_tol=1e-6)
    assert got.negative_deltas == int(np.count_nonzero(deltas < 0))
    if len(ts) < 2:
        assert len(got.starts) == 0
        return
    # Boundaries are exact multiples of the bucket, contiguous, and cover exactly the readings' hull.
    assert all(int(b) % BUCKET_MS == 0 for b in got.starts)
    assert np.all(np.diff(got.starts) == BUCKET_MS)
    assert got.starts[0] <= ts[0] < got.starts[0] + BUCKET_MS
    assert got.starts[-1] < ts[-1] <= got.starts[-1] + BUCKET_MS
    assert np.all(got.kwh >= -1e-9 * max(1.0, expected))


def test_straddling_interval_split_linearly() -> None:
    # 10 kWh over 10:10 → 10:40: 5 min in the first bucket, 15 in the second, 10 in the third.
    t = T_BASE - T_BASE % BUCKET_MS
    ts = np.array([t + 10 * 60_000, t + 40 * 60_000], dtype=np.int64)
    got = bucket_energy(ts, np.array([100.0, 130.0]))
    assert got.starts.tolist() == [t, t + BUCKET_MS, t + 2 * BUCKET_MS]
    assert np.allclose(got.kwh, [5.0, 15.0, 10.0])


def test_negative_delta_contributes_zero_and_is_flagged() -> None:
    t = T_BASE - T_BASE % BUCKET_MS
    ts = np.array([t, t + 60_000, t + 120_000, t + 180_000], dtype=np.int64)
    got = bucket_energy(ts, np.array([500.0, 501.0, 2.0, 4.0]))  # meter replaced between 2nd and 3rd
    assert got.negative_deltas == 1
    assert got.kwh.tolist() == [3.0]


def test_unsorted_rejected() -> None:
    with pytest.raises(ValueError, match="sorted"):
        bucket_energy(np.array([2, 1], dtype=np.int64), np.array([0.0, 1.0]))


def test_subrange_recompute_is_bit_identical() -> None:
    """A bucket's value depends only on the intervals overlapping it (what recompute relies on)."""
    rng = np.random.default_rng(7)
    ts = np.cumsum(rng.integers(1, 3 * BUCKET_MS // 2, 400)).astype(np.int64) + T_BASE
    value = np.cumsum(rng.random(400) * 5)
    full = dict(zip(*bucket_energy(ts, value)[:2], strict=True))
    lo, hi = 120, 260
    part = bucket_energy(ts[lo:hi], value[lo:hi])
    # Interior buckets (not touching the slice's first/last interval) must match bit for bit.
    for b, k in zip(part.starts[1:-1], part.kwh[1:-1], strict=True):
        assert full[b] == k
