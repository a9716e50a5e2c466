"""Kafka ``readings.v1`` → PostgreSQL ``readings``, effectively once.

Records are gathered into large transactions: binary COPY into a temporary staging table, then
``INSERT … ON CONFLICT DO NOTHING`` into ``readings`` (the key is the reading identity, so replays
and MQTT redeliveries vanish here). Only after the DB commit are the dirty ranges published for
compute and the Kafka offsets committed: a crash anywhere replays records, never loses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from edge.wire import COUNTER_QUANTITIES, Batch
from ingest.dlq import DeadLetter, Reason
from ingest.events import DirtyRange
from ops import metrics
from ops.settings import Settings

log = logging.getLogger("scopemeter.writer")

COLUMNS = ("meter_id", "quantity", "ts", "value", "quality", "site_id", "gateway_id", "batch_seq")
_TYPES = ("text", "text", "timestamptz", "float8", "int4", "text", "text", "int8")
_STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS readings_stage ("
    + ", ".join(f"{c} {t}" for c, t in zip(COLUMNS, _TYPES, strict=True))
    + ") ON COMMIT DELETE ROWS"
)
_COLS = ", ".join(COLUMNS)
_COPY = f"COPY readings_stage ({_COLS}) FROM STDIN (FORMAT BINARY)"
_INSERT = f"INSERT INTO readings ({_COLS}) SELECT {_COLS} FROM readings_stage ON CONFLICT DO NOTHING"

Row = tuple[str, str, datetime, float, int, str, str, int]


@dataclass
class WriteResult:
    offered: int = 0
    inserted: int = 0
    dirty: list[DirtyRange] = field(default_factory=list)
    newest_ts: datetime | None = None


def batch_rows(batches: Iterable[Batch]) -> list[Row]:
    return [
        (r.meter_id, r.quantity.value, r.ts, r.value, r.quality, b.site, b.gateway, b.seq)
        for b in batches
        for r in b.readings
    ]


def dirty_ranges(rows: Sequence[Row]) -> list[DirtyRange]:
    """Per (site, meter, counter quantity): the span of timestamps offered, duplicates included,
    so a replay after a crash between DB commit and publish still tells compute."""
    spans: dict[tuple[str, str, str], tuple[datetime, datetime, int]] = {}
    for meter, quantity, ts, _v, _q, site, _g, _s in rows:
        if quantity not in COUNTER_QUANTITIES:
            continue
        key = (site, meter, quantity)
        lo, hi, n = spans.get(key, (ts, ts, 0))
        spans[key] = (min(lo, ts), max(hi, ts), n + 1)
    return [
        DirtyRange(site_id=s, meter_id=m, quantity=q, t_min=lo, t_max=hi, rows=n)
        for (s, m, q), (lo, hi, n) in spans.items()
    ]


class ReadingStore:
    """One DB connection that writes row batches; remembers which monthly partitions exist."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)
        self.conn.execute(_STAGE_DDL)
        self.conn.commit()
        self._months: set[date] = set()

    def close(self) -> None:
        self.conn.close()

    def write(self, rows: Sequence[Row]) -> WriteResult:
        result = WriteResult(offered=len(rows))
        if not rows:
            return result
        t_min = min(r[2] for r in rows)
        t_max = max(r[2] for r in rows)
        with self.conn.transaction(), self.conn.cursor() as cur:
            months = _months_between(t_min, t_max)
            if not months <= self._months:
                cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (t_min, t_max))
            with cur.copy(_COPY) as copy:
                copy.set_types(list(_TYPES))
                for row in rows:
                    copy.write_row(row)
            cur.execute(_INSERT)
            result.inserted = cur.rowcount
        self._months |= months
        result.dirty = dirty_ranges(rows)
        result.newest_ts = t_max
        return result


def _months_between(t_min: datetime, t_max: datetime) -> set[date]:
    a, b = t_min.astimezone(UTC), t_max.astimezone(UTC)
    months, y, m = set(), a.year, a.month
    while (y, m) <= (b.year, b.month):
        months.add(date(y, m, 1))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return months


async def run_writer(
    settings: Settings,
    stop: asyncio.Event,
    *,
    batch_rows_target: int = 20_000,
    linger_s: float = 0.25,
) -> None:
    """Consume until ``stop`` is set, then flush what was consumed and return."""
    k = settings.kafka
    consumer = AIOKafkaConsumer(
        k.readings_topic,
        bootstrap_servers=k.bootstrap,
        group_id=k.writer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap, acks="all", enable_idempotence=False, linger_ms=5
    )
    store = await asyncio.to_thread(ReadingStore, settings.db.dsn)
    await producer.start()
    await consumer.start()
    pending: list[ConsumerRecord[bytes, bytes]] = []
    pending_rows = 0
    first_at = 0.0
    try:
        while True:
            stopping = stop.is_set()
            if not stopping:
                data = await consumer.getmany(timeout_ms=100, max_records=5_000)
                for records in data.values():
                    if not pending and records:
                        first_at = time.monotonic()
                    pending.extend(records)
                    pending_rows += sum(_estimate_rows(r) for r in records)
            due = pending and (
                stopping or pending_rows >= batch_rows_target or time.monotonic() - first_at >= linger_s
            )
            if due:
                await _flush(pending, store, producer, consumer, settings)
                pending, pending_rows = [], 0
            if stopping:
                break
    finally:
        await consumer.stop()
        await producer.stop()
        await asyncio.to_thread(store.close)


def _estimate_rows(record: ConsumerRecord[bytes, bytes]) -> int:
    # Cheap: about 110 bytes of JSON per reading; exact counts are taken after decoding.
    return max(1, len(record.value or b"") // 110)


async def _flush(
    records: list[ConsumerRecord[bytes, bytes]],
    store: ReadingStore,
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    settings: Settings,
) -> None:
    batches: list[Batch] = []
    for rec in records:
        try:
            batches.append(Batch.decode(rec.value or b""))
        except ValidationError as exc:  # the bridge validated it: only a foreign producer gets here
            letter = DeadLetter.of(Reason.SCHEMA, str(exc), f"kafka:{rec.topic}", rec.value or b"")
            await producer.send_and_wait(settings.kafka.dlq_topic, letter.encode())
    rows = batch_rows(batches)
    started = time.monotonic()
    result = await asyncio.to_thread(store.write, rows)
    committed_at = datetime.now(UTC)
    metrics.WRITER_COMMIT_SECONDS.observe(time.monotonic() - started)
    metrics.WRITER_BATCH_ROWS.observe(result.offered)
    metrics.WRITER_ROWS.labels(outcome="inserted").inc(result.inserted)
    metrics.WRITER_ROWS.labels(outcome="duplicate").inc(result.offered - result.inserted)
    if result.newest_ts is not None:
        metrics.WRITER_LATENCY.observe(max(0.0, (committed_at - result.newest_ts).total_seconds()))
    sends = [
        await producer.send(settings.kafka.committed_topic, d.encode(), key=d.site_id.encode())
        for d in result.dirty
    ]
    if sends:
        await asyncio.gather(*sends)
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for rec in records:
        tp = TopicPartition(rec.topic, rec.partition)
        if tp not in offsets or offsets[tp].offset <= rec.offset:
            offsets[tp] = OffsetAndMetadata(rec.offset + 1, "")
    try:
        await consumer.commit(offsets)
    except CommitFailedError as exc:  # partitions moved to another writer: it will replay, the DB dedups
        log.warning("offset commit failed after DB commit (replay will be deduplicated): %s", exc)
    log.debug("wrote %d rows (%d new) from %d records", result.offered, result.inserted, len(records))
