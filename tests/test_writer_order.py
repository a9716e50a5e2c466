"""The writer's ordering guarantee (ingest/writer.py docstring): only after the DB commit are the
dirty ranges published and the Kafka offsets committed, so a crash anywhere replays records and
never loses them. Checked against a real PostgreSQL: at the moment the writer publishes or commits
an offset, a separate connection must already see the rows.

Kafka is a stand-in that records each call together with what PostgreSQL shows at that instant: a
real broker cannot report the order of a client's calls against another system's commit."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta

import psycopg
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from ingest.writer import ReadingStore, _Flush, _flush
from ops.db_session import Reconnecting
from ops.runtime import Stopped
from ops.settings import DbSettings, Settings
from tests.helpers import make_batch


class Witness:
    """Stand-in for the writer's Kafka producer and consumer: each call notes the rows visible."""

    def __init__(self, dsn: str, prefix: str) -> None:
        self.dsn, self.prefix = dsn, prefix
        self.calls: list[tuple[str, int]] = []

    def visible(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM readings WHERE meter_id LIKE %s", (self.prefix + "%",))
            return int(row.fetchone()[0])  # type: ignore[index]

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[None]:
        self.calls.append((f"publish {topic}", self.visible()))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def send_and_wait(self, topic: str, value: bytes) -> None:
        self.calls.append((f"letter {topic}", self.visible()))

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.calls.append((f"commit {sorted(o.offset for o in offsets.values())}", self.visible()))


def record(offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("readings.v1", 0, offset, 0, 0, None, value, None, 0, len(value), [])


async def flush_twice(dsn: str, prefix: str, witness: Witness) -> None:
    stop = asyncio.Event()
    db = Reconnecting(lambda: ReadingStore(dsn), ReadingStore.close, ReadingStore.ping, stop=stop)
    settings = Settings(db=DbSettings(dsn=dsn))
    first = [record(0, make_batch(0, meter_prefix=prefix).encode()), record(1, b"not json")]
    second = [record(2, make_batch(1, meter_prefix=prefix, step=timedelta(minutes=2)).encode())]
    try:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        a = _Flush(written, asyncio.create_task(
            _flush(first, None, written, db, witness, witness, settings)))  # type: ignore[arg-type]
        written2: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        b = _Flush(written2, asyncio.create_task(
            _flush(second, a, written2, db, witness, witness, settings)))  # type: ignore[arg-type]
        await asyncio.gather(a.task, b.task)
    finally:
        await db.close()


def test_dirty_ranges_and_offsets_go_out_only_after_the_db_commit_and_in_order(pg_db: str) -> None:
    prefix = f"w{uuid.uuid4().hex[:8]}-"
    witness = Witness(pg_db, prefix)
    asyncio.run(flush_twice(pg_db, prefix, witness))
    settings = Settings()
    committed, dlq = settings.kafka.committed_topic, settings.kafka.dlq_topic
    # In order: the first batch's letter, dirty ranges and offsets, then the second's. The second
    # batch may already be written while the first publishes (the pipeline), so a call sees at least
    # its own batch's rows (6 each), never fewer.
    names = [name for name, _ in witness.calls]
    assert names == [
        f"letter {dlq}", f"publish {committed}", "commit [2]", f"publish {committed}", "commit [3]"
    ]
    seen = [n for _, n in witness.calls]
    assert min(seen[:3]) >= 6 and min(seen[3:]) == 12


def test_no_offset_is_committed_when_the_write_fails(pg_db: str) -> None:
    """A batch whose transaction never commits (PostgreSQL unreachable while the service stops)
    publishes nothing and commits no offset: Kafka keeps its records for the next writer."""
    prefix = f"w{uuid.uuid4().hex[:8]}-"
    witness = Witness(pg_db, prefix)

    async def scenario() -> None:
        stop = asyncio.Event()
        stop.set()  # the service is stopping: a failed connection is not retried
        db = Reconnecting(lambda: ReadingStore("postgresql://nobody@127.0.0.1:1/none"), ReadingStore.close,
                          ReadingStore.ping, stop=stop)  # fmt: skip
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        records = [record(0, make_batch(0, meter_prefix=prefix).encode())]
        with pytest.raises(Stopped):
            await _flush(records, None, written, db, witness, witness, Settings())  # type: ignore[arg-type]
        assert written.done() and (written.cancelled() or written.exception() is not None)

    asyncio.run(scenario())
    assert witness.calls == []


def test_a_deadlock_victim_is_retried_with_backoff_then_given_up(
    pg_db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``ReadingStore.write`` retries a transaction PostgreSQL rolled back as a deadlock victim (or a
    serialization failure), sorted into identity order, with a doubling pause, at most ``attempts``
    times. A fake raises the rollback: two real writers cannot be made to deadlock on demand."""
    import ingest.writer
    from ingest.writer import batch_rows

    pauses: list[float] = []
    monkeypatch.setattr(ingest.writer.time, "sleep", pauses.append)
    store = ReadingStore(pg_db)
    real = store._write
    seen: list[tuple[object, object]] = []
    failures = [psycopg.errors.DeadlockDetected("deadlock detected"),
                psycopg.errors.SerializationFailure("could not serialize")]  # fmt: skip

    def flaky(rows: list[tuple[object, ...]], span: tuple[object, object]) -> object:
        seen.append((list(rows), span))
        if failures:
            raise failures.pop(0)
        return real(rows, span)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_write", flaky)
    rows = batch_rows([make_batch(0, meter_prefix=f"d{uuid.uuid4().hex[:8]}-")])
    try:
        with caplog.at_level(logging.WARNING, logger="scopemeter.writer"):
            result = store.write(list(reversed(rows)))
        assert result.inserted == len(rows) == 6
        assert seen == [(sorted(rows), (rows[0][2], rows[-1][2]))] * 3
        assert pauses == [0.1, 0.2]
        assert [r.getMessage() for r in caplog.records] == [
            "write attempt 1 of 5 rolled back (deadlock detected); retrying",
            "write attempt 2 of 5 rolled back (could not serialize); retrying",
        ]
        # Always a victim: given up after the last attempt, the error raised.
        failures[:] = [psycopg.errors.DeadlockDetected("again")] * 3
        pauses.clear()
        with pytest.raises(psycopg.errors.DeadlockDetected):
            store.write(rows, attempts=3)
        assert pauses == [0.1, 0.2]
    finally:
        store.close()
