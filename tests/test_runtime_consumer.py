"""ops/kafka_client.GroupConsumer, which the writer and the compute worker share, against the
session's real broker: offsets of partitions a rebalance took away are skipped (not fatal), lag
has one definition (partition end minus the group's committed offset), and the compute worker
survives a second member joining its group while it recomputes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IllegalStateError
from aiokafka.structs import OffsetAndMetadata

from compute.worker import run_worker
from ingest.writer import dirty_ranges
from ops import metrics
from ops.kafka_client import GroupConsumer, client_kwargs
from ops.settings import DbSettings, KafkaSettings, Settings
from tests.test_compute_support import REPO, Row, compute_dsn, insert_rows, reset

__all__ = ["compute_dsn"]

T = TypeVar("T")
WAIT = 60.0


async def _until(what: str, probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool]) -> T:
    deadline = time.monotonic() + WAIT
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen {value!r}")
        await asyncio.sleep(0.1)


async def _topic(kafka: KafkaSettings, partitions: int) -> str:
    topic = f"rt-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return topic


async def _produce(kafka: KafkaSettings, topic: str, values: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(**client_kwargs(kafka))
    await producer.start()
    try:
        for partition, value in values:
            await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


async def _committed(kafka: KafkaSettings, group: str, tp: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **client_kwargs(kafka))
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(tp)
        return offset
    finally:
        await consumer.stop()


def test_offsets_of_partitions_no_longer_held_are_skipped_not_fatal(settings: Settings) -> None:
    """The "taken away" partition is one of a topic this consumer never held, which is what
    aiokafka sees after a rebalance."""
    kafka = settings.kafka

    async def scenario() -> tuple[bool, dict[TopicPartition, OffsetAndMetadata], int | None]:
        topic, other = await _topic(kafka, 1), await _topic(kafka, 1)
        for t in (topic, other):
            await _produce(kafka, t, [(0, b"x")])
        consumer = GroupConsumer(kafka, topic, f"g-{topic}")
        await consumer.start()
        try:
            await _until("a record", lambda: consumer.getmany(500, 10), bool)
            mine, gone = TopicPartition(topic, 0), TopicPartition(other, 0)
            offsets = {mine: OffsetAndMetadata(1, ""), gone: OffsetAndMetadata(1, "")}
            try:  # what the consumers used to call: one foreign partition fails the whole commit
                await consumer.consumer.commit(offsets)
                raised = False
            except IllegalStateError:
                raised = True
            done = await consumer.commit(offsets)
            return raised, done, await consumer.consumer.committed(mine)
        finally:
            await consumer.stop()

    raised, done, committed = asyncio.run(scenario())
    assert raised  # the hazard is real with this aiokafka
    assert list(done.values()) == [OffsetAndMetadata(1, "")]
    assert committed == 1  # what is still held got committed


def test_lag_is_partition_end_minus_committed_offset(settings: Settings) -> None:
    """Records fetched but not committed are still lag: a restart would process them again."""
    kafka = settings.kafka

    async def scenario() -> list[tuple[str, float | None]]:
        topic = await _topic(kafka, 1)
        group = f"g-{topic}"
        await _produce(kafka, topic, [(0, b"%d" % i) for i in range(5)])
        consumer = GroupConsumer(kafka, topic, group)
        await consumer.start()
        labels = {"group": group, "topic": topic, "partition": "0"}
        seen = []

        async def lag(step: str) -> None:
            await consumer.report_lag()
            seen.append((step, metrics.WRITER.get_sample_value("scopemeter_kafka_consumer_lag", labels)))

        try:
            records: list[object] = []
            while len(records) < 5:
                data = await consumer.getmany(1000, 5)
                records += [r for rs in data.values() for r in rs]
            await lag("fetched 5")
            tp = TopicPartition(topic, 0)
            await consumer.commit({tp: OffsetAndMetadata(3, "")})
            await lag("committed 3")
            await consumer.commit({tp: OffsetAndMetadata(5, "")})
            await lag("committed 5")
        finally:
            await consumer.stop()
        return seen

    assert asyncio.run(scenario()) == [("fetched 5", 5.0), ("committed 3", 2.0), ("committed 5", 0.0)]
    # Both consumers export the same gauge: one definition of lag.
    assert metrics.COMPUTE.get_sample_value("scopemeter_kafka_consumer_lag", {"group": "none"}) is None
    names = {m.name for m in metrics.COMPUTE.collect()} & {m.name for m in metrics.WRITER.collect()}
    assert "scopemeter_kafka_consumer_lag" in names


T0 = datetime(2026, 11, 3, 0, 0, tzinfo=UTC)


def _rows(meter: str) -> list[Row]:
    return [
        (meter, "energy_import_kwh", T0 + timedelta(minutes=k), 100.0 + k, 0, "sz-plant-1", "gw-sz1-01", 0)
        for k in range(30)
    ]


def test_compute_worker_survives_a_rebalance_that_takes_its_partitions(
    settings: Settings, compute_dsn: str
) -> None:
    """A second member joins the compute group while the worker's recompute is held up by a table
    lock; when the recompute commits, one of its two partitions belongs to the newcomer. The worker
    commits the partition it kept (aiokafka raises IllegalStateError for the other; the worker used
    to die of it) and goes on recomputing what arrives there."""
    from compute.factors import apply_factors
    from compute.fleet import apply_fleet

    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_fleet(conn, REPO / "config" / "fleet.toml")
        apply_factors(conn, REPO / "config" / "factors.toml")
        insert_rows(conn, _rows("sz1-smt-line-1") + _rows("sz1-hvac"))
    message = {
        p: dirty_ranges(_rows(meter))[0].encode() for p, meter in enumerate(("sz1-smt-line-1", "sz1-hvac"))
    }

    async def scenario() -> tuple[bool, int | None, int | None]:
        topic = await _topic(settings.kafka, 2)
        group = f"compute-{topic}"
        kafka = settings.kafka.model_copy(update={"committed_topic": topic, "compute_group": group})
        run_settings = settings.model_copy(update={"kafka": kafka, "db": DbSettings(dsn=compute_dsn)})
        await _produce(kafka, topic, [(0, message[0]), (1, message[1])])
        locker = await psycopg.AsyncConnection.connect(compute_dsn)
        await locker.execute("LOCK TABLE meter_energy_15m IN ACCESS EXCLUSIVE MODE")
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(run_settings, stop))
        newcomer = AIOKafkaConsumer(
            topic, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
            **client_kwargs(kafka),
        )  # fmt: skip
        try:

            async def blocked() -> int:
                if worker.done():
                    worker.result()  # its error, if it died
                # Its own connection: pg_stat_activity is a snapshot fixed for a whole transaction.
                async with await psycopg.AsyncConnection.connect(compute_dsn, autocommit=True) as probe:
                    cur = await probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                    row = await cur.fetchone()
                return int(row[0]) if row else 0

            await _until("the worker's recompute to wait on the lock", blocked, lambda n: n > 0)
            await newcomer.start()

            async def newcomer_assignment() -> set[TopicPartition]:
                await newcomer.getmany(timeout_ms=200)
                return set(newcomer.assignment())

            taken = await _until("the newcomer's partition", newcomer_assignment, lambda a: len(a) == 1)
            kept = ({TopicPartition(topic, 0), TopicPartition(topic, 1)} - taken).pop()
            await locker.rollback()  # the recompute commits; its offsets now span a lost partition
            # The worker carries on: what arrives on the partition it kept is recomputed and committed.
            await _produce(kafka, topic, [(kept.partition, message[kept.partition])])
            await _until(
                "the worker to commit its kept partition",
                lambda: _committed(kafka, group, kept),
                lambda c: c == 2 or worker.done(),
            )
            alive = not worker.done()
            if worker.done():
                worker.result()  # the worker's own error, if it died
            taken_committed = await _committed(kafka, group, taken.pop())
            return alive, await _committed(kafka, group, kept), taken_committed
        finally:
            stop.set()
            await newcomer.stop()
            await locker.close()
            await asyncio.wait_for(worker, 30)

    alive, kept, taken = asyncio.run(scenario())
    assert alive
    assert kept == 2
    assert taken is None  # never committed by the worker after losing it: the newcomer replays it


def test_keepalive_keeps_a_busy_member_in_its_group(settings: Settings) -> None:
    """While a consumer waits for PostgreSQL it does not take records, yet must poll: after
    ``max_poll_interval_ms`` (1.5 s here; 5 min by default) without a poll aiokafka leaves the group
    and its partitions are taken away. ``keepalive`` polls without taking anything."""
    kafka = settings.kafka
    interval_s = 1.5

    async def member(keepalive: bool) -> int:
        topic = await _topic(kafka, 1)
        await _produce(kafka, topic, [(0, b"x")])
        consumer = GroupConsumer(kafka, topic, f"g-{topic}", max_poll_interval_ms=int(interval_s * 1000),
                                 heartbeat_interval_ms=300)  # fmt: skip
        await consumer.start()
        try:
            await _until("the record", lambda: consumer.getmany(500, 10), bool)
            if keepalive:  # busy for four intervals, polling as the writer and compute do meanwhile
                deadline = time.monotonic() + 4 * interval_s
                while time.monotonic() < deadline:
                    await consumer.keepalive()
                    await asyncio.sleep(0.2)
            else:

                async def revoked() -> int:
                    return consumer.revoked

                await _until("aiokafka to leave the group", revoked, lambda n: n > 0)
            return consumer.revoked
        finally:
            await consumer.stop()

    assert asyncio.run(member(keepalive=False)) == 1  # the hazard is real
    assert asyncio.run(member(keepalive=True)) == 0
