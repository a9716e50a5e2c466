"""Readings appended to a series continue its bucket's stored fold instead of re-reading the bucket,
and give exactly the clean rebuild; anything that breaks the append (late data, another writer of
the rows, changed meter parameters) falls back to re-reading the bucket."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg

from compute.rebuild import recompute_all
from compute.recompute import recompute_set
from ingest.writer import dirty_ranges
from tests.test_compute_recompute import T0, conn
from tests.test_compute_support import Row, compute_dsn, insert_rows, snapshot

__all__ = ["compute_dsn", "conn"]

# One meter, one reading every 2 s inside one 15-minute bucket (T0 is on a bucket boundary).
START = T0 + timedelta(minutes=1, milliseconds=137)


def readings(first: int, last: int) -> list[Row]:
    """Readings ``first`` .. ``last - 1`` of the series (a counter growing faster and faster)."""
    at = [START + timedelta(seconds=2 * k) for k in range(first, last)]
    return [
        ("m4", "energy_import_kwh", t, 1000.0 + 0.013 * k * k, 0, "s2", "gw2", 0)
        for k, t in enumerate(at, first)
    ]


def loaded(conn: psycopg.Connection[Any], rows: list[Row]) -> int:
    insert_rows(conn, rows)
    (result,) = recompute_set(conn, dirty_ranges(rows))
    return result.readings


def clean(conn: psycopg.Connection[Any]) -> tuple[Any, Any]:
    """(the incremental state, the state a clean rebuild gives) of both 15-minute tables."""
    incremental = snapshot(conn)
    recompute_all(conn)
    return incremental, snapshot(conn)


def test_appended_polls_load_only_the_new_readings_and_equal_the_rebuild(conn: Any) -> None:
    assert loaded(conn, readings(0, 100)) == 100  # first sight: the whole bucket
    for k in range(100, 160, 20):
        assert loaded(conn, readings(k, k + 20)) == 21  # the reading before them and the new ones
    incremental, rebuilt = clean(conn)
    assert incremental == rebuilt


def test_late_reading_rereads_the_bucket_and_still_equals_the_rebuild(conn: Any) -> None:
    loaded(conn, readings(0, 100))
    assert loaded(conn, readings(100, 120)) == 21
    late = [(r[0], r[1], r[2] + timedelta(seconds=1), r[3] + 0.001, *r[4:]) for r in readings(50, 51)]
    assert loaded(conn, late) == 121  # not an append: the whole bucket again
    assert loaded(conn, readings(120, 130)) == 11  # that re-read reached the series' end: continued
    incremental, rebuilt = clean(conn)
    assert incremental == rebuilt


def test_rows_written_meanwhile_by_someone_else_are_not_continued(conn: Any) -> None:
    """Another worker (or a transaction rolled back after this one computed) left different rows:
    the stored bucket is not the fold this process remembers, so the bucket is read again."""
    loaded(conn, readings(0, 100))
    conn.execute("UPDATE meter_energy_15m SET kwh = kwh + 1 WHERE meter_id = 'm4'")
    conn.commit()
    assert loaded(conn, readings(100, 120)) == 120
    incremental, rebuilt = clean(conn)
    assert incremental == rebuilt


def test_changed_meter_parameters_reread_the_bucket(conn: Any) -> None:
    loaded(conn, readings(0, 100))
    conn.execute("UPDATE meters SET max_gap_s = 1 WHERE meter_id = 'm4'")  # every interval a gap now
    conn.commit()
    assert loaded(conn, readings(100, 120)) == 120
    incremental, rebuilt = clean(conn)
    assert incremental == rebuilt
