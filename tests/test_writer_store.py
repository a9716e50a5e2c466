"""The writer's store seam: the ``ingest.store`` setting picks the engine from ``STORES``; the
PostgreSQL store does what the loop relies on (commit before returning, replays counted, not
inserted). The ordering rules stay in ``ingest.writer._flush``, which only sees ``Store``."""

from __future__ import annotations

import typing
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from pydantic import ValidationError

from ingest.writer import STORES, ReadingStore, Row, Store, open_store
from ops.settings import DbSettings, IngestSettings, Settings


def test_every_store_name_the_setting_accepts_has_an_engine_and_nothing_else_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = set(typing.get_args(IngestSettings.model_fields["store"].annotation))
    assert names == set(STORES)
    monkeypatch.setenv("SCOPEMETER_INGEST__STORE", "cassandra")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "store" in str(err.value)


def test_the_selected_store_commits_before_it_returns_and_counts_replays(pg_db: str) -> None:
    store: Store = open_store(Settings(db=DbSettings(dsn=pg_db)))
    assert isinstance(store, ReadingStore)
    t0 = datetime(2026, 11, 3, tzinfo=UTC)
    rows: list[Row] = [
        ("seam-m1", "energy_import_kwh", t0 + timedelta(minutes=k), float(k), 0, "seam-s", "seam-g", 1)
        for k in range(5)
    ]
    try:
        first = store.write(rows)
        replay = store.write(rows[2:])
    finally:
        store.close()
    assert (first.offered, first.inserted) == (5, 5)
    assert (replay.offered, replay.inserted) == (3, 0)
    with psycopg.connect(pg_db) as conn:  # another session sees the rows: they were committed
        (count,) = conn.execute("SELECT count(*) FROM readings WHERE meter_id = 'seam-m1'").fetchone() or (0,)
    assert count == 5
