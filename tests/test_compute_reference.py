"""The Python reference of the energy kernels (compute.reference) at the edges of its rules, against
sums worked by hand: it is the oracle the kernels are tested against, so its own boundaries need
their own cases (the property test rarely lands exactly on them). Written to kill the mutants
``make mutate`` found alive (issue 17)."""

from __future__ import annotations

import pytest

from compute.kernels import BUCKET_MS, F_DROP, F_ESTIMATED, F_GAP, F_RESET, F_WRAP
from compute.reference import bucket_energy_ref, interval_ref
from edge.wire import Quality

WRAP, RESET = int(Quality.COUNTER_WRAP), int(Quality.COUNTER_RESET)


def test_wrap_at_the_exact_rollover_and_by_half_a_unit() -> None:
    # (energy, flags) of an interval of 1 s: counter 1000 rolls over to 0, or 999.5 to 0.
    assert interval_ref(1000.0, 0.0, 0, WRAP, 1000, 1000.0, 0) == (0.0, F_WRAP)
    assert interval_ref(999.5, 0.0, 0, WRAP, 1000, 1000.0, 0) == (0.5, F_WRAP)
    # Inferred from counter_max alone (no quality bit), even for a tiny register of 1 unit.
    assert interval_ref(0.95, 0.05, 0, 0, 1000, 1.0, 0) == pytest.approx((0.1, F_WRAP))


def test_a_reset_to_a_negative_value_is_a_drop() -> None:
    assert interval_ref(100.0, -5.0, 0, RESET, 1000, 0.0, 0) == (0.0, F_DROP)
    assert interval_ref(100.0, 5.0, 0, RESET, 1000, 0.0, 0) == (5.0, F_RESET)


def test_gap_limit_is_strictly_longer_than_max_gap() -> None:
    assert interval_ref(0.0, 1.0, 0, 0, 2, 0.0, 1) == (1.0, F_GAP)
    assert interval_ref(0.0, 1.0, 0, 0, 1, 0.0, 1) == (1.0, 0)
    assert interval_ref(0.0, 1.0, 0, int(Quality.ESTIMATED), 1, 0.0, 1) == (1.0, F_ESTIMATED)


def test_defaults_infer_no_wrap_and_no_gap() -> None:
    # Without counter_max a fall is a drop, never a wrap; without max_gap_ms no interval is a gap.
    r = bucket_energy_ref([0, 1000], [0.95, 0.05])
    assert r.interval_flags == [F_DROP] and r.kwh == [0.0]
    r = bucket_energy_ref([0, 2], [0.0, 1.0])
    assert r.interval_flags == [0] and r.kwh == [1.0] and r.measured_ms == [2]


def test_no_quality_means_all_good() -> None:
    ts, v = [0, 60_000, 120_000], [1.0, 2.0, 4.0]
    r = bucket_energy_ref(ts, v)
    assert r.interval_flags == [0, 0] and r.kwh == [3.0] and r.kwh_estimated == [0.0]
    assert r == bucket_energy_ref(ts, v, [0, 0, 0])


def test_bad_input_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match=r"^ts, value and quality must have the same length$"):
        bucket_energy_ref([0, 1], [1.0])
    with pytest.raises(ValueError, match=r"^ts must be sorted$"):
        bucket_energy_ref([1, 0], [1.0, 2.0])


def test_a_fall_to_exactly_the_bottom_band_is_not_a_wrap() -> None:
    # b must be below 0.1 × counter_max: 100 of 1000 is not.
    assert interval_ref(950.0, 100.0, 0, 0, 1000, 1000.0, 0) == (0.0, F_DROP)
    assert interval_ref(950.0, 99.0, 0, 0, 1000, 1000.0, 0) == (149.0, F_WRAP)


def test_an_interval_ending_on_a_bucket_edge_stays_in_its_buckets() -> None:
    r = bucket_energy_ref([0, BUCKET_MS], [0.0, 2.0])
    assert r.starts == [0] and r.kwh == [2.0] and r.measured_ms == [BUCKET_MS]


def test_an_interval_split_over_buckets_conserves_its_energy_exactly() -> None:
    # The last bucket takes the remainder, so the parts add up to the interval's energy bit for bit
    # (proportional parts alone would not, for these values).
    d = 7.243246320173747
    r = bucket_energy_ref([467_022, 2_079_268], [0.0, d])
    assert len(r.kwh) == 3 and sum(r.kwh) == d
