"""The writer's loop (``ingest.writer.run_writer``) in-process, against the session's real Kafka
broker and a real PostgreSQL:

- a batch goes out when its rows reach the target, or when it has lingered long enough, and what
  was consumed is flushed when the service stops;
- rows are stored, a record that fails validation becomes a DLQ letter, the dirty ranges are
  published per site (keyed by site), and the group's offsets move past every record;
- stopped while PostgreSQL is away, the writer returns without committing any offset: the records
  stay in Kafka for the next writer.

No clock is read by the test: each wait is for an observable condition (a row count, a committed
offset, the record having been taken into the batch at hand).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

import ingest.writer
from edge.wire import Batch
from ingest.dlq import DeadLetter, Reason
from ingest.events import DirtyRange, decode_dirty
from ingest.writer import run_writer
from ops import metrics
from ops.procs import ManagedProcess
from ops.settings import DbSettings, KafkaSettings, Settings, StackSettings
from ops.stack import ensure_topics_async
from tests.helpers import make_batch

WAIT = 30.0  # seconds any single expected event may take before the test fails


def _settings(kafka: ManagedProcess, dsn: str, state: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    k = KafkaSettings(bootstrap=f"{kafka.host}:{kafka.port}", writer_group=f"writer-{tag}", partitions=1)
    k = k.model_copy(update={"readings_topic": f"readings-{tag}", "dlq_topic": f"dlq-{tag}"})
    k = k.model_copy(update={"committed_topic": f"committed-{tag}"})
    return Settings(kafka=k, db=DbSettings(dsn=dsn), stack=StackSettings(state_dir=state))


class Taken:
    """Notes each record the loop takes into its batch at hand (a spy on ``_estimate_rows``, which
    the loop calls once per record as it takes it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.values: list[bytes] = []
        real = ingest.writer._estimate_rows

        def spy(record: ConsumerRecord[bytes, bytes]) -> int:
            self.values.append(record.value or b"")
            return real(record)

        monkeypatch.setattr(ingest.writer, "_estimate_rows", spy)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[Taken]:
    yield Taken(monkeypatch)


async def _produce(s: Settings, values: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka.bootstrap, acks="all", max_request_size=s.kafka.max_message_bytes
    )
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(s.kafka.readings_topic, value, key=key.encode())
    finally:
        await producer.stop()


async def _topic(s: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a one-partition topic so far."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        got: list[ConsumerRecord[bytes, bytes]] = []
        while len(got) < end:
            for batch in (await consumer.getmany(tp, timeout_ms=200)).values():
                got.extend(batch)
        return got
    finally:
        await consumer.stop()


async def _committed(s: Settings) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap, group_id=s.kafka.writer_group,
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(s.kafka.readings_topic, 0)) or 0
    finally:
        await consumer.stop()


def _rows(s: Settings, prefix: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(s.db.dsn) as conn:
        return conn.execute(
            "SELECT meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq"
            " FROM readings WHERE meter_id LIKE %s ORDER BY 1, 2, 3",
            (prefix + "%",),
        ).fetchall()


def _want(batches: list[Batch]) -> list[tuple[Any, ...]]:
    return sorted((r.meter_id, r.quantity.value, r.ts, r.value, r.quality, b.site, b.gateway, b.seq)
                  for b in batches for r in b.readings)  # fmt: skip


async def until(what: str, probe: Callable[[], Awaitable[Any]], task: asyncio.Task[None]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await probe():
        if task.done():
            task.result()
            raise AssertionError(f"the writer stopped while waiting for {what}")
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_batches_go_out_when_full_or_on_stop_and_everything_is_published_and_committed(
    kafka: ManagedProcess, pg_db: str, tmp_path: Path, taken: Taken, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(kafka, pg_db, tmp_path)
    prefix = f"l{uuid.uuid4().hex[:8]}-"
    start = datetime(2026, 11, 2, tzinfo=UTC)
    a = make_batch(0, site="site-a", meter_prefix=prefix, start=start)
    b = make_batch(1, site="site-b", meter_prefix=prefix, start=start)
    c = make_batch(2, site="site-a", meter_prefix=prefix, meters=1, steps=1, start=start + timedelta(hours=1))
    # The row target is exactly what a, b and the bad record are estimated at (about 110 bytes a
    # reading, at least one a record): a and b never fill a batch, the bad record completes it.
    target = sum(max(1, len(x) // 110) for x in (a.encode(), b.encode(), b"not json"))
    assert max(1, len(c.encode()) // 110) < target
    made: list[dict[str, object]] = []

    def producer(**kw: Any) -> AIOKafkaProducer:
        made.append(kw)
        return AIOKafkaProducer(**kw)

    monkeypatch.setattr(ingest.writer, "AIOKafkaProducer", producer)
    health = metrics.Health("kafka", "db")

    def batches() -> tuple[float, float]:  # (batches written, rows offered) so far, in this process
        count = metrics.WRITER.get_sample_value("scopemeter_writer_batch_rows_count") or 0.0
        return count, metrics.WRITER.get_sample_value("scopemeter_writer_batch_rows_sum") or 0.0

    before = batches()

    async def scenario() -> None:
        await ensure_topics_async(s.kafka)
        stop = asyncio.Event()
        # Lingering never ends a batch here: only the row target and the stop do.
        task = asyncio.create_task(
            run_writer(s, stop, batch_rows_target=target, linger_s=3600.0, health=health)
        )
        try:
            await _produce(s, [("site-a", a.encode()), ("site-b", b.encode())])
            await until("a and b taken", lambda: _true(b.encode() in taken.values), task)
            assert _rows(s, prefix) == []  # not due yet: one row short of the target, and no lingering
            await _produce(s, [("site-x", b"not json")])
            await until("a and b stored", lambda: _async(len(_rows(s, prefix)) == 12), task)
            await until("three offsets committed", lambda: _eq(_committed(s), 3), task)
            assert health.report() == (True, {"kafka": "ok", "db": "ok"})
            await until(
                "the partition counted",
                lambda: _async(metrics.WRITER.get_sample_value("scopemeter_writer_assigned_partitions") == 1),
                task,
            )
            # c is below the target: it waits in the batch at hand until the service stops.
            await _produce(s, [("site-a", c.encode())])
            await until("c taken", lambda: _true(c.encode() in taken.values), task)
            assert len(_rows(s, prefix)) == 12
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)
        assert await _committed(s) == 4
        assert _rows(s, prefix) == _want([a, b, c])
        letters = [DeadLetter.model_validate_json(r.value or b"") for r in await _topic(s, s.kafka.dlq_topic)]
        assert [(x.reason, x.topic) for x in letters] == [(Reason.SCHEMA, f"kafka:{s.kafka.readings_topic}")]
        published = await _topic(s, s.kafka.committed_topic)
        ranges: dict[str, list[DirtyRange]] = {}
        for r in published:
            for d in decode_dirty(r.value or b""):
                assert r.key == d.site_id.encode()
                ranges.setdefault(d.site_id, []).append(d)
        assert {site: sum(d.rows for d in ds) for site, ds in ranges.items()} == {"site-a": 7, "site-b": 6}
        assert [r.key for r in published] == [b"site-a", b"site-b", b"site-a"]  # a+b's batch, then c's

    asyncio.run(scenario())
    # Two batches: a, b and the bad record when the target was reached; c at the stop.
    assert (batches()[0] - before[0], batches()[1] - before[1]) == (2, 13)
    # The DLQ producer waits for every replica and is idempotent, like the bridge's.
    assert [(kw["acks"], kw["enable_idempotence"], kw["bootstrap_servers"]) for kw in made] == [
        ("all", True, s.kafka.bootstrap)
    ]


def test_a_batch_that_lingered_goes_out_without_filling_up(
    kafka: ManagedProcess, pg_db: str, tmp_path: Path
) -> None:
    s = _settings(kafka, pg_db, tmp_path)
    prefix = f"g{uuid.uuid4().hex[:8]}-"
    batch = make_batch(0, meter_prefix=prefix)

    async def scenario() -> None:
        await ensure_topics_async(s.kafka)
        stop = asyncio.Event()
        task = asyncio.create_task(run_writer(s, stop, batch_rows_target=10**9, linger_s=0.05))
        try:
            await _produce(s, [("s", batch.encode())])
            await until("the rows", lambda: _async(len(_rows(s, prefix)) == 6), task)
            await until("the offset", lambda: _eq(_committed(s), 1), task)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(scenario())
        gc.collect()
    assert _rows(s, prefix) == _want([batch])
    # The writer closed its DB connection itself (psycopg warns about one merely dropped).
    assert [str(w.message) for w in caught if "deleted while still open" in str(w.message)] == []


def test_stopped_while_the_db_is_away_the_writer_returns_and_commits_nothing(
    kafka: ManagedProcess, pg_db: str, tmp_path: Path, taken: Taken, caplog: pytest.LogCaptureFixture
) -> None:
    s = _settings(kafka, "postgresql://nobody@127.0.0.1:1/none", tmp_path)
    s = s.model_copy(update={"db": s.db.model_copy(update={"reconnect_max_s": 0.2})})
    batch, second = (make_batch(seq, meter_prefix=f"z{uuid.uuid4().hex[:8]}-") for seq in (0, 1))
    health = metrics.Health("kafka", "db")

    async def scenario() -> None:
        await ensure_topics_async(s.kafka)
        stop = asyncio.Event()
        task = asyncio.create_task(run_writer(s, stop, batch_rows_target=1, linger_s=0.0, health=health))
        try:
            # Two batches in hand, each its own: both fail when the stop ends the retries.
            await _produce(s, [("s", batch.encode())])
            await until("the record taken", lambda: _true(bool(taken.values)), task)
            await _produce(s, [("s", second.encode())])
            await until("the second record taken", lambda: _true(len(taken.values) == 2), task)
            # Down from the start ("not connected yet"); then down for the refused connection.
            await until(
                "the DB reported unreachable",
                lambda: _true(health.report()[1]["db"] not in ("ok", "not connected yet")),
                task,
            )
            assert health.is_up("kafka")
        finally:
            stop.set()
            with caplog.at_level(logging.WARNING):
                await asyncio.wait_for(task, WAIT)  # returns: no error escapes
                del task
                gc.collect()  # a batch's failure left unread would be logged by asyncio now

    asyncio.run(scenario())
    assert "stopped while PostgreSQL was unavailable: the unwritten records stay in Kafka" in caplog.messages
    assert [m for m in caplog.messages if "never retrieved" in m] == []
    assert asyncio.run(_committed(s)) == 0


async def _async(value: bool) -> bool:
    return value


def _true(value: bool) -> Awaitable[bool]:
    return _async(value)


async def _eq(got: Awaitable[int], want: int) -> bool:
    return await got == want


def test_health_follows_the_db_while_the_writer_is_idle(
    kafka: ManagedProcess, pg_db: str, tmp_path: Path
) -> None:
    """An idle writer pings PostgreSQL: when its connection is ended from the server side, health
    says so, and the writer reconnects (health up again) and still writes what comes next."""
    s = _settings(kafka, pg_db, tmp_path)
    s = s.model_copy(update={"db": s.db.model_copy(update={"reconnect_max_s": 0.2})})
    prefix = f"h{uuid.uuid4().hex[:8]}-"
    batch = make_batch(0, meter_prefix=prefix)
    changes: list[tuple[str, str]] = []

    def db() -> list[str]:
        return [r for d, r in changes if d == "db"]

    class Witness(metrics.Health):
        def up(self, dependency: str) -> None:
            super().up(dependency)
            changes.append((dependency, "up"))

        def down(self, dependency: str, reason: str) -> None:
            super().down(dependency, reason)
            changes.append((dependency, reason))

    with psycopg.connect(pg_db) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    since = row[0]  # the writer's session is the one opened after this instant

    def end_the_writers_session() -> int:
        query = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND backend_start > %s"
        )
        with psycopg.connect(pg_db, autocommit=True) as conn:
            ended = conn.execute(query, (since,)).fetchone()
        return int(ended[0]) if ended else 0

    async def scenario() -> None:
        await ensure_topics_async(s.kafka)
        stop = asyncio.Event()
        task = asyncio.create_task(run_writer(s, stop, batch_rows_target=1, linger_s=0.0, health=Witness()))
        try:
            await until("the DB up", lambda: _true("up" in db()), task)
            await until("the writer's session ended", lambda: _true(end_the_writers_session() > 0), task)
            await until("the DB reported down", lambda: _true(any(r != "up" for r in db())), task)
            await until("the DB up again", lambda: _true(db()[-1] == "up" and len(db()) > 2), task)
            await _produce(s, [("s", batch.encode())])
            await until("the rows", lambda: _async(len(_rows(s, prefix)) == 6), task)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)

    asyncio.run(scenario())


def test_a_batch_prepared_first_is_still_written_after_the_one_before_it(
    kafka: ManagedProcess, pg_db: str, tmp_path: Path, taken: Taken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches in hand: the second is decoded while the first still is (the first's decoding
    is held until the second's is done); the first is still written first, so the offsets the
    second commits never pass unwritten records."""
    s = _settings(kafka, pg_db, tmp_path)
    prefix = f"o{uuid.uuid4().hex[:8]}-"
    # The first batch is large (10,000 readings, a batch's most): once released, its decoding takes
    # long enough that a second batch not held back by it would reach the DB first.
    first = make_batch(0, meter_prefix=prefix, meters=100, steps=100)
    second = make_batch(
        1, meter_prefix=prefix, meters=1, steps=1, start=first.readings[-1].ts + timedelta(hours=1)
    )
    real_prepare, real_write = ingest.writer.prepare, ingest.writer._write
    second_prepared = threading.Event()
    order: list[int] = []  # the first row's batch seq of each batch written

    def prepare(records: list[ConsumerRecord[bytes, bytes]]) -> ingest.writer.Prepared:
        mine = records[0].value == first.encode()
        if mine:  # the first batch's decoding waits until the second's is done
            assert second_prepared.wait(WAIT), "the second batch was never prepared"
        prepared = real_prepare(records)
        if not mine:
            second_prepared.set()
        return prepared

    def write(store: ingest.writer.Store, *, prepared: ingest.writer.Prepared) -> ingest.writer.WriteResult:
        order.append(prepared.rows[0][7])
        return real_write(store, prepared=prepared)

    monkeypatch.setattr(ingest.writer, "prepare", prepare)
    monkeypatch.setattr(ingest.writer, "_write", write)

    async def scenario() -> None:
        await ensure_topics_async(s.kafka)
        stop = asyncio.Event()
        task = asyncio.create_task(run_writer(s, stop, batch_rows_target=1, linger_s=0.0))
        try:
            await _produce(s, [("s", first.encode())])
            await until("the first taken", lambda: _true(bool(taken.values)), task)
            await _produce(s, [("s", second.encode())])
            await until("both stored", lambda: _async(len(_rows(s, prefix)) == 10_001), task)
            await until("both offsets", lambda: _eq(_committed(s), 2), task)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)

    asyncio.run(scenario())
    assert order == [0, 1]
