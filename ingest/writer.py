"""Kafka ``readings.v1`` → PostgreSQL ``readings``, effectively once.

Records are gathered into large transactions: binary COPY into a temporary staging table, then
``INSERT … ON CONFLICT DO NOTHING`` into ``readings`` (the key is the reading identity, so replays
and MQTT redeliveries vanish here). Only after the DB commit are the dirty ranges published for
compute and the Kafka offsets committed: a crash anywhere replays records, never loses them.
When PostgreSQL goes away the transaction at hand is retried on a new connection until it commits
(``ops.db_session``); consumer setup, offset commits and lag are ``ops.kafka_client``'s.

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
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import groupby
from operator import itemgetter
from typing import Annotated, Literal, Protocol

import msgspec
import psycopg
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from edge.wire import COUNTER_QUANTITIES, MAX_ABS_VALUE, MAX_SEQ, Batch, Quantity
from ingest.dlq import DeadLetter, Reason
from ingest.events import DirtyBatch, DirtyRange
from ops import metrics
from ops.db_session import Reconnecting
from ops.kafka_client import GroupConsumer, client_kwargs, last_offsets
from ops.runtime import Stopped
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
    newest_ts: datetime | None = None


@dataclass
class Prepared:
    """Records made ready for the DB off the critical path, while the previous batch is written."""

    rows: list[Row]  # in identity order
    letters: list[DeadLetter]
    dirty: list[DirtyRange]
    offsets: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)
    span: tuple[datetime, datetime] | None = None  # oldest and newest timestamp of the rows
    # The records themselves, for writing them one by one when PostgreSQL refuses the batch.
    records: Sequence[ConsumerRecord[bytes, bytes]] = ()


def batch_rows(batches: Iterable[Batch]) -> list[Row]:
    return [
        (r.meter_id, r.quantity.value, r.ts, r.value, r.quality, b.site, b.gateway, b.seq)
        for b in batches
        for r in b.readings
    ]


# The quantity names as a Literal: msgspec checks it in C at a third of the cost of the enum type.
_QuantityName = Literal.__getitem__(tuple(q.value for q in Quantity))


class _TrustedReading(msgspec.Struct, frozen=True, gc=False):  # no cycles: not for the collector
    """The fields of ``edge.wire.Reading`` (a test keeps them equal), decoded in C: the bridge has
    validated the rest of the contract, so the writer checks only types, zone and ranges here."""

    meter_id: str
    quantity: _QuantityName  # type: ignore[valid-type]
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    # The wire contract's bounds, so a record that did not come through the bridge can never carry
    # a number the DB columns cannot hold (JSON has no NaN or Infinity for msgspec to accept).
    value: Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
    quality: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)] = 0


class _TrustedBatch(msgspec.Struct, frozen=True, gc=False):
    """The fields of ``edge.wire.Batch``."""

    v: Literal[1]
    supplier: str
    site: str
    gateway: str
    seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    sent_at: Annotated[datetime, msgspec.Meta(tz=True)]
    readings: list[_TrustedReading]


_TRUSTED = msgspec.json.Decoder(_TrustedBatch)


def trusted_rows(value: bytes) -> list[Row] | None:
    """Rows of a record as the bridge forwards it (a validated wire batch), or None for anything
    the fast decoder does not accept exactly — that goes through full pydantic validation."""
    try:
        b = _TRUSTED.decode(value)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    site, gateway, seq = b.site, b.gateway, b.seq
    return [(r.meter_id, r.quantity, r.ts, r.value, r.quality, site, gateway, seq) for r in b.readings]


Run = tuple[str, str, str, datetime, datetime, int]  # site, meter, quantity, first ts, last ts, rows


def runs(rows: Sequence[Row]) -> list[Run]:
    """Rows in identity order, cut into runs of one site, meter and quantity: each run is
    contiguous with ascending timestamps, so its first and last rows are its span. A meter
    reported by two sites yields several runs, which together still cover what was written."""
    out = []
    for (site, meter, quantity), run in groupby(rows, key=_RUN_KEY):
        run_rows = list(run)
        out.append((site, meter, quantity, run_rows[0][2], run_rows[-1][2], len(run_rows)))
    return out


_RUN_KEY = itemgetter(5, 0, 1)


def dirty_ranges(rows: Sequence[Row]) -> list[DirtyRange]:
    """Per (site, meter, counter quantity): the span of timestamps offered, duplicates included,
    so a replay after a crash between DB commit and publish still tells compute."""
    return _dirty(runs(sorted(rows)))


def _dirty(of_runs: list[Run]) -> list[DirtyRange]:
    """The dirty ranges of the counter runs among ``runs`` of rows in identity order."""
    # Built from values the decoder typed already: validating them again costs more than this.
    return [
        DirtyRange.model_construct(site_id=s, meter_id=m, quantity=q, t_min=lo, t_max=hi, rows=n)
        for s, m, q, lo, hi, n in of_runs
        if q in COUNTER_QUANTITIES
    ]


class Store(Protocol):
    """The seam between the writer loop and a storage engine. The loop keeps the ordering rules:
    a batch is written (``write`` returns only after its rows are durably committed), THEN its
    dirty ranges are published, THEN its offsets committed; a store never talks to Kafka. A second
    engine is one module with a class like ``ReadingStore`` plus its name in ``STORES`` and in the
    ``ingest.store`` setting (``SCOPEMETER_INGEST__STORE``)."""

    # Errors that mean "the engine refuses these rows" (not an outage): the loop then writes the
    # batch record by record and dead-letters the refused ones (reason ``db_refused``).
    refusals: tuple[type[Exception], ...]

    def write(
        self,
        rows: Sequence[Row],
        attempts: int = 5,
        *,
        ordered: bool = False,
        span: tuple[datetime, datetime] | None = None,
    ) -> WriteResult:
        """Write ``rows`` idempotently (a replayed row is counted, not inserted) and commit."""
        ...

    def ping(self) -> None:
        """Raise when the engine is unreachable (the loop reconnects with backoff)."""
        ...

    def close(self) -> None: ...


class ReadingStore:
    """The PostgreSQL store: one DB connection that writes row batches by binary COPY; remembers
    which monthly partitions exist."""

    refusals: tuple[type[Exception], ...] = (psycopg.errors.DataError, psycopg.errors.IntegrityError)

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, connect_timeout=10)
        self.conn.execute(_STAGE_DDL)
        self.conn.commit()
        self._months: set[date] = set()

    def close(self) -> None:
        self.conn.close()

    def ping(self) -> None:
        self.conn.execute("SELECT 1")
        self.conn.commit()

    def write(
        self,
        rows: Sequence[Row],
        attempts: int = 5,
        *,
        ordered: bool = False,
        span: tuple[datetime, datetime] | None = None,
    ) -> WriteResult:
        """Write ``rows`` in one transaction, retried when PostgreSQL picks it as a deadlock victim.

        Rows go in reading-identity order (sorted here unless ``ordered`` says they already are: a
        row tuple starts with the identity), so writers offering overlapping rows (a replay during
        a rebalance) wait on each other in one order and rarely deadlock; when they still do, the
        victim's transaction is rolled back whole and simply runs again. ``span`` (oldest, newest
        timestamp) spares a pass over the rows when the caller knows it."""
        if not ordered:
            rows = sorted(rows)
        if span is None and rows:
            span = min(map(_TS, rows)), max(map(_TS, rows))
        for attempt in range(1, attempts + 1):
            try:
                return self._write(rows, span)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                if attempt == attempts:
                    raise
                log.warning("write attempt %d of %d rolled back (%s); retrying", attempt, attempts, exc)
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _write(self, rows: Sequence[Row], span: tuple[datetime, datetime] | None) -> WriteResult:
        result = WriteResult(offered=len(rows))
        if not rows or span is None:
            return result
        t_min, t_max = span
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
        result.newest_ts = t_max
        return result


_TS = itemgetter(2)


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
    health: metrics.Health | None = None,
) -> None:
    """Consume until ``stop`` is set, then flush what was consumed and return.

    Two batches are in hand at a time: one is decoded and sorted in a worker thread while the one
    before it is written (its COPY mostly waits for PostgreSQL), and the next records are fetched
    meanwhile. DB transactions and offset commits still happen strictly in order. When PostgreSQL
    goes away the batch at hand is retried on a new connection (capped backoff) until it commits:
    nothing further is fetched meanwhile and no offset is committed past it; the consumer keeps
    polling so its group does not rebalance. ``health`` follows Kafka and the DB."""
    k = settings.kafka
    consumer = GroupConsumer(
        k,
        k.readings_topic,
        k.writer_group,
        health=health,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=5, **client_kwargs(k))
    db: Reconnecting[Store] = Reconnecting(
        lambda: open_store(settings),
        lambda store: store.close(),
        lambda store: store.ping(),
        stop=stop,
        health=health,
        max_delay=settings.db.reconnect_max_s,
    )
    await producer.start()
    await consumer.start()
    pending: list[ConsumerRecord[bytes, bytes]] = []
    pending_rows = 0
    first_at = 0.0
    checked_at = 0.0
    flushes: deque[_Flush] = deque()  # oldest first; each waits for the one before it

    def batch_due() -> bool:
        full_enough = pending_rows >= batch_rows_target
        return bool(pending) and (full_enough or time.monotonic() - first_at >= linger_s)

    try:
        await db.ping()  # health says at once whether the DB is there
        while True:
            stopping = stop.is_set()
            while flushes and flushes[0].task.done():
                flushes.popleft().task.result()  # re-raises a failed transaction
            full = len(flushes) >= _PIPELINE_DEPTH
            if full or (stopping and flushes and not pending):
                # A batch is late (a slow or absent DB): wait for it, polling without taking records.
                done, _ = await asyncio.wait({flushes[0].task}, timeout=1.0)
                if not done and not stopping:
                    await consumer.keepalive()
            elif not stopping:
                # A batch already due goes out at once: only take what the fetcher already holds.
                data = await consumer.getmany(timeout_ms=0 if batch_due() else 100, max_records=5_000)
                for records in data.values():
                    if not pending and records:
                        first_at = time.monotonic()
                    pending.extend(records)
                    pending_rows += sum(_estimate_rows(r) for r in records)
            if not full and pending and (stopping or batch_due()):
                previous = flushes[-1] if flushes else None
                written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                flush = _flush(pending, previous, written, db, producer, consumer, settings)
                flushes.append(_Flush(written, asyncio.create_task(flush)))
                pending, pending_rows = [], 0
            if time.monotonic() - checked_at >= 1.0:
                checked_at = time.monotonic()
                metrics.WRITER_ASSIGNED_PARTITIONS.set(len(consumer.assignment()))
                await consumer.report_lag()
                if not flushes:
                    await db.ping()
            if stopping and not pending and not flushes:
                break
    except Stopped:
        log.warning("stopped while PostgreSQL was unavailable: the unwritten records stay in Kafka")
    finally:
        if flushes:
            await asyncio.wait([f.task for f in flushes])  # never close the connection under a COPY
            for f in flushes:  # they failed after the one that ended the loop: that one says why
                if not f.task.cancelled():
                    f.task.exception()
        await consumer.stop()
        await producer.stop()
        await db.close()


# Batches in hand at once: one being prepared while the one before it is written.
_PIPELINE_DEPTH = 2


@dataclass
class _Flush:
    """One batch on its way: ``written`` resolves at its DB commit, ``task`` ends after its dirty
    ranges and offsets are out. The next batch may write after ``written``; it publishes and
    commits offsets only after ``task``, so both stay in order."""

    written: asyncio.Future[None]
    task: asyncio.Task[None]


def _estimate_rows(record: ConsumerRecord[bytes, bytes]) -> int:
    # Cheap: about 110 bytes of JSON per reading; exact counts are taken after decoding.
    return max(1, len(record.value or b"") // 110)


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


def prepare(records: Sequence[ConsumerRecord[bytes, bytes]]) -> Prepared:
    """Decode, sort into identity order, derive dirty ranges and the offsets to commit."""
    started = time.monotonic()
    rows, letters = decode_records(records)
    rows.sort()  # a row tuple starts with the reading identity
    offsets = last_offsets(list(records))
    cut = runs(rows)
    span = (min(r[3] for r in cut), max(r[4] for r in cut)) if cut else None
    prepared = Prepared(rows, letters, _dirty(cut), offsets, span, records)
    metrics.WRITER_DECODE_SECONDS.observe(time.monotonic() - started)
    return prepared


# What PostgreSQL says about the data itself (a NUL in a text, a value a column cannot hold, a
# constraint): retrying cannot help, unlike an outage (ops.db_session retries those).
REFUSALS: tuple[type[Exception], ...] = ReadingStore.refusals

# The storage engines, by the name the ``ingest.store`` setting gives.
STORES: dict[str, Callable[[Settings], Store]] = {
    "postgresql": lambda settings: ReadingStore(settings.db.dsn),
}


def open_store(settings: Settings) -> Store:
    """The store the settings select (the setting's type lists the names, so a typo fails at start)."""
    return STORES[settings.ingest.store](settings)


def _write(store: Store, *, prepared: Prepared) -> WriteResult:
    started = time.monotonic()
    try:
        result = store.write(prepared.rows, ordered=True, span=prepared.span)
    except store.refusals as exc:
        log.warning(
            "PostgreSQL refused a batch of %d records (%s); writing them one by one",
            len(prepared.records),
            _first_line(exc),
        )
        result = _write_each(store, prepared)
    metrics.WRITER_COMMIT_SECONDS.observe(time.monotonic() - started)
    return result


def _write_each(store: Store, prepared: Prepared) -> WriteResult:
    """Record by record, each in its own transaction: the ones PostgreSQL refuses become dead
    letters (reason ``db_refused``) and the writer goes on; the rest are written as usual. Only
    a producer other than the bridge can write such a record, so this path is rare and may be slow."""
    total = WriteResult()
    refused: set[Row] = set()
    for rec in prepared.records:
        rows, _letters = decode_records([rec])
        try:
            part = store.write(rows)
        except store.refusals as exc:
            value = rec.value or b""
            letter = DeadLetter.of(Reason.DB_REFUSED, _first_line(exc), f"kafka:{rec.topic}", value)
            prepared.letters.append(letter)
            refused.update(rows)
            continue
        total.offered += part.offered
        total.inserted += part.inserted
        if part.newest_ts is not None and (total.newest_ts is None or part.newest_ts > total.newest_ts):
            total.newest_ts = part.newest_ts
    if refused:  # no dirty range for what was not written
        prepared.dirty = _dirty(runs([r for r in prepared.rows if r not in refused]))
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _flush(
    records: list[ConsumerRecord[bytes, bytes]],
    previous: _Flush | None,
    written: asyncio.Future[None],
    db: Reconnecting[Store],
    producer: AIOKafkaProducer,
    consumer: GroupConsumer,
    settings: Settings,
) -> None:
    """Prepare ``records`` while ``previous`` is written, write them once it is committed, then
    publish their dirty ranges and commit their offsets once ``previous`` has done so: the next
    COPY does not wait for Kafka round trips."""
    try:
        prepared = await asyncio.to_thread(prepare, records)
        if previous is not None:
            await previous.written  # in order; if it failed, so does this (the writer exits, Kafka replays)
        result = await db.run(functools.partial(_write, prepared=prepared))  # until it commits
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            written.cancel()
        else:
            written.set_exception(exc)
            written.exception()  # whoever waits on this task sees the error; the future need not
        raise
    written.set_result(None)
    committed_at = datetime.now(UTC)
    if result.inserted:
        metrics.WRITER_LAST_COMMIT.set(committed_at.timestamp())
    for letter in prepared.letters:
        await producer.send_and_wait(settings.kafka.dlq_topic, letter.encode())
    metrics.WRITER_BATCH_ROWS.observe(result.offered)
    metrics.WRITER_ROWS.labels(outcome="inserted").inc(result.inserted)
    metrics.WRITER_ROWS.labels(outcome="duplicate").inc(result.offered - result.inserted)
    if result.newest_ts is not None:
        metrics.WRITER_LATENCY.observe(max(0.0, (committed_at - result.newest_ts).total_seconds()))
    if previous is not None:
        await previous.task
    by_site: dict[str, list[DirtyRange]] = {}
    for d in prepared.dirty:
        by_site.setdefault(d.site_id, []).append(d)
    topic = settings.kafka.committed_topic
    sends = [
        await producer.send(topic, DirtyBatch(site_id=site, ranges=ranges).encode(), key=site.encode())
        for site, ranges in by_site.items()
    ]
    if sends:
        await asyncio.gather(*sends)
    await consumer.commit(prepared.offsets)
    log.debug("wrote %d rows (%d new) from %d records", result.offered, result.inserted, len(records))
