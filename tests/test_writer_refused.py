"""Rows PostgreSQL refuses, and the store's partition bookkeeping, in-process against a real
PostgreSQL (ingest/writer.py: ``_write``, ``_write_each``, ``ReadingStore``).

A record the bridge did not write may carry a text PostgreSQL cannot store (a NUL character): the
batch's COPY fails, the writer then writes the records one by one, letters the refused one
(``db_refused``, its original bytes) and stores the rest; the refused rows get no dirty range.
``tests/test_ingest.py`` shows the same through Kafka; these call the functions directly so that
mutation testing (``make mutate``) can run them in a second.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from aiokafka import ConsumerRecord

from edge.wire import Quantity
from ingest.dlq import Reason
from ingest.writer import (
    ReadingStore,
    Row,
    WriteResult,
    _estimate_rows,
    _first_line,
    _flush,
    _months_between,
    _write,
    decode_records,
    prepare,
)
from ops import metrics
from ops.db_session import Reconnecting
from ops.settings import DbSettings, Settings
from tests.helpers import T0, make_batch
from tests.test_writer_order import Witness, record


def _record(value: bytes | None, offset: int, topic: str = "readings-x") -> ConsumerRecord[bytes, bytes]:
    size = len(value) if value is not None else 0
    return ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, size, [])


def _count(dsn: str, prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM readings WHERE meter_id LIKE %s", (prefix + "%",)).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def store(pg_db: str) -> Iterator[ReadingStore]:
    s = ReadingStore(pg_db)
    yield s
    s.close()


def test_a_refused_record_becomes_a_letter_and_the_others_are_written(
    store: ReadingStore, pg_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}-"
    # The newer batch comes first, the older last: the result's newest timestamp is the newer one's.
    newer = make_batch(5, meter_prefix=prefix).encode()
    older = make_batch(1, meter_prefix=prefix).encode()
    poison = make_batch(3, meter_prefix=prefix).encode().replace(f'"{prefix}0"'.encode(),
                                                                 f'"{prefix}\\u0000x"'.encode())  # fmt: skip
    assert b"\\u0000" in poison
    records = [_record(newer, 10), _record(poison, 11), _record(older, 12)]
    prepared = prepare(records)
    assert len(prepared.rows) == 18 and prepared.letters == []
    with caplog.at_level(logging.WARNING, logger="scopemeter.writer"):
        result = _write(store, prepared=prepared)
    assert (result.offered, result.inserted) == (12, 12)
    newest = max(r.ts for r in make_batch(5, meter_prefix=prefix).readings)
    assert result.newest_ts == newest
    assert _count(pg_db, prefix) == 12
    (letter,) = prepared.letters
    assert letter.reason is Reason.DB_REFUSED and letter.topic == "kafka:readings-x"
    assert base64.b64decode(letter.payload_b64) == poison
    assert letter.detail and "\n" not in letter.detail and letter.detail == letter.detail.strip()
    assert [r.getMessage() for r in caplog.records] == [
        f"PostgreSQL refused a batch of 3 records ({letter.detail}); writing them one by one"
    ]
    # The refused record's rows (all of batch 3) have no dirty range; every written row has one.
    written = [r for r in prepared.rows if r[7] != 3]
    assert len(written) == 12
    assert sum(d.rows for d in prepared.dirty) == 12
    for meter in (f"{prefix}0", f"{prefix}1"):
        stamps = [r[2] for r in written if r[0] == meter]
        (d,) = [d for d in prepared.dirty if d.meter_id == meter]
        assert (d.t_min, d.t_max, d.rows) == (min(stamps), max(stamps), len(stamps))
    # Replayed: every row is counted as offered again and none inserted; the same record refused.
    again = prepare(records)
    replay = _write(store, prepared=again)
    assert (replay.offered, replay.inserted, replay.newest_ts) == (12, 0, newest)
    assert [x.reason for x in again.letters] == [Reason.DB_REFUSED]


def test_newest_timestamp_of_a_one_by_one_write_is_the_newest_of_all_parts(store: ReadingStore) -> None:
    prefix = f"n{uuid.uuid4().hex[:8]}-"
    poison = b'{"not": "a batch"}'
    older = make_batch(1, meter_prefix=prefix).encode()
    newer = make_batch(5, meter_prefix=prefix).encode()
    bad_row = (
        make_batch(2, meter_prefix=prefix)
        .encode()
        .replace(f'"{prefix}1"'.encode(), f'"{prefix}\\u0000"'.encode())
    )
    # A record that fails validation first (no rows, a schema letter), then oldest to newest.
    prepared = prepare([_record(poison, 0), _record(older, 1), _record(bad_row, 2), _record(newer, 3)])
    assert [x.reason for x in prepared.letters] == [Reason.SCHEMA]
    result = _write(store, prepared=prepared)
    assert result.newest_ts == max(r.ts for r in make_batch(5, meter_prefix=prefix).readings)
    assert (result.offered, result.inserted) == (12, 12)
    assert [x.reason for x in prepared.letters] == [Reason.SCHEMA, Reason.DB_REFUSED]


def test_a_batch_postgresql_takes_is_written_whole_and_keeps_its_dirty_ranges(store: ReadingStore) -> None:
    prefix = f"w{uuid.uuid4().hex[:8]}-"
    prepared = prepare([_record(make_batch(0, meter_prefix=prefix).encode(), 0)])
    dirty = list(prepared.dirty)
    result = _write(store, prepared=prepared)
    assert (result.offered, result.inserted) == (6, 6)
    assert result.newest_ts == max(r[2] for r in prepared.rows)
    assert prepared.dirty == dirty and prepared.letters == []


def test_an_empty_write_touches_nothing(store: ReadingStore) -> None:
    assert store.write([]) == WriteResult(0, 0, None)
    store.ping()  # the connection is still usable (no transaction left open)


def test_a_month_never_written_gets_its_partition_and_a_known_month_is_not_asked_again(
    store: ReadingStore, pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No default partition: a row of a month without one is refused by PostgreSQL. The store
    creates the months a batch spans (in UTC), and remembers them so it asks once per month."""
    prefix = f"p{uuid.uuid4().hex[:8]}-"
    year = 2100 + int(prefix[1:9], 16) % 50  # a year no other test writes
    # 31 Dec 23:30 at UTC-05:00 is already 1 January in UTC: both months must exist.
    local = timezone(timedelta(hours=-5))
    t_dec = datetime(year, 12, 31, 18, 0, tzinfo=local)
    t_jan = datetime(year, 12, 31, 23, 30, tzinfo=local)
    rows: list[Row] = [(f"{prefix}m", Quantity.ENERGY_IMPORT_KWH.value, t, 1.0, 0, "s", "g", 1)
                       for t in (t_dec, t_jan)]  # fmt: skip
    asked: list[str] = []

    class Spy:  # the store's connection, noting each statement its cursors run
        def __init__(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
            self.conn = conn

        def __getattr__(self, name: str) -> object:
            return getattr(self.conn, name)

        def cursor(self) -> object:
            return SpyCursor(self.conn.cursor())

    class SpyCursor:
        def __init__(self, cur: psycopg.Cursor[tuple[object, ...]]) -> None:
            self.cur = cur

        def __getattr__(self, name: str) -> object:
            return getattr(self.cur, name)

        def __enter__(self) -> SpyCursor:
            return self

        def __exit__(self, *exc: object) -> None:
            self.cur.close()

        def execute(self, query: str, params: Sequence[Any] | None = None) -> object:
            asked.append(query)
            return self.cur.execute(query, params)

    monkeypatch.setattr(store, "conn", Spy(store.conn))
    assert store.write(rows).inserted == 2
    assert sum("scopemeter_ensure_partitions" in q for q in asked) == 1
    assert store._months == {date(year, 12, 1), date(year + 1, 1, 1)}

    def at(*stamps: datetime) -> list[Row]:
        return [(f"{prefix}m", Quantity.ENERGY_IMPORT_KWH.value, t, 2.0, 0, "s", "g", 2) for t in stamps]

    # January alone, December alone, both again: every month is known, none is asked for again.
    minute = timedelta(minutes=1)
    assert store.write(at(t_jan + minute)).inserted == 1
    assert store.write(at(t_dec + minute)).inserted == 1
    assert store.write(at(t_dec + 2 * minute, t_jan + 2 * minute)).inserted == 2
    assert sum("scopemeter_ensure_partitions" in q for q in asked) == 1
    assert store._months == {date(year, 12, 1), date(year + 1, 1, 1)}
    assert _count(pg_db, prefix) == 6


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone set to one far from UTC: the host's own zone must not matter."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_utc")
def test_months_between_are_the_utc_months_of_the_span() -> None:
    d = date
    plus5 = timezone(timedelta(hours=5))
    # 1 Dec 02:00 at +05:00 is still 30 November in UTC.
    assert _months_between(datetime(2026, 12, 1, 2, tzinfo=plus5), datetime(2027, 2, 3, tzinfo=UTC)) == {
        d(2026, 11, 1),
        d(2026, 12, 1),
        d(2027, 1, 1),
        d(2027, 2, 1),
    }
    assert _months_between(T0, T0) == {d(2026, 11, 1)}
    # 31 January 20:00 UTC is already February at +08:00: still January.
    assert _months_between(T0, datetime(2027, 1, 31, 20, tzinfo=UTC)) == {
        d(2026, 11, 1),
        d(2026, 12, 1),
        d(2027, 1, 1),
    }
    assert _months_between(datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)) == {
        d(2026, 1, 1),
        d(2026, 2, 1),
    }


def test_first_line_of_an_error_names_it_even_without_text() -> None:
    assert (
        _first_line(ValueError("  invalid byte sequence\nCONTEXT: COPY readings  "))
        == "invalid byte sequence"
    )
    assert _first_line(ValueError("one line")) == "one line"
    assert _first_line(ValueError("")) == "ValueError"
    assert _first_line(KeyError()) == "KeyError"
    assert _first_line(ValueError(" \n ")) == "ValueError"


def test_rows_are_estimated_at_110_bytes_a_reading_at_least_one() -> None:
    assert _estimate_rows(_record(b"x" * 1099, 0)) == 9
    assert _estimate_rows(_record(b"x" * 1100, 0)) == 10
    assert _estimate_rows(_record(b"x" * 50, 0)) == 1
    assert _estimate_rows(_record(None, 0)) == 1
    assert _estimate_rows(_record(b"", 0)) == 1


def _seconds(name: str) -> float:
    return metrics.WRITER.get_sample_value(f"{name}_sum") or 0.0


def test_decode_and_commit_times_are_the_time_they_took(store: ReadingStore) -> None:
    """Each observation lies between zero and the wall time around the call (never a timestamp)."""
    records = [_record(make_batch(0, meter_prefix=f"t{uuid.uuid4().hex[:8]}-").encode(), 0)]
    decode0, commit0 = (
        _seconds("scopemeter_writer_decode_seconds"),
        _seconds("scopemeter_writer_commit_seconds"),
    )
    started = time.monotonic()
    prepared = prepare(records)
    between = time.monotonic()
    _write(store, prepared=prepared)
    ended = time.monotonic()
    assert 0 <= _seconds("scopemeter_writer_decode_seconds") - decode0 <= between - started
    assert 0 <= _seconds("scopemeter_writer_commit_seconds") - commit0 <= ended - between


def test_a_flush_counts_new_and_replayed_rows_and_the_commit_latency(pg_db: str) -> None:
    """What ``_flush`` reports: rows inserted and duplicate (a replay), the commit's latency and last
    commit time (only when something was new), and nothing about time for a batch without rows.
    Kafka is test_writer_order's Witness stand-in (it only records the calls)."""
    prefix = f"f{uuid.uuid4().hex[:8]}-"
    witness = Witness(pg_db, prefix)
    settings = Settings(db=DbSettings(dsn=pg_db))
    good = [record(0, make_batch(0, meter_prefix=prefix).encode())]

    def sample(name: str, **labels: str) -> float:
        return metrics.WRITER.get_sample_value(name, labels) or 0.0

    def counts() -> tuple[float, float, float, float]:
        rows = [sample("scopemeter_writer_rows_total", outcome=o) for o in ("inserted", "duplicate")]
        latency = sample("scopemeter_writer_reading_latency_seconds_count")
        return rows[0], rows[1], latency, sample("scopemeter_writer_last_commit_timestamp_seconds")

    async def flush(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        stop = asyncio.Event()
        db = Reconnecting(lambda: ReadingStore(pg_db), ReadingStore.close, ReadingStore.ping, stop=stop)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await _flush(records, None, written, db, witness, witness, settings)  # type: ignore[arg-type]
        finally:
            await db.close()

    before = counts()
    asyncio.run(flush(good))
    first = counts()
    assert first[:3] == (before[0] + 6, before[1], before[2] + 1)
    assert first[3] > 0 and first[3] != before[3]
    asyncio.run(flush(good))  # a replay: nothing new, so no new last-commit time
    replay = counts()
    assert replay == (first[0], first[1] + 6, first[2] + 1, first[3])
    asyncio.run(flush([record(1, b"not json")]))  # no rows: a letter, no latency
    assert counts() == replay
    # Readings stamped ahead of the commit (a gateway clock a little fast): latency 0, not negative.
    latency = sample("scopemeter_writer_reading_latency_seconds_sum")
    ahead = make_batch(0, meter_prefix=prefix + "a", start=datetime.now(UTC) + timedelta(hours=1))
    asyncio.run(flush([record(2, ahead.encode())]))
    assert counts()[2] == replay[2] + 1
    assert sample("scopemeter_writer_reading_latency_seconds_sum") == latency


def test_a_deadlock_victim_waits_twice_as_long_before_each_new_attempt(
    store: ReadingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0.1, 0.2, 0.4 s: doubling (a fake raises the rollback, as in test_writer_order)."""
    pauses: list[float] = []
    monkeypatch.setattr("ingest.writer.time.sleep", pauses.append)
    real = store._write
    failures = [psycopg.errors.DeadlockDetected("deadlock detected")] * 3

    def flaky(rows: Sequence[Row], span: tuple[datetime, datetime] | None) -> WriteResult:
        if failures:
            raise failures.pop()
        return real(rows, span)

    monkeypatch.setattr(store, "_write", flaky)
    rows = [(f"q{uuid.uuid4().hex[:8]}", Quantity.GAS_M3.value, T0, 1.0, 0, "s", "g", 1)]
    assert store.write(rows).inserted == 1
    assert pauses == [0.1, 0.2, 0.4]


def test_the_span_of_a_batch_is_its_oldest_and_newest_reading() -> None:
    """Every meter has several readings here, so the oldest reading is no run's last one."""
    batch = make_batch(0, meters=2, steps=3)
    prepared = prepare([_record(batch.encode(), 0)])
    stamps = [r.ts for r in batch.readings]
    assert prepared.span == (min(stamps), max(stamps)) == (T0, T0 + timedelta(minutes=2))
    assert prepare([_record(b"not json", 1)]).span is None  # no rows, no span


def test_a_record_without_a_value_is_an_empty_schema_letter_saying_why() -> None:
    rows, letters = decode_records([_record(None, 0), _record(b"{}", 1)])
    assert rows == [] and [x.reason for x in letters] == [Reason.SCHEMA, Reason.SCHEMA]
    assert (letters[0].payload_bytes, base64.b64decode(letters[0].payload_b64)) == (0, b"")
    assert "validation error" in letters[1].detail and letters[1].topic == "kafka:readings-x"
