"""Counter sanity (edge.counters): glitches are flagged and held, drops are confirmed before they
count as a reset or a replacement, and the baseline is always the last plausible reading.
Property tests over random counter sequences with injected glitches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.counters import CounterGuard
from edge.wire import Quality

T0 = datetime(2026, 11, 2, tzinfo=UTC)
OOR, REPLACED, RESET = Quality.OUT_OF_RANGE, Quality.METER_REPLACED, Quality.COUNTER_RESET
# Failures must report within seconds (issue 17): small searches, no deadline flakiness.
FAST = settings(max_examples=150, deadline=None)


def run(values: list[float], serials: list[int | None] | None = None, **kw: float) -> list[Quality]:
    guard = CounterGuard(tolerance=kw.get("tolerance", 1.0), confirmations=int(kw.get("confirmations", 3)))
    serials = serials or [None] * len(values)
    return [
        guard.check("m/e", v, T0 + timedelta(minutes=i), serial=s)
        for i, (v, s) in enumerate(zip(values, serials, strict=True))
    ]


def test_a_small_dip_with_the_same_serial_is_a_glitch_not_a_replacement() -> None:
    assert run([500.0, 500.5, 500.49, 501.0], [7, 7, 7, 7]) == [0, 0, OOR, 0]


def test_the_baseline_is_the_last_plausible_reading() -> None:
    # 500.0 after the glitch is still below the plausible 500.5: flagged too.
    assert run([500.0, 500.5, 499.6, 500.0, 500.6]) == [0, 0, OOR, OOR, 0]


def test_one_bad_low_reading_does_not_become_the_baseline() -> None:
    """Issue 12: one low read used to become the baseline and the next 36 good reads were flagged."""
    good = [1000.0 + i for i in range(40)]
    values = [*good[:3], 12.0, *good[3:]]
    assert run(values) == [0, 0, 0, OOR, *[0] * 37]


def test_a_drop_is_a_replacement_only_when_confirmed() -> None:
    assert run([1000.0, 1001.0, 200.0, 200.5, 201.0, 201.5]) == [0, 0, OOR, OOR, REPLACED, 0]
    assert run([1000.0, 1001.0, 0.1, 0.2, 0.3, 0.4]) == [0, 0, OOR, OOR, RESET, 0]
    assert run([1000.0, 1001.0, 200.0, 1001.5, 200.5, 1002.0]) == [0, 0, OOR, 0, OOR, 0]


def test_a_serial_change_is_a_replacement_at_once() -> None:
    assert run([1000.0, 1001.0, 5.0, 5.5], [7, 7, 8, 8]) == [0, 0, REPLACED, 0]


def test_state_survives_a_restart_mid_confirmation() -> None:
    guard = CounterGuard(confirmations=3)
    for i, v in enumerate([1000.0, 200.0, 200.5]):
        guard.check("m/e", v, T0 + timedelta(minutes=i))
    restored = CounterGuard.loads(guard.dumps())
    restored.confirmations = 3
    assert restored.check("m/e", 201.0, T0 + timedelta(minutes=3)) == REPLACED
    assert CounterGuard.loads('{"m/e": [5.0, "2026-11-02T00:00:00+00:00", null]}').states["m/e"].value == 5.0


@st.composite
def glitchy(draw: st.DrawFn) -> tuple[list[float], set[int]]:
    """A rising counter with isolated bad reads (never two in a row), each a dip of any size below
    the baseline; returns the values and the glitch positions."""
    n = draw(st.integers(min_value=3, max_value=40))
    steps = draw(st.lists(st.floats(min_value=0, max_value=5), min_size=n, max_size=n))
    start = draw(st.floats(min_value=20, max_value=1e6))
    truth = [start]
    for s in steps[1:]:
        truth.append(truth[-1] + s)
    values = list(truth)
    glitches: set[int] = set()
    for i in range(1, n):
        if i - 1 not in glitches and draw(st.booleans()) and draw(st.booleans()):
            values[i] = draw(st.floats(min_value=0, max_value=truth[i - 1] - 1e-3))
            glitches.add(i)
    return values, glitches


@FAST
@given(case=glitchy(), confirmations=st.integers(min_value=2, max_value=5))
def test_isolated_glitches_never_look_like_a_new_meter(
    case: tuple[list[float], set[int]], confirmations: int
) -> None:
    values, glitches = case
    flags = run(values, confirmations=confirmations)
    for i, flag in enumerate(flags):
        if i in glitches:
            assert flag == OOR, (i, values[i])
        else:
            assert flag == Quality.GOOD, (i, values[i])


@FAST
@given(
    case=glitchy(),
    drop_to=st.floats(min_value=0, max_value=1e5),
    confirmations=st.integers(min_value=1, max_value=4),
    tail=st.integers(min_value=0, max_value=5),
)
def test_a_sustained_drop_is_flagged_exactly_once(
    case: tuple[list[float], set[int]], drop_to: float, confirmations: int, tail: int
) -> None:
    values, _ = case
    baseline = max(values)
    new = [drop_to + 0.1 * k for k in range(confirmations + tail)]
    if new[-1] >= baseline - 1.0:  # not a drop below the tolerance: nothing to confirm
        return
    flags = run([baseline, *new], confirmations=confirmations)
    assert flags[0] == Quality.GOOD
    assert flags[1:confirmations] == [OOR] * (confirmations - 1)
    assert flags[confirmations] == (RESET if drop_to <= 10.0 else REPLACED)
    assert flags[confirmations + 1 :] == [Quality.GOOD] * tail
