"""The full rebuild compares the stored meter rows with the computed ones instead of rewriting them:
it leaves equal rows untouched, replaces exactly the meters whose rows differ (by a single bit, a
missing or an extra bucket), removes the rows of meters it has no series for, and rewrites the
table whole when most rows differ. Every path ends with the rows a rebuild from nothing gives."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest

import compute.rebuild as rebuild
from compute.rebuild import _STORED, _changed_windows, _stored_rows, _swap, recompute_all
from compute.recompute import _COPY_HEADER, _PG_EPOCH_US, _Computed, copy_out, recompute_set
from ingest.writer import dirty_ranges
from tests.test_compute_recompute import conn, generate
from tests.test_compute_support import compute_dsn, insert_rows, snapshot

__all__ = ["compute_dsn", "conn"]


def versions(conn: psycopg.Connection[Any]) -> dict[tuple[str, Any], str]:
    """Each meter row's physical version (``xmin``): it changes only when the row is written."""
    rows = conn.execute("SELECT meter_id, bucket, xmin::text FROM meter_energy_15m").fetchall()
    conn.commit()
    return {(m, b): x for m, b, x in rows}


def rebuilt_from_nothing(conn: psycopg.Connection[Any]) -> Any:
    conn.execute("TRUNCATE meter_energy_15m")
    conn.commit()
    recompute_all(conn)
    return snapshot(conn)


def test_unchanged_rows_are_not_rewritten_and_differing_meters_are_replaced(conn: Any) -> None:
    insert_rows(conn, generate(4))
    clean = rebuilt_from_nothing(conn)
    before = versions(conn)
    recompute_all(conn)  # e.g. after a factor change: meter energy is the same
    assert snapshot(conn) == clean
    assert versions(conn) == before  # not one meter row written

    # One bit of one value; one bucket moved (as many rows, another set); one extra bucket and a
    # meter without series. Each round touches one meter of six: replaced alone, not rewritten whole.
    nth = "(SELECT bucket FROM meter_energy_15m WHERE meter_id = 'm1' ORDER BY bucket LIMIT 1 OFFSET 3)"
    (kwh,) = conn.execute(
        f"SELECT kwh FROM meter_energy_15m WHERE meter_id = 'm1' AND bucket = {nth}"
    ).fetchone()
    last = "(SELECT max(bucket) FROM meter_energy_15m WHERE meter_id = %s)"
    rounds: list[list[tuple[str, tuple[Any, ...]]]] = [
        [(f"UPDATE meter_energy_15m SET kwh = %s WHERE meter_id = 'm1' AND bucket = {nth}",
          (math.nextafter(kwh, math.inf),))],
        [("UPDATE meter_energy_15m SET bucket = bucket + interval '1 day'"
          f" WHERE meter_id = %s AND bucket = {last}",
          ("m2", "m2"))],
        [(f"INSERT INTO meter_energy_15m (meter_id, bucket, kwh) VALUES (%s, {last} + interval '1 day', 1.0)",
          ("m3", "m3")),
         ("INSERT INTO meter_energy_15m (meter_id, bucket, kwh) VALUES ('nobody', now(), 2.0)", ())],
    ]  # fmt: skip
    for meter, statements in zip(("m1", "m2", "m3"), rounds, strict=True):
        for sql, args in statements:
            conn.execute(sql, args)
        conn.commit()
        tampered = versions(conn)
        recompute_all(conn)
        assert snapshot(conn) == clean, meter
        after = versions(conn)
        assert {m for (m, b), x in after.items() if tampered.get((m, b)) != x} == {meter}


def test_mostly_differing_rows_are_rewritten_whole(conn: Any) -> None:
    insert_rows(conn, generate(5))
    clean = rebuilt_from_nothing(conn)
    conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1, flags = flags + 1")
    conn.commit()
    phases = recompute_all(conn).phases
    assert {"meter rows (compare)", "meter rows (COPY in)", "meter rows (primary key)"} <= set(phases)
    assert None not in phases
    assert snapshot(conn) == clean
    keys = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'meter_energy_15m'::regclass AND contype = 'p'"
    ).fetchall()
    conn.commit()
    assert keys == [("PRIMARY KEY (meter_id, bucket)",)]  # the bulk load added its key back


def test_inside_a_callers_transaction_the_rebuild_compares_what_that_transaction_wrote(conn: Any) -> None:
    """Statements verify by rebuilding inside a transaction they roll back. There the stored rows
    are read on the rebuild's own connection: another connection would see the committed rows,
    not the ones changed earlier in the same transaction, and keep a wrong row as unchanged."""
    insert_rows(conn, generate(6))
    clean = rebuilt_from_nothing(conn)
    before = versions(conn)
    with conn.transaction():
        conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1 WHERE meter_id = 'm4'")
        recompute_all(conn)
        inside = conn.execute(
            "SELECT meter_id, bucket, kwh, kwh_estimated, measured_ms, flags FROM meter_energy_15m"
            " ORDER BY 1, 2"
        ).fetchall()
        written = conn.execute("SELECT meter_id, bucket, xmin::text FROM meter_energy_15m").fetchall()
    assert inside == clean[0]
    # compared there too: only m4's rows (changed in the transaction) were written again
    assert {m for m, b, x in written if before[(m, b)] != x} == {"m4"}


def test_without_a_second_connection_the_rows_are_read_on_the_rebuilds_own(conn: Any, caplog: Any) -> None:
    """The stored rows are read over a second connection; when PostgreSQL refuses it (here a real
    refusal: the database's connection limit, reached by the rebuild's own connection), the rebuild
    reads them over its own connection and still fixes exactly what differs."""
    insert_rows(conn, generate(7))
    clean = rebuilt_from_nothing(conn)
    conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1 WHERE meter_id = 'm2'")
    (db,) = conn.execute("SELECT current_database()").fetchone()
    conn.execute(f'ALTER DATABASE "{db}" CONNECTION LIMIT 1')
    conn.commit()
    tampered = versions(conn)
    try:
        with caplog.at_level("WARNING", logger="scopemeter.compute"):
            recompute_all(conn)
    finally:
        conn.execute(f'ALTER DATABASE "{db}" CONNECTION LIMIT -1')
        conn.commit()
    assert snapshot(conn) == clean
    after = versions(conn)  # the rows read over its own connection are matched to their meters
    assert {m for (m, b), x in after.items() if tampered.get((m, b)) != x} == {"m2"}
    assert any(
        r.getMessage().startswith("meter rows read over the rebuild's own connection (a second one failed: ")
        and "too many connections" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_swap_replaces_exactly_one_part_and_refuses_any_other_count() -> None:
    """The rebuild's queries are the incremental path's with one part swapped: a part that is
    missing or appears twice (the incremental query changed) is refused, naming part and query."""
    assert _swap("SELECT a FROM t WHERE b", "FROM t", "FROM u") == "SELECT a FROM u WHERE b"
    for sql in ("SELECT a FROM s", "SELECT a FROM t UNION SELECT b FROM t"):
        message = "expected one 'FROM t' in " + repr(sql)
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            _swap(sql, "FROM t", "FROM u")
    assert rebuild._SUMS_DAYS in rebuild._FACTORS_OF_SUMS
    assert "compute_rollup_stage" not in rebuild._MERGE_SUMS


def test_stored_rows_carry_their_window_and_a_damaged_copy_stream_is_refused(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored rows come back with the index of their meter in the list (-1: not in it). The
    binary COPY framing is checked: PostgreSQL cannot be made to send a damaged stream, so the
    damage is a fault injected into what ``copy_out`` returned (the test's only fake)."""
    insert_rows(conn, generate(8))
    recompute_all(conn)
    ids = ["m2", "m1"]  # every other meter: no window (-1)
    with conn.cursor() as cur:
        rows = _stored_rows(cur, ids)
        conn.commit()
        counts = dict(conn.execute("SELECT meter_id, count(*) FROM meter_energy_15m GROUP BY 1").fetchall())
        conn.commit()
        wins, n = np.unique(rows["i"], return_counts=True)
        assert dict(zip(wins.tolist(), n.tolist(), strict=True)) == {
            0: counts["m2"],
            1: counts["m1"],
            -1: sum(counts.values()) - counts["m1"] - counts["m2"],
        }
        assert (rows["n"] == 6).all()

        header, row = len(_COPY_HEADER), _STORED.itemsize
        damages: dict[str, Callable[[bytearray], bytes]] = {
            "truncated": lambda d: bytes(d[:-3]),
            "bad signature": lambda d: b"XGCOPY" + bytes(d[6:]),
            "partial row": lambda d: bytes(d[:-2]) + b"\x00\x00\x00" + bytes(d[-2:]),
            "bad trailer": lambda d: bytes(d[:-2]) + b"\x00\x00",
        }
        # a row of seven columns: the field count of the second row is changed
        seven = {
            "seven columns": lambda d: bytes(d[: header + row]) + b"\x00\x07" + bytes(d[header + row + 2 :])
        }
        framing = "unexpected COPY BINARY framing of meter_energy_15m from PostgreSQL"
        columns = "meter_energy_15m rows are not the expected six non-NULL columns"
        for message, cases in ((framing, damages), (columns, seven)):
            for damage in cases.values():

                def damaged(
                    c: psycopg.Cursor[Any], sql: str, damage: Callable[[bytearray], bytes] = damage
                ) -> bytes:
                    return damage(copy_out(c, sql))

                monkeypatch.setattr(rebuild, "copy_out", damaged)
                with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
                    _stored_rows(cur, ids)
                conn.commit()


def _computed(windows: list[list[int]], year_ms: int = 1_700_000_000_000) -> _Computed:
    """Computed meter rows of ``len(windows)`` windows; window g has the buckets ``windows[g]``
    (15-minute bucket numbers from ``year_ms``), each with distinct values."""
    seg = np.array([g for g, bs in enumerate(windows) for _ in bs], dtype=np.int64)
    starts = np.array([year_ms + b * 900_000 for bs in windows for b in bs], dtype=np.int64)
    n = len(seg)
    return _Computed(
        loaded=np.zeros(len(windows), dtype=np.int64),
        written=np.array([len(bs) for bs in windows], dtype=np.int64),
        events=np.zeros((len(windows), 7), dtype=np.int64),
        seg=seg,
        starts=starts,
        kwh=np.arange(n, dtype=np.float64) + 0.5,
        est=np.arange(n, dtype=np.float64) / 4,
        mms=np.full(n, 900_000, dtype=np.int64),
        flags=np.arange(n, dtype=np.int64) % 3,
        last_us=np.full(len(windows), -1, dtype=np.int64),
    )


def _stored_like(done: _Computed, extra_windows: list[int] = []) -> np.ndarray:  # noqa: B006
    """The stored rows equal to ``done`` (in its order), then one row for each of ``extra_windows``."""
    n = len(done.seg)
    rows = np.zeros(n + len(extra_windows), dtype=_STORED)
    rows["i"] = np.concatenate([done.seg, np.array(extra_windows, dtype=np.int64)])
    rows["b"][:n] = done.starts * 1000 - _PG_EPOCH_US
    rows["b"][n:] = done.starts[0] * 1000 - _PG_EPOCH_US
    rows["k"][:n], rows["e"][:n], rows["ms"][:n], rows["f"][:n] = done.kwh, done.est, done.mms, done.flags
    return rows


def test_changed_windows_counts_only_rows_of_no_window_as_orphans() -> None:
    """Window 0 is the first meter, not an orphan; only rows of window -1 are."""
    done = _computed([[0, 1], [0]])
    changed, orphans = _changed_windows(done, _stored_like(done), 2)
    assert changed.tolist() == [False, False] and orphans == 0
    changed, orphans = _changed_windows(done, _stored_like(done, [-1, -1]), 2)
    assert changed.tolist() == [False, False] and orphans == 2


def test_changed_windows_sorts_rows_stored_out_of_order() -> None:
    """After incremental recomputes the table's physical order is not (meter, bucket): equal rows
    in any order are unchanged, and a row moved by one bucket is still found."""
    done = _computed([[0, 1, 2], [0, 1], [5]])
    stored = _stored_like(done)
    orders = (
        [2, 1, 0, 4, 3, 5],
        [3, 4, 0, 1, 2, 5],
        [5, 0, 1, 2, 3, 4],
        [0, 1, 2, 4, 3, 5],
        [3, 1, 0, 2, 4, 5],
        [0, 3, 1, 2, 4, 5],
        [0, 2, 1, 3, 4, 5],
    )
    for order in orders:
        changed, orphans = _changed_windows(done, stored[order], 3)
        assert changed.tolist() == [False, False, False] and orphans == 0, order
    two = _computed([[1], [0]])  # two rows: the later meter's row first, with the earlier bucket
    assert not _changed_windows(two, _stored_like(two)[::-1], 2)[0].any()
    moved = stored.copy()
    moved["b"][[0, 1]] = moved["b"][[1, 0]]  # window 0's first two values swap buckets
    assert _changed_windows(done, moved[[2, 1, 0, 3, 4, 5]], 3)[0].tolist() == [True, False, False]


def test_changed_windows_finds_a_bucket_one_microsecond_off_in_any_year() -> None:
    """Buckets are compared as integers: in the year 2400 (beyond 2**53 µs from 2000, where a float
    would no longer tell them apart) a bucket one microsecond off is still a difference."""
    done = _computed([[0], [0, 1]], year_ms=13_569_465_600_000)  # 2400-01-01
    assert (done.starts * 1000 - _PG_EPOCH_US > 2**53).all()
    stored = _stored_like(done)
    assert not _changed_windows(done, stored, 2)[0].any()
    stored["b"][2] += 1
    assert _changed_windows(done, stored, 2)[0].tolist() == [False, True]


def test_changed_windows_finds_any_one_value_that_differs_and_missing_windows() -> None:
    """A single differing value of any column marks its window changed, and only it; a window
    with no stored rows at all (a new meter, here the last one) is changed too."""
    done = _computed([[0, 1], [0, 1, 2], [3]])
    for column, value in (("b", 1), ("k", 2.0**-40), ("e", 0.25), ("ms", -1), ("f", 4)):
        stored = _stored_like(done)
        stored[column][3] += value  # window 1's second row
        assert _changed_windows(done, stored, 3)[0].tolist() == [False, True, False], column
    stored = _stored_like(done)
    assert _changed_windows(done, stored[:5], 3)[0].tolist() == [False, False, True]
    assert _changed_windows(done, stored[:0], 3)[0].tolist() == [True, True, True]


def filenode(conn: psycopg.Connection[Any], table: str) -> int:
    """The table's file: a TRUNCATE gives it a new one, DELETE and INSERT keep it."""
    row = conn.execute("SELECT pg_relation_filenode(%s::regclass)", (table,)).fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def test_up_to_a_quarter_of_the_rows_differing_is_replaced_above_it_rewritten(conn: Any) -> None:
    """Four meters with as many buckets each: one differing is exactly 25 % of the rows, replaced
    under the key (the table keeps its file, the other meters' rows their versions); two is 50 %,
    and the table is rewritten whole (TRUNCATE: a new file)."""
    t = datetime(2026, 11, 1, 15, 7, tzinfo=UTC)
    sites = {"m1": ("s1", "gw1"), "m2": ("s1", "gw1"), "m3": ("s1", "gw1"), "m4": ("s2", "gw2")}
    insert_rows(
        conn,
        [
            (m, "energy_import_kwh", t + timedelta(minutes=k), 10.0 + k * 0.5, 0, site, gw, 0)
            for m, (site, gw) in sites.items()
            for k in range(121)
        ],
    )
    clean = rebuilt_from_nothing(conn)
    counts = dict(conn.execute("SELECT meter_id, count(*) FROM meter_energy_15m GROUP BY 1").fetchall())
    conn.commit()
    assert len(set(counts.values())) == 1 and set(counts) == set(sites), counts

    node, before = filenode(conn, "meter_energy_15m"), versions(conn)
    unchanged = recompute_all(conn)
    assert filenode(conn, "meter_energy_15m") == node and versions(conn) == before
    assert unchanged.phases["meter rows (primary key)"] == 0.0  # no key built
    assert {"meter rows (compare)", "meter rows (COPY in)"} <= set(unchanged.phases)

    conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1 WHERE meter_id = 'm1'")
    conn.commit()
    tampered = versions(conn)
    recompute_all(conn)
    assert snapshot(conn) == clean
    assert filenode(conn, "meter_energy_15m") == node
    after = versions(conn)
    assert {m for (m, b), x in after.items() if tampered[(m, b)] != x} == {"m1"}

    conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1 WHERE meter_id IN ('m1', 'm2')")
    conn.commit()
    recompute_all(conn)
    assert snapshot(conn) == clean
    assert filenode(conn, "meter_energy_15m") != node


def test_rollup_rows_of_other_methods_are_kept_and_otherwise_the_table_is_truncated(conn: Any) -> None:
    """The rebuild writes location and direct rows only, as the incremental path does, and keeps
    any other method's rows (e.g. 'market' rows an older release wrote into site_rollups_15m,
    which figures now ignore) by deleting its own; without such rows it TRUNCATEs the table."""
    insert_rows(conn, generate(10))
    clean = rebuilt_from_nothing(conn)
    node = filenode(conn, "site_rollups_15m")
    recompute_all(conn)
    assert snapshot(conn) == clean
    assert filenode(conn, "site_rollups_15m") != node  # truncated, not deleted row by row
    legacy = (
        "INSERT INTO site_rollups_15m (site_id, bucket, carrier, scope, method, kwh)"
        " SELECT site_id, bucket, carrier, scope, 'market', kwh FROM site_rollups_15m"
        " WHERE method = 'location' ORDER BY bucket LIMIT 3"
    )
    conn.execute(legacy)
    conn.commit()
    market = (
        "SELECT site_id, bucket, carrier, scope, kwh FROM site_rollups_15m WHERE method = 'market' ORDER BY 2"
    )
    kept = conn.execute(market).fetchall()
    conn.commit()
    assert len(kept) == 3
    recompute_all(conn)
    assert conn.execute(market).fetchall() == kept
    conn.commit()
    conn.execute("DELETE FROM site_rollups_15m WHERE method = 'market'")
    conn.commit()
    assert snapshot(conn) == clean


def test_rebuild_reports_meters_buckets_rollups_readings_and_events_of_the_incremental_path(
    conn: Any,
) -> None:
    """The rebuild's counts are those of the tables it wrote and of the readings it read, and its
    events (wraps, resets, …) are the incremental path's over the same readings, summed."""
    rows = generate(11)
    insert_rows(conn, rows)
    incremental = recompute_set(conn, dirty_ranges(rows))
    conn.commit()
    events: Counter[str] = Counter()
    for r in incremental:
        events.update(r.events)
    result = recompute_all(conn)
    (buckets,) = conn.execute("SELECT count(*) FROM meter_energy_15m").fetchone()
    (rollups,) = conn.execute("SELECT count(*) FROM site_rollups_15m").fetchone()
    (readings,) = conn.execute(
        "SELECT count(*) FROM readings WHERE quantity IN ('energy_import_kwh', 'gas_m3')"
    ).fetchone()
    conn.commit()
    assert (result.meters, result.buckets, result.rollups, result.readings) == (6, buckets, rollups, readings)
    assert result.events == {n: events[n] for n in result.events} and sum(events.values()) > 0
    assert set(events) <= set(result.events)


def test_rebuild_lists_a_non_finite_reading_under_its_meter_and_counter(conn: Any) -> None:
    """A NaN counter reading is held in quarantined_readings by the rebuild too, named by its meter
    and its counter quantity (here the gas meter's gas_m3, not electricity's)."""
    rows = generate(12)
    gas = sorted(r[2] for r in rows if r[0] == "gas1")
    nan_at = gas[len(gas) // 2] + timedelta(milliseconds=1)
    insert_rows(conn, [*rows, ("gas1", "gas_m3", nan_at, math.nan, 0, "s1", "gw", 0)])
    recompute_all(conn)
    held = conn.execute("SELECT meter_id, quantity, ts, reason FROM quarantined_readings").fetchall()
    conn.commit()
    assert held == [("gas1", "gas_m3", nan_at, "non_finite_value")]
