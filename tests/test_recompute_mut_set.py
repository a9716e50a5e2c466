"""Exact tests of ``compute.recompute.recompute_set`` and its registry/lock helpers (issue 17).

The mutation run of compute/recompute.py left these unasserted: the fields of every returned
``RecomputeResult`` (computed, "no interval" and quantity refusals), the unregistered-meter
warning, which site ranges get their market-based hours rebuilt, the site advisory locks, the
registry values ``_meters`` hands the kernel (max_kw, max_gap_s in ms, the default unit) and the
benchmark's phase times. Each expected value below is worked out by hand from the kernel rules in
compute/kernels.py's module docstring (wrap, gap, implausible jump).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import compute.market
import compute.recompute
from compute.rebuild import recompute_all
from compute.recompute import _SITE_KEYS, RecomputeResult, _lap, _lock_sites, recompute_set
from ingest.events import DirtyRange
from ingest.writer import dirty_ranges
from tests.test_compute_recompute import conn
from tests.test_compute_support import Row, compute_dsn, insert_rows, snapshot

__all__ = ["compute_dsn", "conn"]

T = datetime(2026, 11, 1, 15, tzinfo=UTC)
MIN = timedelta(minutes=1)
KWH = "energy_import_kwh"
NO_EVENTS = {
    "wraps": 0,
    "resets": 0,
    "replacements": 0,
    "drops": 0,
    "gaps": 0,
    "estimated": 0,
    "implausible": 0,
}


def _events(**counts: int) -> dict[str, int]:
    return {**NO_EVENTS, **counts}


def _reading(meter: str, q: str, ts: datetime, v: float, site: str = "s1") -> Row:
    return (meter, q, ts, v, 0, site, "gw1", 0)


def _span(meter: str, q: str, t0: datetime, t1: datetime, site: str = "s1") -> DirtyRange:
    return DirtyRange(site_id=site, meter_id=meter, quantity=q, t_min=t0, t_max=t1, rows=1)


def test_every_kind_of_result_of_one_poll(conn: Any, caplog: pytest.LogCaptureFixture) -> None:
    """One poll holding a quantity refusal of a registered and of an unregistered meter, lone
    readings (no interval) of a registered and an unregistered meter, an unregistered meter with
    readings and a registered one with a wrap and a gap: one result per span, in span order, every
    field exact; only the unregistered meters are warned about."""
    m1 = [  # tests/test_compute_recompute.FLEET: m1 counter_max 1e6, max_gap_s default 900 s
        _reading("m1", KWH, T, 999_990.0),
        _reading("m1", KWH, T + 5 * MIN, 999_995.0),
        _reading("m1", KWH, T + 10 * MIN, 5.0),  # from the top 10 % into the bottom: a wrap, +10
        _reading("m1", KWH, T + 15 * MIN, 10.0),
        _reading("m1", KWH, T + 45 * MIN, 40.0),  # 1800 s > 900 s: a gap
    ]
    ghost = [_reading("ghost", KWH, T, 1.0), _reading("ghost", KWH, T + 10 * MIN, 2.0)]
    m2 = [_reading("m2", KWH, T, 7.0)]  # m2's only reading, on a bucket boundary
    lone = [_reading("lone", KWH, T + 30 * MIN, 3.0)]  # the same for a meter in no registry
    insert_rows(conn, m1 + ghost + m2 + lone)
    spans = [
        _span("m1", "gas_m3", T, T),
        *dirty_ranges(m2),
        *dirty_ranges(lone),
        *dirty_ranges(ghost),
        _span("ghost", "gas_m3", T, T, site="s9"),
        *dirty_ranges(m1),
    ]
    with caplog.at_level(logging.WARNING, logger="scopemeter.compute"):
        got = recompute_set(conn, spans)
    refused = "quantity gas_m3 is not computed for electricity meters counting in kWh"
    assert got == [
        RecomputeResult("m1", "s1", None, None, registered=True, skipped=refused),
        RecomputeResult("m2", "s1", None, None, registered=True, skipped="no interval"),
        RecomputeResult("lone", "s1", None, None, registered=False, skipped="no interval"),
        RecomputeResult("ghost", "s1", T, T + 15 * MIN, 2, 1, NO_EVENTS, registered=False),
        RecomputeResult("ghost", "s9", None, None, registered=False, skipped=refused),
        RecomputeResult("m1", "s1", T, T + 45 * MIN, 5, 3, _events(wraps=1, gaps=1), registered=True),
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "scopemeter.compute"] == [
        "meter lone (site s1) is not in the fleet registry: no rollup",
        "meter ghost (site s1) is not in the fleet registry: no rollup",
    ]
    energy, rollups = snapshot(conn)
    assert [(r[0], r[1], r[2], r[3]) for r in energy] == [
        ("ghost", T, 1.0, 0.0),
        ("m1", T, 20.0, 0.0),  # 5 + 10 (the wrap) + 5
        ("m1", T + 15 * MIN, 15.0, 15.0),  # the 30-min gap's 30 kWh, half per bucket, estimated
        ("m1", T + 30 * MIN, 15.0, 15.0),
    ]
    assert [(r[0], r[1], r[2]) for r in rollups] == [
        ("s1", T, "electricity"),
        ("s1", T + 15 * MIN, "electricity"),
        ("s1", T + 30 * MIN, "electricity"),
    ]


def test_market_hours_are_rebuilt_for_scope2_sites_only(conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Of a poll's site ranges, only those of sites with a registered Scope 2 meter computed in it
    go to ``recompute_market_set``: s1 has only Scope 1 gas (and an unregistered meter, which the
    registry does not place at any site) in this poll, s2 an electricity meter."""
    rows = [
        _reading("gas1", "gas_m3", T, 1.0),
        _reading("gas1", "gas_m3", T + 5 * MIN, 2.0),
        _reading("ghost", KWH, T, 1.0),
        _reading("ghost", KWH, T + 5 * MIN, 2.0),
        _reading("m4", KWH, T + 15 * MIN, 1.0, site="s2"),
        _reading("m4", KWH, T + 20 * MIN, 3.0, site="s2"),
    ]
    insert_rows(conn, rows)
    calls: list[Any] = []
    real = compute.market.recompute_market_set

    def spy(cur: Any, ranges: Any) -> int:
        calls.append(ranges)
        return real(cur, ranges)

    monkeypatch.setattr(compute.recompute, "recompute_market_set", spy)
    got = recompute_set(conn, dirty_ranges(rows))
    assert [(r.meter_id, r.registered, r.buckets) for r in got] == [
        ("gas1", True, 1),
        ("ghost", False, 1),
        ("m4", True, 1),
    ]
    assert calls == [[("s2", T + 15 * MIN, T + 30 * MIN)]]
    calls.clear()
    recompute_set(conn, dirty_ranges(rows[:4]))  # no Scope 2 site: an empty list, not a skipped call
    assert calls == [[]]


def _try_lock(other: psycopg.Connection[Any], site: str) -> bool:
    row = other.execute(
        "SELECT pg_try_advisory_xact_lock(hashtext('scopemeter.compute'), hashtext(%s))", (site,)
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_lock_sites_holds_each_sites_lock_until_commit(compute_dsn: str) -> None:
    """Fresh site names (not in the process's key cache): every site given is locked, by the key
    ``lock_site`` uses, until the transaction ends; another site is not."""
    a, b, c = (f"lock-{x}-{uuid.uuid4().hex}" for x in "abc")
    assert not {a, b, c} & set(_SITE_KEYS)
    with psycopg.connect(compute_dsn) as mine, psycopg.connect(compute_dsn, autocommit=True) as other:
        with mine.transaction(), mine.cursor() as cur:
            _lock_sites(cur, [b, a, b])
            assert [_try_lock(other, s) for s in (a, b, c)] == [False, False, True]
        assert [_try_lock(other, s) for s in (a, b)] == [True, True]
        want = other.execute("SELECT hashtext(%s), hashtext(%s)", (a, b)).fetchone()
    assert (_SITE_KEYS[a], _SITE_KEYS[b]) == want


def test_registry_max_kw_quarantines_a_spike(conn: Any) -> None:
    """m1 limited to 100 kW: 10,000 kWh in one minute (600,000 kW) is an implausible jump."""
    conn.execute("UPDATE meters SET max_kw = 100 WHERE meter_id = 'm1'")
    conn.commit()
    rows = [
        _reading("m1", KWH, T, 100.0),
        _reading("m1", KWH, T + MIN, 101.0),
        _reading("m1", KWH, T + 2 * MIN, 10_101.0),
        _reading("m1", KWH, T + 3 * MIN, 10_102.0),
    ]
    insert_rows(conn, rows)
    (got,) = recompute_set(conn, dirty_ranges(rows))
    assert got == RecomputeResult("m1", "s1", T, T + 15 * MIN, 4, 1, _events(implausible=1))
    held = conn.execute("SELECT meter_id, ts, value, reason FROM quarantined_readings").fetchall()
    assert held == [("m1", T + 2 * MIN, 10_101.0, "implausible_jump")]
    assert [r[2] for r in snapshot(conn)[0]] == [2.0]  # the jump's interval counts nothing


def test_registry_max_gap_is_whole_milliseconds(conn: Any) -> None:
    """gas1's max_gap_s = 600 is 600,000 ms: an interval of 600.3 s is a gap, one of 600.0 s not."""
    rows = [
        _reading("gas1", "gas_m3", T, 0.0),
        _reading("gas1", "gas_m3", T + timedelta(seconds=600.3), 10.0),
        _reading("gas1", "gas_m3", T + timedelta(seconds=1200.3), 20.0),
    ]
    insert_rows(conn, rows)
    (got,) = recompute_set(conn, dirty_ranges(rows))
    assert got == RecomputeResult("gas1", "s1", T, T + 30 * MIN, 3, 2, _events(gaps=1))


def test_registry_row_without_a_unit_counts_in_the_carriers_default(conn: Any) -> None:
    """Meters registered before migration 0004 have no ``activity_unit``: electricity counts kWh,
    natural gas m3 (compute.fleet.METER_UNITS' first unit)."""
    conn.execute("UPDATE meters SET activity_unit = NULL WHERE meter_id IN ('m1', 'gas1')")
    conn.commit()
    rows = [
        _reading("m1", KWH, T, 1.0),
        _reading("m1", KWH, T + 5 * MIN, 2.0),
        _reading("gas1", "gas_m3", T, 1.0),
        _reading("gas1", "gas_m3", T + 5 * MIN, 3.0),
    ]
    insert_rows(conn, rows)
    got = recompute_set(conn, [*dirty_ranges(rows[:2]), *dirty_ranges(rows[2:]), _span("gas1", KWH, T, T)])
    assert got == [
        RecomputeResult("m1", "s1", T, T + 15 * MIN, 2, 1, NO_EVENTS),
        RecomputeResult("gas1", "s1", T, T + 15 * MIN, 2, 1, NO_EVENTS),
        RecomputeResult(
            "gas1",
            "s1",
            None,
            None,
            skipped="quantity energy_import_kwh is not computed for natural_gas meters counting in m3",
        ),
    ]


def test_series_end_just_past_a_bucket_boundary(conn: Any) -> None:
    """A series' last reading 0.5 ms after 15:15 lies, in the kernel's whole milliseconds, ON the
    boundary: the interval up to it belongs to [15:00, 15:15) and must be loaded (it was not: bug
    found by this test). The next append continues the fold from that reading (``_continued``):
    it loads 2 readings, not the 3 a recompute from the bucket's start loads."""
    end = T + 15 * MIN + timedelta(microseconds=500)
    first = [_reading("m1", KWH, T + 5 * MIN, 100.0), _reading("m1", KWH, end, 110.0)]
    insert_rows(conn, first)
    assert recompute_set(conn, dirty_ranges(first)) == [
        RecomputeResult("m1", "s1", T, T + 15 * MIN, 2, 1, NO_EVENTS)
    ]
    after = [_reading("m1", KWH, T + 20 * MIN, 115.0)]
    insert_rows(conn, after)
    assert recompute_set(conn, dirty_ranges(after)) == [
        RecomputeResult("m1", "s1", T + 15 * MIN, T + 30 * MIN, 2, 1, NO_EVENTS)
    ]
    incremental = snapshot(conn)
    assert [(r[1], r[2]) for r in incremental[0]] == [(T, 10.0), (T + 15 * MIN, 5.0)]
    recompute_all(conn)
    assert snapshot(conn) == incremental


def test_lap_adds_the_time_since_to_the_phase() -> None:
    """Bounded by clock readings taken around the call, not by a timing threshold."""
    phases = {"x": 2.0, "y": 1.0}
    before = time.perf_counter()
    _lap(phases, "x", before - 10.0)
    after = time.perf_counter()
    assert 12.0 <= phases["x"] <= 12.0 + (after - before)
    fresh: dict[str, float] = {}
    before = time.perf_counter()
    _lap(fresh, "z", before - 3.0)
    after = time.perf_counter()
    assert 3.0 <= fresh["z"] <= 3.0 + (after - before)
    assert phases["y"] == 1.0
