"""compute/recompute.py's load, kernel and tail steps (``copy_out``, ``_copy_out``,
``_compute_windows``, ``_continued``, ``_tails_after``) against a real PostgreSQL, for mutation
testing (issue 17): each test pins a behaviour a surviving mutant changed.

Binary COPY layout: PostgreSQL 15 manual, "COPY", section "Binary Format" (19-byte header, per
tuple an int16 field count then int32 length + value per field, int16 -1 trailer); timestamptz
binary values are microseconds since 2000-01-01 00:00 UTC. libpq: PostgreSQL 15 manual, "libpq -
Asynchronous Command Processing" and "Functions Associated with the COPY Command".
"""

from __future__ import annotations

import select
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

import compute.recompute as rc
from compute.recompute import (
    _TAILS,
    _TEMP_DDL,
    Params,
    _compute_windows,
    _copy_out,
    _Tail,
    _unregistered,
    copy_out,
    recompute_set,
)
from ingest.writer import dirty_ranges
from tests.test_compute_support import (
    Row,
    apply_registry,
    cn_grid_factor_toml,
    compute_dsn,
    insert_rows,
    reset,
)

__all__ = ["compute_dsn"]

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
# One (bigint, timestamptz, float8, int4) tuple as PostgreSQL sends it: 46 bytes.
ROW = struct.pack(">hiqiqidii", 4, 8, 7, 8, 1_500_000, 8, 2.5, 4, 3)

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "s1"
supplier = "acme"
name = "Plant"
grid_region = "CN"

[[meters]]
id = "ea"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "gb"
site = "s1"
carrier = "natural_gas"
reference_conditions = "15C-101.325kPa"
model = "gas_pulse"
max_kw = {max_kw}
"""


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        c.execute("TRUNCATE quarantined_readings")
        c.commit()
        apply_registry(c, tmp_path, FLEET.format(max_kw=5.0), cn_grid_factor_toml(0.5))
        _TAILS.clear()  # module state of the process: each test starts without folded tails
        yield c
        _TAILS.clear()


@pytest.fixture
def cur(compute_dsn: str) -> Iterator[psycopg.Cursor[Any]]:
    with psycopg.connect(compute_dsn) as c, c.cursor() as cursor:
        yield cursor
        c.rollback()


def _pg_us(ts: datetime) -> int:
    return (ts - PG_EPOCH) // US


# --- copy_out: errors are the server's, in the connection's encoding; one statement only ------------


def test_copy_out_speaks_the_connections_client_encoding(cur: psycopg.Cursor[Any]) -> None:
    """The query is encoded, and the server's error decoded, in the client encoding (LATIN1: 'ä' is
    one byte 0xE4, two in UTF-8); the error is the server's own, with its SQLSTATE."""
    cur.execute("SET client_encoding = 'LATIN1'")
    assert copy_out(cur, "COPY (SELECT length('Zähler')) TO STDOUT") == bytearray(b"6\n")
    cur.execute(
        "CREATE FUNCTION pg_temp.boom() RETURNS int LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'Zähler % kaputt', 7 USING ERRCODE = '22003'; END $$"
    )
    with pytest.raises(psycopg.errors.NumericValueOutOfRange) as raised:
        copy_out(cur, "COPY (SELECT pg_temp.boom()) TO STDOUT")
    assert raised.value.sqlstate == "22003"
    assert raised.value.diag.message_primary == "Zähler 7 kaputt"


def test_copy_out_raises_an_error_that_follows_the_copy(compute_dsn: str) -> None:
    """In autocommit, a deferred constraint fails at the implicit commit, after the COPY's own
    COMMAND_OK: the rows were sent, but the statement failed and must raise (SQLSTATE 23503)."""
    with psycopg.connect(compute_dsn, autocommit=True) as c, c.cursor() as cur:
        cur.execute("CREATE TEMP TABLE parent (id int PRIMARY KEY)")
        cur.execute("CREATE TEMP TABLE child (p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)")
        cur.execute(
            "CREATE FUNCTION pg_temp.orphan() RETURNS int LANGUAGE sql"
            " AS $$ INSERT INTO child VALUES (1) RETURNING p $$"
        )
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            copy_out(cur, "COPY (SELECT pg_temp.orphan()) TO STDOUT")
        assert cur.execute("SELECT count(*) FROM child").fetchone() == (0,)  # rolled back


@pytest.mark.timeout(30)
def test_copy_out_refuses_more_than_one_statement(cur: psycopg.Cursor[Any]) -> None:
    """A second COPY used to leave libpq returning COPY_OUT forever (copy_out spun with the lock
    held); the extended protocol makes the server refuse it (SQLSTATE 42601)."""
    with pytest.raises(psycopg.errors.SyntaxError, match="cannot insert multiple commands"):
        copy_out(cur, "COPY (SELECT 1) TO STDOUT; COPY (SELECT 2) TO STDOUT")
    cur.connection.rollback()
    with pytest.raises(psycopg.errors.SyntaxError, match="cannot insert multiple commands"):
        copy_out(cur, "COPY (SELECT 1) TO STDOUT; SELECT 1")
    cur.connection.rollback()
    assert copy_out(cur, "COPY (SELECT 3) TO STDOUT") == bytearray(b"3\n")  # the connection is fine


@pytest.mark.timeout(30)
def test_copy_out_reads_an_output_larger_than_one_socket_read(cur: psycopg.Cursor[Any]) -> None:
    """10 MB of rows arrive over many socket reads: each ``PQgetCopyData`` must wait for the next
    (blocking mode; in async mode it would return 0 forever, nothing reading the socket)."""
    got = copy_out(cur, "COPY (SELECT repeat('x', 999) || g FROM generate_series(1, 10000) g) TO STDOUT")
    lines = bytes(got).split(b"\n")
    assert len(lines) == 10001 and lines[-1] == b""
    assert all(line == b"x" * 999 + str(g).encode() for g, line in enumerate(lines[:-1], 1))


def test_copy_out_names_what_the_statement_ended_with(cur: psycopg.Cursor[Any]) -> None:
    with pytest.raises(psycopg.OperationalError) as raised:
        copy_out(cur, "SELECT 1")
    assert str(raised.value) == "COPY TO STDOUT ended with TUPLES_OK, not a COPY's COMMAND_OK"
    with pytest.raises(psycopg.OperationalError) as raised:
        copy_out(cur, "")
    assert str(raised.value) == "COPY TO STDOUT ended with EMPTY_QUERY, not a COPY's COMMAND_OK"


def test_copy_out_sends_a_query_larger_than_the_socket_buffer(
    compute_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16 MiB query does not fit the socket at once: ``flush`` reports data left and the loop
    waits (``select``) until the socket takes more. ``select.select`` is only observed here (each
    call is passed on to the real one), so the test knows that loop ran. Whether a send finds
    the socket full depends on how fast the server reads; a fresh connection's receive window
    starts small (tcp_rmem), so its first large query practically always does, and up to ten
    fresh connections are tried."""
    calls: list[tuple[Any, ...]] = []
    real = select.select

    def observed(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(select, "select", observed)
    n = 16 * 1024 * 1024
    for _ in range(10):
        with psycopg.connect(compute_dsn) as c, c.cursor() as cur:
            got = copy_out(cur, f"COPY (SELECT length('{'x' * n}')) TO STDOUT")
            assert got == bytearray(f"{n}\n".encode())
            assert all(args == ([], [c.pgconn.socket], []) for args in calls)
        if calls:
            break
    assert calls, "every query fit the socket at once: the wait loop was not exercised"


# --- _copy_out: framing and row checks with their exact messages ------------------------------------


def test_copy_out_rows_checks_say_what_is_wrong(cur: psycopg.Cursor[Any]) -> None:
    with pytest.raises(RuntimeError) as raised:
        _copy_out(cur, "COPY (SELECT 1) TO STDOUT")  # text, not binary
    assert str(raised.value) == "unexpected COPY BINARY framing from PostgreSQL"
    with pytest.raises(RuntimeError) as raised:
        _copy_out(cur, "COPY (SELECT 1::bigint, NULL::timestamptz, 1.0::float8, 1) TO STDOUT (FORMAT BINARY)")
    assert str(raised.value) == "COPY BINARY rows are not the expected four non-NULL columns"
    # four fields, the last an empty text: 42 bytes of tuple, not a multiple of the 46 expected
    with pytest.raises(RuntimeError) as raised:
        _copy_out(cur, "COPY (SELECT 1::bigint, now(), 1.0::float8, ''::text) TO STDOUT (FORMAT BINARY)")
    assert str(raised.value) == "COPY BINARY rows are not the expected four non-NULL columns"


@pytest.mark.parametrize(
    "stream",
    [
        HEADER + ROW,  # trailer missing (truncated)
        HEADER + ROW + b"\x00\x00",  # trailer garbled
        b"PGCOPY\n\xff\r\n\x01" + bytes(8) + ROW + TRAILER,  # signature garbled
        ROW + TRAILER,  # header missing
    ],
    ids=["truncated", "trailer-garbled", "signature-garbled", "header-missing"],
)
def test_copy_out_refuses_a_stream_with_broken_framing(
    cur: psycopg.Cursor[Any], monkeypatch: pytest.MonkeyPatch, stream: bytes
) -> None:
    """Fault injection (a real PostgreSQL always frames its binary COPY; a broken proxy or a
    corrupted transport would not): ``copy_out`` is replaced by one returning the damaged stream."""
    monkeypatch.setattr(rc, "copy_out", lambda _cur, _sql: bytearray(stream))
    with pytest.raises(RuntimeError) as raised:
        _copy_out(cur, "unused")
    assert str(raised.value) == "unexpected COPY BINARY framing from PostgreSQL"
    monkeypatch.setattr(rc, "copy_out", lambda _cur, _sql: bytearray(HEADER + ROW + TRAILER))
    rows = _copy_out(cur, "unused")  # the same row, framed: accepted
    assert [(int(r["i"]), int(r["ts"]), float(r["v"]), int(r["q"])) for r in rows] == [(7, 1_500_000, 2.5, 3)]


# --- _compute_windows: each window's last reading ---------------------------------------------------


def test_compute_windows_reports_the_last_reading_of_each_window(conn: psycopg.Connection[Any]) -> None:
    """Windows without readings (first, between and after ones with readings) report -1; the
    others their own last reading (PostgreSQL µs), not a neighbour's."""
    t = datetime(2026, 11, 1, 15, tzinfo=UTC)
    q = "energy_import_kwh"
    a = [t, t + timedelta(minutes=1), t + timedelta(minutes=2, microseconds=123)]
    c = [t + timedelta(minutes=5), t + timedelta(minutes=7)]
    insert_rows(
        conn,
        [("a", q, ts, 10.0 + k, 0, "s1", "gw", 0) for k, ts in enumerate(a)]
        + [("c", q, ts, 50.0 + k, 0, "s1", "gw", 0) for k, ts in enumerate(c)],
    )
    ids = ["e0", "a", "e2", "c", "e4"]
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        cur.execute(_TEMP_DDL)
        cur.execute(
            "INSERT INTO compute_windows (i, meter_id, quantity, b0, b1, lo, hi)"
            " SELECT i - 1, m, %s, %s, %s, %s, %s FROM unnest(%s::text[]) WITH ORDINALITY AS u(m, i)",
            (q, t, t + timedelta(minutes=15), t, t + timedelta(minutes=15), ids),
        )
        meters = [_unregistered("s1", Params())] * len(ids)
        keep = (np.full(len(ids), 0, dtype=np.int64), np.full(len(ids), 2**62, dtype=np.int64))
        done = _compute_windows(cur, ids, [q] * len(ids), meters, keep)
    assert done.loaded.tolist() == [0, 3, 0, 2, 0]
    assert done.last_us.tolist() == [-1, _pg_us(a[-1]), -1, _pg_us(c[-1]), -1]


# --- quarantine through recompute_set: the right series, bound and range ----------------------------


def _series(meter: str, quantity: str, rate: float, spike_at: int | None = None) -> list[Row]:
    t = datetime(2026, 11, 1, 15, tzinfo=UTC)
    return [
        (meter, quantity, t + timedelta(minutes=k), 100.0 + rate * k + (1000.0 if k == spike_at else 0.0), 0,
         "s1", "gw", 0)
        for k in range(10)
    ]  # fmt: skip


def test_a_spike_is_quarantined_for_its_own_series_and_lifted_by_a_recompute(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Two series in one poll; the second (gas, max_kw 5 m3/h) jumps by 1000 m3 in a minute at
    reading 5: that reading is held under its own meter and quantity, with its bound in the
    detail. Once max_kw is raised, replaying the batch recomputes the range and lifts it."""
    rows = _series("ea", "energy_import_kwh", 0.5) + _series("gb", "gas_m3", 0.03125, spike_at=5)
    insert_rows(conn, rows)
    ranges = dirty_ranges(rows)
    assert [(d.meter_id, d.quantity) for d in ranges] == [("ea", "energy_import_kwh"), ("gb", "gas_m3")]
    recompute_set(conn, ranges)
    held = conn.execute(
        "SELECT meter_id, quantity, ts, value, reason, detail FROM quarantined_readings"
    ).fetchall()
    # 1.875 m3/h, then 100.125 → 1100.15625 in 60 s; 5 m3/h allows 5 × 60 / 3600 = 0.0833333 m3
    assert held == [
        (
            "gb",
            "gas_m3",
            datetime(2026, 11, 1, 15, 5, tzinfo=UTC),
            1100.15625,
            "implausible_jump",
            "counter went from 100.125 to 1100.15625 in 60 s; max_kw 5 allows at most 0.0833333 per interval",
        )
    ]
    conn.commit()
    apply_registry(conn, tmp_path, FLEET.format(max_kw=1e9), cn_grid_factor_toml(0.5))
    recompute_set(conn, ranges)  # a replayed batch: the same ranges again
    assert conn.execute("SELECT count(*) FROM quarantined_readings").fetchone() == (0,)
    conn.commit()


# --- tails: where a series' fold may be continued ---------------------------------------------------


def test_a_series_ending_exactly_at_the_postgres_epoch_keeps_its_tail(conn: psycopg.Connection[Any]) -> None:
    """A last reading at 2000-01-01 00:00:00 UTC is 0 µs in PostgreSQL's binary timestamps: a
    reading like any other (only -1 means "none loaded"); it lies on a bucket boundary, so its
    tail has no stored row to check."""
    q = "energy_import_kwh"
    rows: list[Row] = [
        ("z", q, PG_EPOCH - timedelta(minutes=2), 1.0, 0, "s1", "gw", 0),
        ("z", q, PG_EPOCH - timedelta(minutes=1), 2.0, 0, "s1", "gw", 0),
        ("z", q, PG_EPOCH, 3.0, 0, "s1", "gw", 0),
    ]
    insert_rows(conn, rows)
    (r,) = recompute_set(conn, dirty_ranges(rows))
    assert (r.readings, r.buckets, r.registered) == (3, 1, False)
    params = (0.0, 900_000, 0.0)  # an unregistered meter: no counter_max, default max_gap_s 900
    assert _TAILS[("z", q)] == _Tail(0, params, 946_684_800_000, None)


def test_continuation_needs_the_very_reading_it_folded_to(conn: psycopg.Connection[Any]) -> None:
    """After 2285-06-04 23:47:34.740992 UTC PostgreSQL's µs count exceeds 2**53, where a float64
    no longer tells n from n + 1. The series was folded to R1 at exactly 2**53 µs; R2, 1 µs later,
    was written and not recomputed here (another worker's); R3 then appends. R2 is not R1, so the
    bucket is recomputed from its start: 0 → 10 → 15 → 20 counts 20 kWh over four readings."""
    q = "energy_import_kwh"
    r1 = PG_EPOCH + (2**53) * US
    assert r1 == datetime(2285, 6, 4, 23, 47, 34, 740992, tzinfo=UTC)
    first: list[Row] = [
        ("far", q, datetime(2285, 6, 4, 23, 46, tzinfo=UTC), 0.0, 0, "s1", "gw", 0),
        ("far", q, r1, 10.0, 0, "s1", "gw", 0),
    ]
    insert_rows(conn, first)
    recompute_set(conn, dirty_ranges(first))
    assert _TAILS[("far", q)].ts_us == 2**53
    insert_rows(conn, [("far", q, r1 + US, 15.0, 0, "s1", "gw", 0)])
    last: list[Row] = [("far", q, datetime(2285, 6, 4, 23, 49, tzinfo=UTC), 20.0, 0, "s1", "gw", 0)]
    insert_rows(conn, last)
    (r,) = recompute_set(conn, dirty_ranges(last))
    assert r.readings == 4
    assert conn.execute("SELECT bucket, kwh FROM meter_energy_15m WHERE meter_id = 'far'").fetchall() == [
        (datetime(2285, 6, 4, 23, 45, tzinfo=UTC), 20.0)
    ]
    conn.commit()
