"""Counter sanity at its boundaries (edge.counters), one case per edge of each rule: the defaults,
the exact tolerance, the exact wrap window, the spike limit, serial bookkeeping and the saved state.
Written to kill the mutants ``make mutate`` found alive (issue 17): each assertion fails when the
comparison or constant it pins is changed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from edge.counters import CounterGuard
from edge.wire import Quality

T0 = datetime(2026, 11, 2, tzinfo=UTC)
GOOD, OOR, WRAP = Quality.GOOD, Quality.OUT_OF_RANGE, Quality.COUNTER_WRAP
RESET, REPLACED = Quality.COUNTER_RESET, Quality.METER_REPLACED


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def test_defaults_are_a_one_unit_glitch_and_three_confirmations() -> None:
    guard = CounterGuard()
    guard.check("k", 100.0, at(0))
    assert guard.check("k", 99.0, at(60)) == OOR  # exactly the tolerance: a glitch, nothing pending
    assert guard.states["k"].pending == []
    assert guard.check("k", 98.5, at(120)) == OOR  # 1.5 below: a suspected drop
    assert guard.states["k"].pending == [98.5]
    assert guard.check("k", 98.6, at(180)) == OOR
    assert guard.check("k", 98.7, at(240)) == REPLACED  # the third read confirms it
    assert guard.states["k"].value == 98.7


def test_dips_of_exactly_the_tolerance_never_confirm_a_drop() -> None:
    guard = CounterGuard(tolerance=1.0, confirmations=3)
    guard.check("k", 100.0, at(0))
    assert [guard.check("k", 99.0, at(60 * i)) for i in range(1, 5)] == [OOR] * 4
    assert guard.states["k"].value == 100.0


def test_equal_reads_after_a_drop_confirm_it() -> None:
    """"each at or above the previous one": a counter standing still after a reset agrees."""
    guard = CounterGuard()
    guard.check("k", 1000.0, at(0))
    assert [guard.check("k", 5.0, at(60 * i)) for i in range(1, 4)] == [OOR, OOR, RESET]


def test_a_restart_at_exactly_the_reset_limit_is_a_reset() -> None:
    guard = CounterGuard()
    guard.check("k", 1000.0, at(0))
    assert [guard.check("k", 10.0, at(60 * i)) for i in range(1, 4)] == [OOR, OOR, RESET]
    guard.check("j", 1000.0, at(0))
    assert [guard.check("j", 10.5, at(60 * i)) for i in range(1, 4)] == [OOR, OOR, REPLACED]


def test_wrap_needs_both_ends_of_the_range() -> None:
    # 16-bit register: the top 10 % starts at 58982.4, the bottom 10 % ends at 6553.6.
    guard = CounterGuard()
    guard.check("k", 60000.0, at(0))
    assert guard.check("k", 100.0, at(60), wraps_at=65536) == WRAP
    assert guard.states["k"].value == 100.0
    assert guard.check("k", 200.0, at(120), wraps_at=65536) == GOOD  # the wrapped value is the baseline
    # Not near the top: a drop, not a wrap.
    guard.check("m", 30000.0, at(0))
    assert guard.check("m", 100.0, at(60), wraps_at=65536) == OOR
    # Near the top but landing above the bottom 10 %: a drop.
    guard.check("n", 60000.0, at(0))
    assert guard.check("n", 7000.0, at(60), wraps_at=65536) == OOR


def test_wrap_window_edges_are_inclusive() -> None:
    guard = CounterGuard()
    guard.check("k", 900.0, at(0))  # exactly (1 - 0.1) × 1000
    assert guard.check("k", 100.0, at(60), wraps_at=1000) == WRAP  # exactly 0.1 × 1000
    guard.check("j", 899.0, at(0))
    assert guard.check("j", 50.0, at(60), wraps_at=1000) == OOR


def test_spike_limit_is_twice_the_rate_times_the_elapsed_time_at_least_one_second() -> None:
    guard = CounterGuard()
    guard.check("k", 0.0, at(0))
    assert guard.check("k", 20.0, at(1), max_rate_per_s=10) == GOOD  # exactly 2 × 10 × 1 s
    assert guard.check("k", 40.5, at(2), max_rate_per_s=10) == OOR  # 20.5 > 20: baseline held
    assert guard.states["k"].value == 20.0
    assert guard.check("k", 41.0, at(2), max_rate_per_s=10) == OOR  # no time passed: still 1 s worth
    assert guard.check("k", 170.0, at(11), max_rate_per_s=10) == GOOD  # 150 ≤ 2 × 10 × 10 s


def test_the_serial_is_remembered_through_every_kind_of_reading() -> None:
    # A good reading without a serial keeps the one known.
    guard = CounterGuard()
    guard.check("k", 1.0, at(0), serial=7)
    assert guard.check("k", 2.0, at(60)) == GOOD
    assert guard.check("k", 3.0, at(120), serial=8) == REPLACED
    # A serial first seen on a later reading is stored.
    guard.check("j", 1.0, at(0))
    assert guard.check("j", 2.0, at(60), serial=5) == GOOD
    assert guard.check("j", 3.0, at(120), serial=6) == REPLACED
    # ... and through a wrap and a confirmed reset.
    guard.check("w", 60000.0, at(0), serial=7)
    assert guard.check("w", 10.0, at(60), wraps_at=65536) == WRAP
    assert guard.check("w", 20.0, at(120), serial=8) == REPLACED
    guard.check("r", 1000.0, at(0), serial=7)
    assert [guard.check("r", 1.0, at(60 * i)) for i in range(1, 4)] == [OOR, OOR, RESET]
    assert guard.check("r", 2.0, at(300)) == GOOD
    assert guard.check("r", 3.0, at(360), serial=8) == REPLACED


def test_saved_state_is_sorted_and_round_trips_every_field() -> None:
    guard = CounterGuard()
    guard.check("b", 5.0, at(0), serial=3)
    guard.check("a", 7.0, at(30))
    guard.check("a", 1.0, at(60))  # a suspected drop: pending [1.0]
    text = guard.dumps()
    assert list(json.loads(text)) == ["a", "b"] and text.index('"a"') < text.index('"b"')
    back = CounterGuard.loads(text)
    assert {k: (s.value, s.ts, s.serial, s.pending) for k, s in back.states.items()} == {
        "a": (7.0, at(30), None, [1.0]),
        "b": (5.0, at(0), 3, []),
    }
    assert CounterGuard.loads("").states == {} and CounterGuard.loads(None).states == {}


def test_a_replacement_by_serial_starts_a_new_baseline_with_the_new_serial() -> None:
    guard = CounterGuard()
    guard.check("k", 500.0, at(0), serial=7)
    assert guard.check("k", 3.0, at(60), serial=8) == REPLACED
    assert guard.check("k", 4.0, at(120)) == GOOD  # the new meter's reading is the baseline
    assert guard.check("k", 5.0, at(180), serial=9) == REPLACED  # and its serial is the one compared
