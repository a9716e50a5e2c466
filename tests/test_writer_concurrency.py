"""Two writers offering the same readings at once — a replay during a consumer-group rebalance —
must both finish and leave each reading exactly once (no deadlock victim ends a writer)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from ingest.writer import ReadingStore, Row

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def _rows(prefix: str, meters: int = 40, steps: int = 100) -> list[Row]:
    return [
        (f"{prefix}-m{m}", "energy_import_kwh", T0 + timedelta(minutes=i), float(i), 0, "site", "gw", 0)
        for m in range(meters)
        for i in range(steps)
    ]


def _race(stores: list[ReadingStore], offers: list[list[Row]]) -> tuple[list[int], list[BaseException]]:
    """Both stores write their offer at the same moment; returns rows inserted and errors."""
    barrier = threading.Barrier(len(stores))
    inserted: list[int] = []
    errors: list[BaseException] = []

    def write(store: ReadingStore, offer: list[Row]) -> None:
        barrier.wait()
        try:
            inserted.append(store.write(offer).inserted)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=pair) for pair in zip(stores, offers, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return inserted, errors


def test_overlapping_writers_both_finish_and_store_each_reading_once(pg_db: str) -> None:
    stores = [ReadingStore(pg_db), ReadingStore(pg_db)]
    try:
        for _round in range(6):
            prefix = f"cc{uuid.uuid4().hex[:8]}"
            rows = _rows(prefix)
            # Opposite orders: the classic deadlock shape for two inserters of the same keys.
            inserted, errors = _race(stores, [rows, list(reversed(rows))])
            assert errors == []
            assert sum(inserted) == len(rows)  # between them, each row inserted once
            with psycopg.connect(pg_db) as conn:
                n = conn.execute(
                    "SELECT count(*) FROM readings WHERE meter_id LIKE %s", (f"{prefix}-%",)
                ).fetchone()
            assert n is not None and n[0] == len(rows)
    finally:
        for s in stores:
            s.close()
