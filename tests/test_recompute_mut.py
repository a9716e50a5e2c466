"""Fast, exact tests of compute/recompute.py's helpers for mutation testing (issue 17).

Expected bytes follow the PostgreSQL 15 manual, "COPY", section "Binary Format" (11-byte signature
``PGCOPY\\n\\377\\r\\n\\0``, int32 flags, int32 header extension length; per tuple an int16 field
count, then per field an int32 length and the value in network byte order; int16 -1 trailer), and
timestamptz binary values are microseconds since 2000-01-01 00:00 UTC; they are packed here with
``struct`` independently of the code's numpy dtypes.
"""

from __future__ import annotations

import struct
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest

from compute.rebuild import bulk_load, recompute_all
from compute.recompute import (
    _TAILS,
    CARRIERS,
    DEFAULT_FUEL_SERIES,
    Params,
    _Computed,
    _copy_out,
    _energy_copy,
    _hashtext,
    _lap,
    _merge_ranges,
    _Meter,
    _meter_params,
    _params,
    _rollup_args,
    _Tail,
    _tails_after,
    _unregistered,
    coalesce,
    copy_out,
    from_ms,
    lock_site,
    recompute,
    recompute_set,
    to_ms,
)
from ingest.events import DirtyRange
from ingest.writer import dirty_ranges
from ops.settings import ComputeSettings
from tests.test_compute_recompute import conn
from tests.test_compute_support import compute_dsn, insert_rows, snapshot

__all__ = ["compute_dsn", "conn"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01T00:00Z in Unix µs (10957 days × 86400 s)
T = datetime(2026, 11, 1, tzinfo=UTC)
M = timedelta(minutes=15)
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)


def test_epoch_milliseconds_floor() -> None:
    assert to_ms(datetime(1970, 1, 2, tzinfo=UTC)) == 86_400_000
    assert to_ms(EPOCH + timedelta(microseconds=1999)) == 1
    assert to_ms(EPOCH - timedelta(microseconds=1)) == -1  # floored, not truncated
    assert from_ms(86_400_001) == datetime(1970, 1, 2, 0, 0, 0, 1000, tzinfo=UTC)
    assert from_ms(-1) == EPOCH - timedelta(milliseconds=1)


def test_merge_ranges_joins_overlapping_and_touching_per_site() -> None:
    got = _merge_ranges(
        [
            ("b", T + 2 * M, T + 3 * M),
            ("a", T, T + M),
            ("a", T + M, T + 2 * M),
            ("a", T + 5 * M, T + 6 * M),
            ("a", T, T + M // 3),
            ("c", T, T + 8 * M),
            ("c", T + M, T + 2 * M),
            ("b", T + 3 * M, T + 4 * M),
        ]
    )
    assert got == [
        ("a", T, T + 2 * M),
        ("a", T + 5 * M, T + 6 * M),
        ("b", T + 2 * M, T + 4 * M),
        ("c", T, T + 8 * M),
    ]
    # a range touching the next site's is not joined with it
    assert _merge_ranges([("a", T, T + M), ("b", T + M, T + 2 * M)]) == [
        ("a", T, T + M),
        ("b", T + M, T + 2 * M),
    ]
    assert _merge_ranges([]) == []


def _dr(meter: str, q: str, t0: datetime, t1: datetime, rows: int, site: str = "s") -> DirtyRange:
    return DirtyRange(site_id=site, meter_id=meter, quantity=q, t_min=t0, t_max=t1, rows=rows)


def test_coalesce_spans_per_meter_and_counter_in_first_seen_order() -> None:
    e, g = "energy_import_kwh", "gas_m3"
    got = coalesce(
        [
            _dr("m2", e, T + M, T + 2 * M, 3),
            _dr("m1", e, T, T + M, 1),
            _dr("m2", e, T, T + M, 4, "s2"),
            _dr("m2", g, T, T + 9 * M, 5),
            _dr("m2", e, T + 3 * M, T + 4 * M, 2, "s3"),
        ]
    )
    assert got == [
        _dr("m2", e, T, T + 4 * M, 9, "s3"),
        _dr("m1", e, T, T + M, 1),
        _dr("m2", g, T, T + 9 * M, 5),
    ]
    assert coalesce([]) == []


def test_params_and_carrier_rules() -> None:
    assert _params(None, None) == Params("national-power-average", "ipcc-2006-default", 900.0)
    p = Params(max_gap_s=5.0)
    assert _params(p, None) is p
    assert _params(p, "x") == Params("x", DEFAULT_FUEL_SERIES, 5.0)
    s = ComputeSettings(factor_series="a", fuel_factor_series="b", max_gap_s=7.0)
    assert Params.from_settings(s) == Params("a", "b", 7.0)
    assert (CARRIERS["electricity"].scope, CARRIERS["electricity"].method) == (2, "location")
    assert (CARRIERS["cooling"].scope, CARRIERS["diesel"].scope, CARRIERS["diesel"].method) == (
        2,
        1,
        "direct",
    )
    args = _rollup_args(Params("f", "u", 1.0))
    assert (args["series"], args["fuel_series"], args["bucket_ms"]) == ("f", "u", 900_000)
    at = args["r_carrier"].index("natural_gas")
    assert (args["r_unit"][at], args["r_scope"][at], args["r_method"][at]) == ("m3", 1, "direct")
    at = args["r_carrier"].index("heat")
    assert (args["r_unit"][at], args["r_scope"][at], args["r_method"][at]) == ("kWh", 2, "location")


def test_meters_defaults() -> None:
    assert _unregistered("s9", Params(max_gap_s=1.5004)) == _Meter(
        "s9", "electricity", 0.0, 1500, False, "kWh"
    )
    assert _unregistered("s9", Params(max_gap_s=1.5006)).max_gap_ms == 1501
    m = _Meter("s", "natural_gas", 99.0, 7, True, "m3", 2.5)
    assert (m.quantity, _meter_params(m)) == ("gas_m3", (99.0, 7, 2.5))
    assert _Meter("s", "diesel", 0, 1, True, "l").quantity == "fuel_l"
    assert _Meter("s", "coal", 0, 1, True, "kg").quantity == "fuel_kg"
    assert _Meter("s", "heat", 0, 1, True, "kWh").quantity == "energy_import_kwh"


def test_lap_accumulates_per_phase() -> None:
    _lap(None, "x", 0.0)  # no phases kept: nothing to do
    phases = {"y": 1.0}
    _lap(phases, "x", time.perf_counter() - 10.0)
    _lap(phases, "x", time.perf_counter() - 10.0)
    assert phases["x"] >= 20.0 and phases["y"] == 1.0


def _row(mid: bytes, b_ms: int, kwh: float, est: float, ms: int, flags: int) -> bytes:
    return struct.pack(
        f">hi{len(mid)}siqididiqii",
        6,
        len(mid),
        mid,
        8,
        b_ms * 1000 - PG_EPOCH_US,
        8,
        kwh,
        8,
        est,
        8,
        ms,
        4,
        flags,
    )


def test_energy_copy_is_postgres_binary_copy() -> None:
    seg = np.array([0, 0, 2])
    starts = np.array([0, 900_000, 1_793_491_200_000])
    kwh, est = np.array([1.5, 2.25, -0.0]), np.array([0.0, 0.5, 3.0])
    mms, flags = np.array([900_000, 12, 0]), np.array([0, 5, 2**30])
    got = _energy_copy(["ab", "m1", "xyz"], seg, starts, kwh, est, mms, flags)
    want = (
        HEADER
        + _row(b"ab", 0, 1.5, 0.0, 900_000, 0)
        + _row(b"ab", 900_000, 2.25, 0.5, 12, 5)
        + _row(b"xyz", 1_793_491_200_000, -0.0, 3.0, 0, 2**30)
        + TRAILER
    )
    assert got == want
    assert _energy_copy(["a"], np.array([], dtype=np.int64), *(np.array([]),) * 5) == HEADER + TRAILER


def _computed(seg: list[int], starts: list[int], last_ms: list[int]) -> _Computed:
    n = len(seg)
    last_us = np.array([m * 1000 + 999 - PG_EPOCH_US if m >= 0 else -1 for m in last_ms], dtype=np.int64)
    return _Computed(
        np.zeros(len(last_ms)),
        np.zeros(len(last_ms)),
        np.zeros((len(last_ms), 1)),
        np.array(seg, dtype=np.int64),
        np.array(starts, dtype=np.int64),
        np.arange(n) + 0.5,
        np.arange(n) + 0.25,
        np.arange(n) * 10,
        np.arange(n) + 100,
        last_us,
    )


def test_tails_after_keeps_the_fold_of_windows_that_reached_the_series_end() -> None:
    B = 900_000
    X = (T - EPOCH) // timedelta(milliseconds=1)  # a bucket start in 2026 (after the PG epoch)
    m = _Meter("s", "electricity", 1e9, 900_000, True, "kWh", 3.0)
    todo = [(k, _dr(f"m{k}", "energy_import_kwh", T, T, 1), m) for k in range(6)]
    # windows 0..5: meter rows (seg) and their bucket starts (epoch ms)
    seg = [0, 0, 1, 2, 3, 5]
    starts = [X + 10 * B, X + 11 * B, X + 10 * B, X + 10 * B, X + 10 * B, X + 20 * B]
    last = [X + 11 * B + 7, X + 12 * B, X + 10 * B + 5, X + 11 * B + 1, -1, X + 20 * B + 9]
    tails = {0: (True, 0), 1: (True, 0), 2: (False, X + 10 * B + 5), 3: (True, 0), 5: (False, X + 99 * B)}
    got = _tails_after(todo, tails, _computed(seg, starts, last))
    last_us = [x * 1000 + 999 - PG_EPOCH_US for x in last]
    assert got == {
        # the last reading inside its bucket: that bucket's row (the window's last) is the fold
        ("m0", "energy_import_kwh"): _Tail(last_us[0], (1e9, 900_000, 3.0), X + 11 * B, (1.5, 1.25, 10, 101)),
        # a reading on a bucket boundary: nothing folded into the bucket it starts
        ("m1", "energy_import_kwh"): _Tail(last_us[1], (1e9, 900_000, 3.0), X + 12 * B, None),
        ("m5", "energy_import_kwh"): _Tail(last_us[5], (1e9, 900_000, 3.0), X + 20 * B, (5.5, 5.25, 50, 105)),
    }
    # m2 loaded a reading at b1 (not the series' end), m3's last row is not its last reading's
    # bucket, m4 loaded nothing; every window's old state is forgotten
    _TAILS[("m4", "energy_import_kwh")] = _Tail(0, (0.0, 0, 0.0), 0, None)
    assert _tails_after(todo[4:5], {}, _computed([], [], [-1])) == {}
    assert ("m4", "energy_import_kwh") not in _TAILS


@pytest.fixture
def cur(compute_dsn: str) -> Any:
    with psycopg.connect(compute_dsn) as c, c.cursor() as cursor:
        yield cursor
        c.rollback()


def test_copy_out_reads_binary_rows_and_reports_errors(cur: Any) -> None:
    assert copy_out(cur, "COPY (SELECT 'a' UNION ALL SELECT 'b') TO STDOUT") == bytearray(b"a\nb\n")
    rows = _copy_out(
        cur,
        "COPY (SELECT 7::bigint, '2000-01-01 00:00:01.5+00'::timestamptz, 2.5::float8, 3::int4"
        " UNION ALL SELECT -1, '1999-12-31 23:59:59+00', -0.25, -4) TO STDOUT (FORMAT BINARY)",
    )
    assert [(int(r["i"]), int(r["ts"]), float(r["v"]), int(r["q"])) for r in rows] == [
        (7, 1_500_000, 2.5, 3),
        (-1, -1_000_000, -0.25, -4),
    ]
    assert (
        len(
            _copy_out(
                cur, "COPY (SELECT 1::bigint, now(), 1.0::float8, 1 WHERE false) TO STDOUT (FORMAT BINARY)"
            )
        )
        == 0
    )
    with pytest.raises(RuntimeError, match="unexpected COPY BINARY framing"):
        _copy_out(cur, "COPY (SELECT 1) TO STDOUT")
    with pytest.raises(RuntimeError, match="not the expected four non-NULL columns"):
        _copy_out(cur, "COPY (SELECT 1::bigint, NULL::timestamptz, 1.0::float8, 1) TO STDOUT (FORMAT BINARY)")
    with pytest.raises(RuntimeError, match="not the expected four non-NULL columns"):  # 5 fields, same size
        _copy_out(
            cur, "COPY (SELECT 1::bigint, 2::bigint, 1::int2, 1::int2, 1::int4) TO STDOUT (FORMAT BINARY)"
        )
    with pytest.raises(psycopg.OperationalError, match="COPY TO STDOUT ended with"):
        copy_out(cur, "SELECT 1")
    cur.connection.rollback()
    with pytest.raises(psycopg.errors.DivisionByZero):
        copy_out(cur, "COPY (SELECT 1 / (SELECT 0)) TO STDOUT")
    cur.connection.rollback()
    assert _hashtext(cur, "s1") == cur.execute("SELECT hashtext('s1')").fetchone()[0]


def test_bulk_load_drops_and_restores_keys(cur: Any) -> None:
    cur.execute("CREATE TEMP TABLE bl_p (id int PRIMARY KEY)")
    cur.execute(
        "CREATE TEMP TABLE bl_c (a int CONSTRAINT bl_c_pk PRIMARY KEY,"
        " p int CONSTRAINT bl_c_fk REFERENCES bl_p)"
    )
    defs = (
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'bl_c'::regclass ORDER BY 1"
    )
    before = cur.execute(defs).fetchall()
    assert before == [("bl_c_fk", "FOREIGN KEY (p) REFERENCES bl_p(id)"), ("bl_c_pk", "PRIMARY KEY (a)")]
    cur.execute("INSERT INTO bl_p VALUES (1)")
    with bulk_load(cur, "bl_c"):
        assert cur.execute(defs).fetchall() == []
        cur.execute("INSERT INTO bl_c VALUES (1, 1), (2, 1)")
    assert cur.execute(defs).fetchall() == before
    with pytest.raises(psycopg.errors.UniqueViolation), bulk_load(cur, "bl_c"):
        cur.execute("INSERT INTO bl_c VALUES (1, 1)")


def _m1_quarter(conn: psycopg.Connection[Any]) -> DirtyRange:
    """m1 (site s1, Shenzhen) counts 1 kWh a minute over 15:00-15:15Z (23:00 on 1 Nov in Shanghai)."""
    t = datetime(2026, 11, 1, 15, tzinfo=UTC)
    rows = [
        ("m1", "energy_import_kwh", t + timedelta(minutes=k), 100.0 + k, 0, "s1", "gw1", 0) for k in range(16)
    ]
    insert_rows(conn, rows)
    (d,) = dirty_ranges(rows)
    return d


def _rollup(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    got = conn.execute("SELECT kwh, kg_co2e, factor_id FROM site_rollups_15m WHERE site_id = 's1'").fetchall()
    conn.commit()
    return got


def test_recompute_uses_the_chosen_factor_series(conn: Any) -> None:
    # tests/test_compute_recompute.FACTORS: series national-power-average (cn-v1, 0.5366 kg/kWh)
    # and statistical (cn-other-series, 9.9 kg/kWh) for CN electricity on 1 Nov 2026
    d = _m1_quarter(conn)
    recompute(conn, d, factor_series="statistical")
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 9.9), "cn-other-series")]
    recompute(conn, d)
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 0.5366), "cn-v1")]
    recompute(conn, d, Params(factor_series="statistical"))
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 9.9), "cn-other-series")]
    recompute(conn, d, Params(factor_series="statistical"), factor_series="national-power-average")
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 0.5366), "cn-v1")]
    recompute_all(conn, Params(factor_series="statistical"))
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 9.9), "cn-other-series")]
    recompute_all(conn, factor_series="national-power-average")
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 0.5366), "cn-v1")]
    recompute_all(conn, Params(factor_series="national-power-average"), factor_series="statistical")
    assert _rollup(conn) == [(15.0, pytest.approx(15.0 * 9.9), "cn-other-series")]


def test_recompute_waits_for_the_ledgers_site_lock(conn: Any, compute_dsn: str) -> None:
    """compute.market.apply_instruments takes ``lock_site``; a recompute of that site waits for it."""
    d = _m1_quarter(conn)
    with psycopg.connect(compute_dsn) as other:
        lock_site(other.cursor(), "s1")
        conn.execute("SET lock_timeout = '200ms'")
        conn.commit()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            recompute(conn, d)
        conn.rollback()
        other.rollback()
        lock_site(other.cursor(), "s2")  # another site's lock is no obstacle
        (r,) = recompute_set(conn, [d])
        assert r.readings == 16 and r.buckets == 1
        other.rollback()
    conn.execute("RESET lock_timeout")
    conn.commit()


def test_rebuild_of_nothing_and_of_unregistered_meters_writes_no_rollups(conn: Any) -> None:
    empty = recompute_all(conn)
    assert (empty.meters, empty.buckets, empty.rollups, empty.readings) == (0, 0, 0, 0)
    assert set(empty.events.values()) == {0}
    t = datetime(2026, 11, 1, 15, tzinfo=UTC)
    insert_rows(
        conn,
        [
            ("ghost", "energy_import_kwh", t + timedelta(minutes=k), float(k), 0, "s1", "gw1", 0)
            for k in range(16)
        ],
    )
    ghost = recompute_all(conn)  # "ghost" is in no fleet: its meter rows, but no site rollup
    assert (ghost.meters, ghost.buckets, ghost.rollups, ghost.readings) == (1, 1, 0, 16)
    assert _rollup(conn) == []


def test_rebuild_reports_every_phase(conn: Any) -> None:
    """The benchmark (compute.benchmark) reports the full rebuild's time per phase, by these names."""
    _m1_quarter(conn)
    phases = recompute_all(conn).phases
    assert set(phases) == {
        "windows", "load (COPY out)", "sort", "kernel", "quarantine", "meter rows (compare)",
        "meter rows (COPY in)",
        "meter rows (primary key)", "site rollups (delete)", "site sums (numba, COPY in)",
        "site rollups (stage)", "site rollups (factors)", "site rollups (merge)", "site rollups (keys)",
        "market-based hours", "commit",
    }  # fmt: skip
    assert all(s >= 0.0 for s in phases.values())


def test_rebuild_keeps_three_classes_over_two_buckets_apart(conn: Any) -> None:
    """Site sums of the full rebuild are grouped per (activity class, bucket): with three classes
    (s1 electricity, s1 natural gas, s2 electricity) over two quarter hours, each of the six groups
    holds its own meter, exactly as the incremental path writes them."""
    t = datetime(2026, 11, 1, 15, tzinfo=UTC)
    rows = [
        (m, q, t + timedelta(minutes=k), 100.0 + k * rate, 0, site, gw, 0)
        for m, q, site, gw, rate in (
            ("m1", "energy_import_kwh", "s1", "gw1", 1.0),
            ("gas1", "gas_m3", "s1", "gw1", 0.5),
            ("m4", "energy_import_kwh", "s2", "gw2", 2.0),
        )
        for k in range(31)
    ]
    insert_rows(conn, rows)
    recompute_set(conn, dirty_ranges(rows))
    incremental = snapshot(conn)
    assert len(incremental[1]) == 6
    recompute_all(conn)
    assert snapshot(conn) == incremental
