"""The native storage path on the local PostgreSQL (no TimescaleDB there): monthly range partitions
created on demand, rows routed to them, duplicates dropped, concurrent creators, retention.

Each test gets its own freshly migrated database, so partition counts are exact.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from ingest.db import MigrationError, drop_database, ensure_database, load_migrations, migrate
from ingest.storage import apply_retention, storage_info
from ops.cli import main as cli_main

_INSERT = (
    "INSERT INTO readings (meter_id, quantity, ts, value, site_id, gateway_id, batch_seq)"
    " SELECT m, 'energy_import_kwh', t, v, 'site-1', 'gw-1', 1"
    " FROM unnest(%s::text[], %s::timestamptz[], %s::float8[]) AS u(m, t, v)"
    " ON CONFLICT DO NOTHING"
)


def insert(conn: psycopg.Connection[Any], rows: list[tuple[str, datetime, float]]) -> int:
    """Insert (meter, ts, value) rows the way the writer does (ON CONFLICT DO NOTHING); rows inserted."""
    cur = conn.execute(_INSERT, ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
    return cur.rowcount


def ensure(conn: psycopg.Connection[Any], t_min: datetime, t_max: datetime) -> int:
    """scopemeter_ensure_partitions(t_min, t_max): the partitions it created."""
    row = conn.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (t_min, t_max)).fetchone()
    assert row is not None
    return int(row[0])


def partitions(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Partition name -> its bounds, as PostgreSQL prints them in UTC."""
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        rows = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'readings'::regclass"
        ).fetchall()
    return dict(rows)


def bounds(y: int, m: int) -> str:
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return f"FOR VALUES FROM ('{y}-{m:02d}-01 00:00:00+00') TO ('{ny}-{nm:02d}-01 00:00:00+00')"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def fresh_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A new, empty (not migrated) database; dropped afterwards."""
    name = f"scopemeter_storage_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn = make_conninfo(pg_admin_dsn, dbname=name)
    ensure_database(dsn, pg_admin_dsn)
    try:
        yield dsn
    finally:
        drop_database(name, pg_admin_dsn)


@pytest.fixture
def db(fresh_dsn: str) -> str:
    migrate(fresh_dsn)
    return fresh_dsn


def test_migrate_records_the_native_path(fresh_dsn: str) -> None:
    assert migrate(fresh_dsn) == [m.version for m in load_migrations()]
    assert migrate(fresh_dsn) == []  # versioned: nothing applied twice
    with psycopg.connect(fresh_dsn) as conn:
        info = storage_info(conn)
        assert (info.backend, info.chunk_interval, info.compress_after, info.retain_for) == (
            "native",
            "1 mon",
            None,
            "10 years",
        )
        assert info.parts == 0 and info.timescaledb_version is None
        relkind = conn.execute("SELECT relkind FROM pg_class WHERE oid = 'readings'::regclass").fetchone()
        assert relkind == ("p",)
        key = conn.execute(
            "SELECT array_agg(a.attname ORDER BY k.i) FROM pg_index x"
            " CROSS JOIN unnest(x.indkey) WITH ORDINALITY AS k(attnum, i)"
            " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum"
            " WHERE x.indrelid = 'readings'::regclass AND x.indisprimary"
        ).fetchone()
        assert key == (["meter_id", "quantity", "ts"],)
    # the path is chosen once: asking for the other one later is an error, not a silent no-op
    with pytest.raises(MigrationError, match="already stored with native"):
        migrate(fresh_dsn, storage="timescaledb")
    assert migrate(fresh_dsn, storage="native") == []


def test_asking_for_timescaledb_without_the_extension_fails_and_leaves_nothing(
    fresh_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOPEMETER_DB__DSN", fresh_dsn)
    assert cli_main(["db", "migrate", "--storage", "timescaledb"]) == 2
    err = capsys.readouterr().err
    assert "migration 2_readings failed" in err and "no timescaledb extension" in err
    assert "--storage native" in err  # the hint
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT array_agg(version) FROM schema_migrations").fetchone() == ([1],)
        assert conn.execute("SELECT to_regclass('readings')").fetchone() == (None,)
    # the same database then takes the native path
    assert cli_main(["db", "migrate", "--storage", "native"]) == 0
    assert "readings storage: native" in capsys.readouterr().out
    assert cli_main(["db", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "native"
    assert cli_main(["db", "retention"]) == 0
    assert "dropped 0 partitions or chunks" in capsys.readouterr().out


def test_partitions_cover_month_and_year_boundaries_in_utc(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Shanghai'")  # the session zone must not move month edges
        assert ensure(conn, utc(2023, 11, 20), utc(2024, 2, 3)) == 4
        assert partitions(conn) == {
            "readings_y2023m11": bounds(2023, 11),
            "readings_y2023m12": bounds(2023, 12),
            "readings_y2024m01": bounds(2024, 1),
            "readings_y2024m02": bounds(2024, 2),
        }
        assert ensure(conn, utc(2023, 12, 1), utc(2024, 1, 31)) == 0
        # 2024-03-01 00:30 in UTC+8 is still February in UTC: nothing new
        shanghai_march = datetime(2024, 3, 1, 0, 30, tzinfo=UTC) - timedelta(hours=8)
        assert ensure(conn, shanghai_march, shanghai_march) == 0
        assert ensure(conn, utc(2024, 2, 29), utc(2024, 3, 1)) == 1
        # a partition has the primary key of readings (attached, not a copy)
        idx = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index"
            " WHERE indrelid = 'readings_y2024m03'::regclass AND indisprimary"
        ).fetchone()
        assert idx == ("readings_y2024m03_pkey",)

        edge = [
            ("m1", utc(2023, 12, 31, 23, 59, 59) + timedelta(microseconds=999_999), 1.0),
            ("m1", utc(2024, 1, 1), 2.0),
            ("m1", utc(2024, 2, 29, 23, 59, 59), 3.0),
            ("m1", utc(2024, 3, 1), 4.0),
            ("m1", shanghai_march, 5.0),
        ]
        assert insert(conn, edge) == 5
        routed = conn.execute("SELECT tableoid::regclass::text, value FROM readings ORDER BY ts").fetchall()
        assert routed == [
            ("readings_y2023m12", 1.0),
            ("readings_y2024m01", 2.0),
            ("readings_y2024m02", 5.0),
            ("readings_y2024m02", 3.0),
            ("readings_y2024m03", 4.0),
        ]
        # a month without a partition is refused, never silently stored elsewhere
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition"):
            insert(conn, [("m1", utc(2024, 4, 1), 6.0)])
        with pytest.raises(psycopg.errors.RaiseException, match="t_min <= t_max"):
            ensure(conn, utc(2024, 2, 1), utc(2024, 1, 1))


def test_on_conflict_drops_duplicates_across_partitions(db: str) -> None:
    start = utc(2030, 1, 31, 23)
    batch = [(f"m{i % 3}", start + timedelta(minutes=20 * (i // 3)), float(i)) for i in range(18)]  # 2 months
    with psycopg.connect(db, autocommit=True) as conn:
        ensure(conn, batch[0][1], batch[-1][1])
        assert insert(conn, batch) == 18
        later = [(f"m{i % 3}", start + timedelta(minutes=20 * (i // 3)), 100.0 + i) for i in range(18, 24)]
        # a replay of the whole batch plus six new rows: only the new rows land, first write wins
        assert insert(conn, [(m, t, v + 1000) for m, t, v in batch] + later) == 6
        per_partition: dict[str, int] = dict(
            conn.execute("SELECT tableoid::regclass::text, count(*) FROM readings GROUP BY 1").fetchall()
        )
        assert per_partition == {"readings_y2030m01": 9, "readings_y2030m02": 15}  # 23:00, 23:20, 23:40
        assert conn.execute("SELECT sum(value) FROM readings").fetchone() == (
            sum(v for _, _, v in batch) + sum(v for _, _, v in later),
        )


def test_concurrent_callers_create_each_month_once(db: str) -> None:
    callers = 8
    barrier = threading.Barrier(callers)
    created: list[int] = []
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        # overlapping ranges: caller i wants 2031-01 .. 2031-(3+i), spread over a year end for odd i
        t_min = utc(2030, 12, 15) if i % 2 else utc(2031, 1, 2)
        t_max = utc(2031, 3 + i, 1)
        try:
            with psycopg.connect(db) as conn:
                barrier.wait()
                with conn.transaction():
                    n = ensure(conn, t_min, t_max)
                    insert(conn, [(f"c{i}", t_min, 1.0), (f"c{i}", t_max, 2.0)])
                created.append(n)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {"readings_y2030m12"} | {f"readings_y2031m{m:02d}" for m in range(1, 3 + callers)}
    with psycopg.connect(db) as conn:
        assert set(partitions(conn)) == expected
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (2 * callers,)
    assert sum(created) == len(expected)


def test_creating_a_month_waits_for_no_reader_and_cannot_deadlock_with_one(db: str) -> None:
    with psycopg.connect(db) as reader, psycopg.connect(db) as creator:
        # The reader has read readings in its open transaction (ACCESS SHARE lock held, as compute does).
        assert reader.execute("SELECT count(*) FROM readings").fetchone() == (0,)
        # Creating a month must not wait for it: an ACCESS EXCLUSIVE lock on readings would. The
        # lock_timeout turns such a wait into an error instead of a hang (no wait is legitimate here).
        creator.execute("SET lock_timeout = '2s'")
        assert ensure(creator, utc(2032, 5, 1), utc(2032, 5, 2)) == 1
        assert insert(creator, [("r1", utc(2032, 5, 1), 1.0)]) == 1
        creator.commit()
        # The reader, still in its transaction, now needs the same month: no error, no duplicate.
        assert ensure(reader, utc(2032, 5, 3), utc(2032, 5, 3)) == 0
        assert insert(reader, [("r1", utc(2032, 5, 1), 9.0), ("r1", utc(2032, 5, 3), 2.0)]) == 1
        reader.commit()
        assert reader.execute("SELECT array_agg(value ORDER BY ts) FROM readings").fetchone() == ([1.0, 2.0],)


def test_retention_drops_whole_months_past_the_horizon(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        ensure(conn, utc(2014, 1, 1), utc(2016, 3, 31))
        assert len(partitions(conn)) == 27
        insert(conn, [("m1", utc(2016, 1, 31, 23), 1.0), ("m1", utc(2016, 2, 1), 2.0)])
        # default horizon 10 years: as of 2026-02-15 every month ending by 2016-02-15 goes
        assert apply_retention(conn, as_of=utc(2026, 2, 15)) == 25
        assert set(partitions(conn)) == {"readings_y2016m02", "readings_y2016m03"}
        assert conn.execute("SELECT array_agg(value) FROM readings").fetchone() == ([2.0],)
        assert apply_retention(conn, as_of=utc(2026, 2, 15)) == 0

        conn.execute("SELECT scopemeter_set_storage_policy(NULL, '1 month')")
        assert storage_info(conn).retain_for == "1 mon"
        assert apply_retention(conn, as_of=utc(2016, 4, 1)) == 1  # February ends 2016-03-01
        conn.execute("SELECT scopemeter_set_storage_policy(NULL, NULL)")  # keep forever
        assert apply_retention(conn, as_of=utc(2100, 1, 1)) == 0
        assert set(partitions(conn)) == {"readings_y2016m03"}
        with pytest.raises(psycopg.errors.RaiseException, match="compression needs TimescaleDB"):
            conn.execute("SELECT scopemeter_set_storage_policy('30 days', NULL)")
