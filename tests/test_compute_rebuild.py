"""The full rebuild compares the stored meter rows with the computed ones instead of rewriting them:
it leaves equal rows untouched, replaces exactly the meters whose rows differ (by a single bit, a
missing or an extra bucket), removes the rows of meters it has no series for, and rewrites the
table whole when most rows differ. Every path ends with the rows a rebuild from nothing gives."""

from __future__ import annotations

import math
from typing import Any

import psycopg

from compute.rebuild import recompute_all
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
    recompute_all(conn)
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
    with conn.transaction():
        conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1 WHERE meter_id = 'm4'")
        recompute_all(conn)
        inside = conn.execute(
            "SELECT meter_id, bucket, kwh, kwh_estimated, measured_ms, flags FROM meter_energy_15m"
            " ORDER BY 1, 2"
        ).fetchall()
    assert inside == clean[0]


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
    try:
        with caplog.at_level("WARNING", logger="scopemeter.compute"):
            recompute_all(conn)
    finally:
        conn.execute(f'ALTER DATABASE "{db}" CONNECTION LIMIT -1')
        conn.commit()
    assert snapshot(conn) == clean
    assert any(
        "own connection (a second one failed" in r.getMessage() and "too many connections" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
