"""Kafka ``readings.v1`` → PostgreSQL ``readings``, effectively once.

Records are gathered into large transactions: binary COPY into a temporary staging table, then
``INSERT … ON CONFLICT DO NOTHING`` into ``readings`` (the key is the reading identity, so replays
and MQTT redeliveries vanish here). Only after the DB commit are the dirty ranges published for
compute and the Kafka offsets committed: a crash anywhere replays records, never loses them.

Speed (measured by ``scopemeter bench ingest``): records come from the bridge, which validated them
and wrote the canonical encoding, so they are decoded by a trusted path (``json`` + a few type
checks, ~5x pydantic), falling back to full validation for anything else. Rows are COPYed straight
into ``readings`` inside a savepoint; only when that meets an existing reading (a replay or a
redelivery) is the transaction redone through the staging table and ``ON CONFLICT DO NOTHING``,
which costs about twice as much. Decoding and writing run in a worker thread while the event loop
keeps fetching the next records.
"""

from __future__ import annotations

import asyncio
import json
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

from edge.wire import COUNTER_QUANTITIES, Batch, Quantity
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
_COPY_DIRECT = f"COPY readings ({_COLS}) FROM STDIN (FORMAT BINARY)"
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


_QUANTITIES = frozenset(q.value for q in Quantity)
_TRUSTED_ERRORS = (KeyError, TypeError, ValueError, AttributeError, RecursionError)


def trusted_rows(value: bytes) -> list[Row] | None:
    """Rows of a record in the bridge's canonical encoding, or None for anything else.

    Checks only what the DB would not: identities are strings, the quantity is known, timestamps
    carry a zone; the bridge has checked the rest against the wire contract."""
    try:
        d = json.loads(value)
        site, gateway, seq = d["site"], d["gateway"], d["seq"]
        if d["v"] != 1 or type(site) is not str or type(gateway) is not str or type(seq) is not int:
            return None
        parse = datetime.fromisoformat
        rows = [
            (r["meter_id"], r["quantity"], parse(r["ts"]), float(r["value"]), r["quality"],
             site, gateway, seq)
            for r in d["readings"]
        ]  # fmt: skip
        for meter, quantity, ts, _v, quality, *_ in rows:
            if (type(meter) is not str or type(quantity) is not str or quantity not in _QUANTITIES
                    or ts.tzinfo is None or type(quality) is not int):  # fmt: skip
                return None
    except _TRUSTED_ERRORS:
        return None
    return rows


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

    def write(self, rows: Sequence[Row], attempts: int = 5) -> WriteResult:
        """Write ``rows`` in one transaction, retried when PostgreSQL picks it as a deadlock victim.

        Rows go in reading-identity order, so writers offering overlapping rows (a replay during a
        rebalance) wait on each other in one order and rarely deadlock; when they still do, the
        victim's transaction is rolled back whole and simply runs again."""
        ordered = sorted(rows, key=_identity)
        for attempt in range(1, attempts + 1):
            try:
                return self._write(ordered)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                if attempt == attempts:
                    raise
                log.warning("write attempt %d of %d rolled back (%s); retrying", attempt, attempts, exc)
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _write(self, rows: Sequence[Row]) -> WriteResult:
        result = WriteResult(offered=len(rows))
        if not rows:
            return result
        t_min = min(r[2] for r in rows)
        t_max = max(r[2] for r in rows)
        with self.conn.transaction(), self.conn.cursor() as cur:
            months = _months_between(t_min, t_max)
            if not months <= self._months:
                cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (t_min, t_max))
            try:
                with self.conn.transaction():  # a savepoint: a duplicate undoes only the fast try
                    _copy_rows(cur, _COPY_DIRECT, rows)
                result.inserted = len(rows)
            except psycopg.errors.UniqueViolation:
                metrics.WRITER_SLOW_PATH.inc()
                _copy_rows(cur, _COPY, rows)
                cur.execute(_INSERT)
                result.inserted = cur.rowcount
        self._months |= months
        result.dirty = dirty_ranges(rows)
        result.newest_ts = t_max
        return result


def _identity(row: Row) -> tuple[str, str, datetime]:
    return row[0], row[1], row[2]


def _copy_rows(cur: psycopg.Cursor[tuple[object, ...]], statement: str, rows: Sequence[Row]) -> None:
    with cur.copy(statement) as copy:
        copy.set_types(list(_TYPES))
        for row in rows:
            copy.write_row(row)


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
    """Consume until ``stop`` is set, then flush what was consumed and return.

    One DB transaction runs at a time (offsets are committed in order) while the next records are
    fetched; a failed transaction ends the writer with its error and the records are replayed."""
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
    committed: dict[TopicPartition, int] = {}
    lag_at = 0.0
    inflight: asyncio.Task[None] | None = None
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
            if inflight is not None and inflight.done():
                inflight.result()  # re-raises a failed transaction
                inflight = None
            due = pending and (
                stopping or pending_rows >= batch_rows_target or time.monotonic() - first_at >= linger_s
            )
            if due:
                if inflight is not None:
                    await inflight
                flush = _flush(pending, store, producer, consumer, settings, committed)
                inflight = asyncio.create_task(flush)
                pending, pending_rows = [], 0
            if time.monotonic() - lag_at >= 1.0:
                lag_at = time.monotonic()
                await _report_lag(consumer, k.writer_group, committed)
            if stopping:
                if inflight is not None:
                    await inflight
                break
    finally:
        if inflight is not None and not inflight.done():
            await asyncio.wait([inflight])  # never close the connection under a running COPY
        await consumer.stop()
        await producer.stop()
        await asyncio.to_thread(store.close)


def _estimate_rows(record: ConsumerRecord[bytes, bytes]) -> int:
    # Cheap: about 110 bytes of JSON per reading; exact counts are taken after decoding.
    return max(1, len(record.value or b"") // 110)


async def _report_lag(
    consumer: AIOKafkaConsumer, group: str, committed: dict[TopicPartition, int]
) -> None:
    """Consumer lag per partition: the partition end last seen by the fetcher minus the offset this
    group committed (asked of the broker once per partition, then tracked from our own commits)."""
    for tp in consumer.assignment():
        end = consumer.highwater(tp)
        if end is None:
            continue
        if tp not in committed:
            committed[tp] = await consumer.committed(tp) or 0
        lag = max(0, end - committed[tp])
        metrics.KAFKA_CONSUMER_LAG.labels(group=group, topic=tp.topic, partition=str(tp.partition)).set(lag)


def decode_records(records: Sequence[ConsumerRecord[bytes, bytes]]) -> tuple[list[Row], list[DeadLetter]]:
    """Rows of all records (trusted path first, full validation as fallback) and the letters of
    records that fail validation — only a foreign producer can write those."""
    rows: list[Row] = []
    letters: list[DeadLetter] = []
    for rec in records:
        value = rec.value or b""
        trusted = trusted_rows(value)
        if trusted is not None:
            rows.extend(trusted)
            continue
        try:
            rows.extend(batch_rows([Batch.decode(value)]))
        except ValidationError as exc:
            letters.append(DeadLetter.of(Reason.SCHEMA, str(exc), f"kafka:{rec.topic}", value))
    return rows, letters


def _decode_and_write(
    records: Sequence[ConsumerRecord[bytes, bytes]], store: ReadingStore
) -> tuple[WriteResult, list[DeadLetter]]:
    started = time.monotonic()
    rows, letters = decode_records(records)
    decoded = time.monotonic()
    metrics.WRITER_DECODE_SECONDS.observe(decoded - started)
    result = store.write(rows)
    metrics.WRITER_COMMIT_SECONDS.observe(time.monotonic() - decoded)
    return result, letters


async def _flush(
    records: list[ConsumerRecord[bytes, bytes]],
    store: ReadingStore,
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    settings: Settings,
    committed: dict[TopicPartition, int],
) -> None:
    result, letters = await asyncio.to_thread(_decode_and_write, records, store)
    committed_at = datetime.now(UTC)
    for letter in letters:
        await producer.send_and_wait(settings.kafka.dlq_topic, letter.encode())
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
        return
    committed.update({tp: meta.offset for tp, meta in offsets.items()})
    log.debug("wrote %d rows (%d new) from %d records", result.offered, result.inserted, len(records))
