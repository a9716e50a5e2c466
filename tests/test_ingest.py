"""The ingest bridge and writer against the real Mosquitto, Kafka and PostgreSQL — no mocks.

Each test gets its own lane: Kafka topics, writer consumer group, MQTT share group, bridge client id,
supplier/site/gateway and meter ids, all unique, so tests never see each other's data although the
brokers and the database are shared by the whole session. The bridge and the writer run in-process
as asyncio tasks; every wait is a bounded poll on an observable condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from edge.wire import READINGS_SUBSCRIPTION, Batch, Quantity, Reading, readings_topic
from ingest.bridge import run_bridge
from ingest.dlq import DeadLetter, Reason
from ingest.events import DirtyRange, decode_dirty
from ingest.registry import register_gateway
from ingest.writer import run_writer
from ops import metrics
from ops.bench_ingest import lane_settings
from ops.settings import Settings
from ops.stack import ensure_topics_async
from tests.helpers import make_batch

# (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)
DbRow = tuple[str, str, datetime, float, int, str, str, int]

WAIT = 30.0  # seconds any single condition may take before the test fails


# --- a lane: one test's private slice of the shared brokers and database ---------------------------


@dataclass(frozen=True)
class Lane:
    settings: Settings
    supplier: str
    site: str
    gateway: str
    meters: str  # meter id prefix, unique to the lane
    bridge_id: str  # the bridge's MQTT client id (its persistent session)

    @property
    def topic(self) -> str:
        return readings_topic(self.supplier, self.site, self.gateway)

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka.bootstrap

    def batch(self, seq: int, **kw: Any) -> Batch:
        return make_batch(
            seq, supplier=self.supplier, site=self.site, gateway=self.gateway, meter_prefix=self.meters, **kw
        )


def _mqtt_client(lane: Lane, client_id: str, *, clean: bool) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect(lane.settings.mqtt.host, lane.settings.mqtt.port, keepalive=30)
    client.loop_start()
    assert connected.wait(10), f"MQTT client {client_id} got no CONNACK"
    return client


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def _open_session(lane: Lane) -> None:
    """Create the bridge's persistent session with its shared subscription and wait for the SUBACK,
    as a deployed bridge that ran once has: from here on Mosquitto keeps every batch for it."""
    client = _mqtt_client(lane, lane.bridge_id, clean=False)
    subacked = threading.Event()
    client.on_subscribe = lambda *_a: subacked.set()
    client.subscribe(f"$share/{lane.settings.mqtt.share_group}/{READINGS_SUBSCRIPTION}", qos=1)
    assert subacked.wait(10), "no SUBACK for the bridge's shared subscription"
    _close(client)


def _drop_session(lane: Lane) -> None:
    """A clean-session connect discards the lane's persistent session (no queue left growing)."""
    _close(_mqtt_client(lane, lane.bridge_id, clean=True))


def publish(lane: Lane, messages: list[tuple[str, bytes]]) -> None:
    """Publish with QoS 1 like an edge agent and return once Mosquitto PUBACKed every message."""
    client = _mqtt_client(lane, f"edge-{uuid.uuid4().hex[:8]}", clean=True)
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published(), "Mosquitto did not PUBACK a batch"
    finally:
        _close(client)


async def publish_async(lane: Lane, messages: list[tuple[str, bytes]]) -> None:
    await asyncio.to_thread(publish, lane, messages)


@pytest.fixture
def lane(settings: Settings) -> Iterator[Lane]:
    u = uuid.uuid4().hex[:10]
    private = lane_settings(settings, u)
    kafka = private.kafka.model_copy(update={"partitions": 2})
    s = private.model_copy(update={"kafka": kafka})
    asyncio.run(ensure_topics_async(kafka))
    lane = Lane(s, f"sup-{u}", f"site-{u}", f"gw-{u}", f"t{u}-m", f"bridge-{u}")
    with psycopg.connect(s.db.dsn, autocommit=True) as conn:  # the bridge checks the fleet registry
        meters = [f"{lane.meters}{i}" for i in range(10)]
        register_gateway(conn, lane.supplier, lane.site, lane.gateway, meters)
    _open_session(lane)
    yield lane
    _drop_session(lane)


# --- running the services and waiting for conditions ------------------------------------------------


@contextlib.asynccontextmanager
async def service(
    name: str, main: Callable[[asyncio.Event], Awaitable[None]]
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``main(stop)`` as a task; on exit set ``stop`` and await it, re-raising its failure."""
    stop = asyncio.Event()

    async def run() -> None:
        await main(stop)

    task = asyncio.create_task(run(), name=name)
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def bridge(lane: Lane) -> contextlib.AbstractAsyncContextManager[asyncio.Task[None]]:
    return service("bridge", lambda stop: run_bridge(lane.settings, stop, client_id=lane.bridge_id))


def writer(lane: Lane) -> contextlib.AbstractAsyncContextManager[asyncio.Task[None]]:
    return service("writer", lambda stop: run_writer(lane.settings, stop, linger_s=0.1))


async def until(
    what: str,
    probe: Callable[[], Awaitable[Any]],
    done: Callable[[Any], bool],
    *tasks: asyncio.Task[None],
    timeout: float = WAIT,
) -> Any:
    """Poll ``probe`` until ``done(value)``; fail fast if a service task ended, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        for task in tasks:
            if task.done():
                task.result()  # raises the service's exception, if any
                raise AssertionError(f"{task.get_name()} stopped while waiting for {what}")
        if time.monotonic() > deadline:
            seen = repr(value)
            seen = seen if len(seen) <= 300 else seen[:300] + "…"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {seen}")
        await asyncio.sleep(0.1)


def metric(name: str, **labels: str) -> float:
    """A sample of the bridge's or the writer's metrics (both run in this process)."""
    for registry in (metrics.BRIDGE, metrics.WRITER):
        value = registry.get_sample_value(name, labels)
        if value is not None:
            return value
    return 0.0


def writer_rows() -> dict[str, float]:
    return {o: metric("scopemeter_writer_rows_total", outcome=o) for o in ("inserted", "duplicate")}


# --- the database and Kafka, seen from outside ------------------------------------------------------


def _db_rows(lane: Lane) -> list[DbRow]:
    with psycopg.connect(lane.settings.db.dsn) as conn:
        return conn.execute(
            "SELECT meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq"
            " FROM readings WHERE meter_id LIKE %s ORDER BY 1, 2, 3",
            (lane.meters + "%",),
        ).fetchall()


async def db_rows(lane: Lane) -> list[DbRow]:
    return await asyncio.to_thread(_db_rows, lane)


async def db_count(lane: Lane) -> int:
    return len(await db_rows(lane))


async def rows_arrive(
    lane: Lane, want: list[DbRow], *tasks: asyncio.Task[None], timeout: float = WAIT
) -> None:
    """Wait until the lane has as many rows as ``want``; on timeout, name the missing identities."""
    try:
        await until(f"{len(want)} rows", lambda: db_count(lane), lambda n: n >= len(want), *tasks,
                    timeout=timeout)  # fmt: skip
    except AssertionError as exc:
        have = {r[:3] for r in await db_rows(lane)}
        missing = [r for r in want if r[:3] not in have]
        raise AssertionError(f"{exc}; {len(missing)} missing, e.g. {missing[:3]}") from None


def expected_rows(batches: list[Batch]) -> list[DbRow]:
    """The rows the batches must become, first write of each reading identity winning."""
    rows: dict[tuple[str, str, datetime], DbRow] = {}
    for b in batches:
        for r in b.readings:
            row = (r.meter_id, r.quantity.value, r.ts, r.value, r.quality, b.site, b.gateway, b.seq)
            rows.setdefault(row[:3], row)
    return sorted(rows.values())


class TopicTail:
    """Every record of a topic, from its beginning, read without a consumer group."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.parts = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.records: list[ConsumerRecord[bytes, bytes]] = []

    async def __aenter__(self) -> TopicTail:
        await self.consumer.start()
        self.consumer.assign(self.parts)
        await self.consumer.seek_to_beginning(*self.parts)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.consumer.stop()

    async def poll(self) -> list[ConsumerRecord[bytes, bytes]]:
        for batch in (await self.consumer.getmany(*self.parts, timeout_ms=100)).values():
            self.records.extend(batch)
        return self.records


def tail(lane: Lane, topic: str) -> TopicTail:
    return TopicTail(lane.bootstrap, topic, lane.settings.kafka.partitions)


async def committed_offsets(lane: Lane) -> int:
    """Sum over partitions of the offsets the writer group committed on the readings topic."""
    k = lane.settings.kafka
    consumer = AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap, group_id=k.writer_group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = [TopicPartition(k.readings_topic, p) for p in range(k.partitions)]
        return sum([await consumer.committed(tp) or 0 for tp in parts])
    finally:
        await consumer.stop()


def messages(lane: Lane, batches: list[Batch]) -> list[tuple[str, bytes]]:
    return [(lane.topic, b.encode()) for b in batches]


# --- 1. the happy path --------------------------------------------------------------------------


def test_batches_become_exact_rows_and_dirty_ranges(lane: Lane) -> None:
    batches = []
    for seq in range(12):
        b = lane.batch(seq, meters=3, steps=40)
        # A power reading per batch: stored like any other, but no dirty range (not a counter).
        power = Reading(meter_id=f"{lane.meters}0", quantity=Quantity.POWER_W, ts=b.readings[0].ts,
                        value=60_000.0 + seq / 7)  # fmt: skip
        batches.append(b.model_copy(update={"readings": [*b.readings, power]}))
    want = expected_rows(batches)
    counters = [r for r in want if r[1] == Quantity.ENERGY_IMPORT_KWH]
    assert len(want) == 12 * (3 * 40 + 1) and len(counters) == 12 * 3 * 40
    accepted0 = metric("scopemeter_bridge_messages_total", outcome="accepted")

    async def scenario() -> tuple[list[DbRow], list[DirtyRange], list[ConsumerRecord[bytes, bytes]]]:
        async with (
            writer(lane) as w,
            bridge(lane) as b,
            tail(lane, lane.settings.kafka.committed_topic) as dirty,
        ):
            await publish_async(lane, messages(lane, batches))
            await rows_arrive(lane, want, w, b)
            await until(
                "dirty ranges of all counter rows",
                dirty.poll,
                lambda recs: sum(d.rows for r in recs for d in decode_dirty(r.value or b"")) >= len(counters),
                w, b,
            )  # fmt: skip
            async with tail(lane, lane.settings.kafka.readings_topic) as readings:
                await until("12 Kafka records", readings.poll, lambda recs: len(recs) >= 12, b)
            ranges = [d for r in dirty.records for d in decode_dirty(r.value or b"")]
            return await db_rows(lane), ranges, readings.records

    rows, ranges, kafka_records = asyncio.run(scenario())

    assert rows == want  # exactly these rows, values bit-for-bit, nothing more
    assert metric("scopemeter_bridge_messages_total", outcome="accepted") - accepted0 == 12
    assert len(kafka_records) == 12 and {r.key for r in kafka_records} == {lane.site.encode()}
    assert sorted(Batch.decode(r.value or b"").seq for r in kafka_records) == list(range(12))

    # Dirty ranges: only the counter, one lane site, and per meter they cover exactly its timestamps.
    assert {(d.site_id, d.quantity) for d in ranges} == {(lane.site, Quantity.ENERGY_IMPORT_KWH.value)}
    assert sum(d.rows for d in ranges) == len(counters)
    for meter in {r[0] for r in counters}:
        ts = [r[2] for r in counters if r[0] == meter]
        mine = [d for d in ranges if d.meter_id == meter]
        assert min(d.t_min for d in mine) == min(ts)
        assert max(d.t_max for d in mine) == max(ts)
        assert all(any(d.t_min <= t <= d.t_max for d in mine) for t in ts)


# --- 2. duplicates --------------------------------------------------------------------------------


def test_duplicates_and_resent_batches_are_dropped(lane: Lane) -> None:
    batches = [lane.batch(seq, meters=4, steps=25) for seq in range(6)]
    resent = batches[2].model_copy(update={"seq": 100})  # new sequence number, same readings
    want = expected_rows(batches)
    per_batch = 4 * 25
    before = writer_rows()

    async def scenario() -> tuple[list[DbRow], list[DbRow], dict[str, float], int]:
        async with (
            writer(lane) as w,
            bridge(lane) as b,
            tail(lane, lane.settings.kafka.committed_topic) as dirty,
        ):
            await publish_async(lane, messages(lane, batches))
            await rows_arrive(lane, want, w, b)
            first = await db_rows(lane)
            # The edge re-sends everything (lost PUBACKs), and once more one batch under a new seq.
            await publish_async(lane, messages(lane, [*batches, resent]))

            async def offered() -> float:
                now = writer_rows()
                return sum(now[o] - before[o] for o in now)

            total = 2 * len(want) + per_batch
            await until("the writer to see every copy", offered, lambda n: n >= total, w, b)
            await until(
                "dirty ranges of every copy",
                dirty.poll,
                lambda recs: sum(d.rows for r in recs for d in decode_dirty(r.value or b"")) >= total,
                w, b,
            )  # fmt: skip
            dirty_rows = sum(d.rows for r in dirty.records for d in decode_dirty(r.value or b""))
            after = writer_rows()
            return first, await db_rows(lane), {o: after[o] - before[o] for o in after}, dirty_rows

    first, final, delta, dirty_rows = asyncio.run(scenario())

    assert first == want
    assert final == want  # no extra row, and the first write wins: batch_seq 100 appears nowhere
    assert 100 not in {r[7] for r in final}
    assert delta == {"inserted": len(want), "duplicate": len(want) + per_batch}
    # Duplicates still announce their range (so a replay after a crash still reaches compute).
    assert dirty_rows == 2 * len(want) + per_batch


# --- 3. invalid messages --------------------------------------------------------------------------


def test_invalid_messages_go_to_the_dlq_and_the_bridge_keeps_going(lane: Lane) -> None:
    nan = json.loads(lane.batch(1).encode())
    nan["readings"][0]["value"] = float("nan")  # json.dumps writes the bare token NaN
    foreign = lane.batch(0).model_copy(update={"site": f"{lane.site}-other"})  # claims another site
    bad_topic = readings_topic(lane.supplier, "no such site!", lane.gateway)
    invalid = {
        Reason.INVALID_JSON: (lane.topic, b'{"v": 1, "readings": ['),
        Reason.IDENTITY_MISMATCH: (lane.topic, foreign.encode()),
        Reason.SCHEMA: (lane.topic, json.dumps(nan).encode()),
        Reason.BAD_TOPIC: (bad_topic, lane.batch(0).encode()),
    }
    valid = [lane.batch(seq) for seq in range(2, 5)]
    want = expected_rows(valid)
    dlq0 = {r: metric("scopemeter_bridge_dlq_total", reason=r.value) for r in Reason}

    async def scenario() -> tuple[list[DbRow], list[DeadLetter], bool]:
        async with writer(lane) as w, bridge(lane) as b, tail(lane, lane.settings.kafka.dlq_topic) as dlq:
            await publish_async(lane, list(invalid.values()))
            await publish_async(lane, messages(lane, valid))
            await rows_arrive(lane, want, w, b)  # the valid batches after the bad ones
            await until("dead letters", dlq.poll, lambda recs: len(recs) >= len(invalid), w, b)
            running = not b.done()
            letters = [DeadLetter.model_validate_json(r.value or b"") for r in dlq.records]
            return await db_rows(lane), letters, running

    rows, letters, bridge_was_running = asyncio.run(scenario())

    assert bridge_was_running
    assert rows == want  # nothing of the refused batches (seq 0 and 1 timestamps) reached the table
    assert sorted(letter.reason for letter in letters) == sorted(invalid)
    for letter in letters:
        topic, payload = invalid[letter.reason]
        assert (letter.topic, letter.payload()) == (topic, payload)  # the original bytes, untouched
    assert "finite" in next(x.detail for x in letters if x.reason is Reason.SCHEMA)
    dlq = {r: metric("scopemeter_bridge_dlq_total", reason=r.value) - dlq0[r] for r in Reason}
    assert dlq == {r: (1 if r in invalid else 0) for r in Reason}


# --- 4. restarts ----------------------------------------------------------------------------------


def test_batches_published_while_the_bridge_is_down_all_arrive(lane: Lane) -> None:
    first = [lane.batch(0, meters=3, steps=20)]
    offline = [lane.batch(seq, meters=3, steps=20) for seq in range(1, 9)]

    async def scenario() -> tuple[int, list[DbRow], float]:
        async with writer(lane) as w:
            async with bridge(lane) as b:
                await publish_async(lane, messages(lane, first))
                await rows_arrive(lane, expected_rows(first), w, b)
            # The bridge is gone; its persistent session is not. The edge keeps publishing.
            await publish_async(lane, messages(lane, offline))
            await asyncio.sleep(0.5)  # give a (wrongly) still-running consumer the chance to show up
            while_down = await db_count(lane)
            accepted0 = metric("scopemeter_bridge_messages_total", outcome="accepted")
            async with bridge(lane) as b:
                await rows_arrive(lane, expected_rows(first + offline), w, b)
                accepted = metric("scopemeter_bridge_messages_total", outcome="accepted") - accepted0
            return while_down, await db_rows(lane), accepted

    while_down, rows, accepted = asyncio.run(scenario())

    assert while_down == 60
    assert rows == expected_rows(first + offline)
    # Exactly the queued batches were delivered again: the first run acked what it forwarded.
    assert accepted == len(offline)


def test_writer_restart_resumes_after_the_last_db_commit(lane: Lane) -> None:
    batches = [lane.batch(seq, meters=2, steps=30) for seq in range(10)]
    want = expected_rows(batches)
    per_batch = 2 * 30

    async def records_in_kafka() -> int:
        async with tail(lane, lane.settings.kafka.readings_topic) as t:
            return len(await t.poll()) + len(await t.poll())

    async def scenario() -> tuple[int, int, list[DbRow], dict[str, float], int]:
        async with bridge(lane) as b:
            async with writer(lane) as w:
                await publish_async(lane, messages(lane, batches[:5]))
                await rows_arrive(lane, expected_rows(batches[:5]), w, b)
            # Stopped cleanly: it committed its offsets after its last DB commit.
            committed_after_first = await committed_offsets(lane)
            await publish_async(lane, messages(lane, batches[5:]))
            await until("all ten records in Kafka", records_in_kafka, lambda n: n >= 10, b)
            rows_while_down = await db_count(lane)
            before = writer_rows()
            async with writer(lane) as w:  # same group: resumes from the committed offsets
                await rows_arrive(lane, want, w, b, timeout=45)
                await until("the second writer's offsets", lambda: committed_offsets(lane),
                            lambda n: n >= 10, w)  # fmt: skip
                after = writer_rows()
        delta = {o: after[o] - before[o] for o in after}
        return (
            committed_after_first,
            rows_while_down,
            await db_rows(lane),
            delta,
            await committed_offsets(lane),
        )

    committed_first, rows_while_down, rows, delta, committed_final = asyncio.run(scenario())

    assert committed_first == 5
    assert rows_while_down == 5 * per_batch
    assert rows == want
    # The second writer read only what the first had not committed: nothing replayed, nothing lost.
    assert delta == {"inserted": 5 * per_batch, "duplicate": 0}
    assert committed_final == 10


# --- 5. monthly partitions --------------------------------------------------------------------------


def _partitions(lane: Lane, names: list[str]) -> dict[str, str]:
    """Each existing named table -> the table it is a partition of (pg_inherits)."""
    with psycopg.connect(lane.settings.db.dsn) as conn:
        found = conn.execute(
            "SELECT c.relname, p.relname FROM pg_class c"
            " JOIN pg_inherits i ON i.inhrelid = c.oid JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE c.relname = ANY(%s)",
            (names,),
        ).fetchall()
    return dict(found)


def _rows_per_partition(lane: Lane) -> dict[str, int]:
    with psycopg.connect(lane.settings.db.dsn) as conn:
        found = conn.execute(
            "SELECT tableoid::regclass::text, count(*) FROM readings WHERE meter_id LIKE %s GROUP BY 1",
            (lane.meters + "%",),
        ).fetchall()
    return dict(found)


def test_writer_creates_monthly_partitions_across_a_year_end(lane: Lane) -> None:
    # A year no other test writes, so that both partitions are certainly created by this writer;
    # the bridge of this lane is told to accept that far a future (it refuses it by default).
    ingest = lane.settings.ingest.model_copy(update={"max_future_s": 80 * 365 * 86_400.0})
    lane = dataclasses.replace(lane, settings=lane.settings.model_copy(update={"ingest": ingest}))
    year = 2060 + int(lane.meters[1:9], 16) % 30
    dec, jan = f"readings_y{year}m12", f"readings_y{year + 1}m01"
    assert _partitions(lane, [dec, jan]) == {}
    boundary = datetime(year + 1, 1, 1, tzinfo=UTC)
    batch = lane.batch(0, meters=3, steps=20, start=boundary - timedelta(minutes=10))  # 10 before, 10 after

    async def scenario() -> None:
        async with writer(lane) as w, bridge(lane) as b:
            await publish_async(lane, messages(lane, [batch]))
            await rows_arrive(lane, expected_rows([batch]), w, b)

    asyncio.run(scenario())

    assert _partitions(lane, [dec, jan]) == {dec: "readings", jan: "readings"}
    assert _rows_per_partition(lane) == {dec: 30, jan: 30}
    rows = _db_rows(lane)
    assert rows == expected_rows([batch])
    assert sum(r[2] < boundary for r in rows) == 30
