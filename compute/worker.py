"""The compute worker: Kafka ``readings.committed.v1`` → ``recompute`` → offsets committed.

Each poll's dirty ranges are coalesced per (meter, quantity) into one span (recomputing the union
covers every part), recomputed in their own DB transactions, and only then are the Kafka offsets
committed. A crash replays ranges, and recompute is idempotent, so nothing is lost or doubled.
Messages that do not decode are logged and skipped (the writer is the only producer).

Metrics: ``scopemeter_kafka_consumer_lag`` for the compute group after every poll (partition end
minus the position, which is the committed offset once a poll's recompute is committed) and
``scopemeter_compute_latency_seconds`` per record, from its Kafka timestamp (the writer publishes
right after its DB commit) to after the recompute commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from compute.recompute import Params, RecomputeResult, recompute
from ingest.events import DirtyRange, decode_dirty
from ops import metrics
from ops.settings import Settings

log = logging.getLogger("scopemeter.compute.worker")


def coalesce(ranges: Iterable[DirtyRange]) -> list[DirtyRange]:
    """One range per (meter, quantity) spanning all given ones; first-seen order."""
    merged: dict[tuple[str, str], DirtyRange] = {}
    for r in ranges:
        key = (r.meter_id, r.quantity)
        m = merged.get(key)
        merged[key] = (
            r
            if m is None
            else DirtyRange(
                site_id=r.site_id,
                meter_id=r.meter_id,
                quantity=r.quantity,
                t_min=min(m.t_min, r.t_min),
                t_max=max(m.t_max, r.t_max),
                rows=m.rows + r.rows,
            )
        )
    return list(merged.values())


def decode(records: Iterable[ConsumerRecord[bytes, bytes]]) -> list[DirtyRange]:
    ranges = []
    for rec in records:
        try:
            ranges.extend(decode_dirty(rec.value or b""))
        except ValidationError as exc:
            log.error("skipping undecodable record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
    return ranges


def recompute_many(
    conn: psycopg.Connection[Any], ranges: list[DirtyRange], params: Params
) -> list[RecomputeResult]:
    results = []
    for r in ranges:
        results.append(recompute(conn, r, params))
        metrics.COMPUTE_RANGES.inc()
    return results


async def record_lag(consumer: AIOKafkaConsumer, group: str) -> None:
    """Set the lag gauge of every assigned partition whose end offset the consumer has seen."""
    for tp in consumer.assignment():
        end = consumer.highwater(tp)
        if end is None:
            continue
        lag = end - await consumer.position(tp)
        metrics.KAFKA_CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(max(0, lag))


def record_latency(records: Iterable[ConsumerRecord[bytes, bytes]], done_s: float) -> None:
    for rec in records:
        metrics.COMPUTE_LATENCY.observe(max(0.0, done_s - rec.timestamp / 1000))


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    poll_timeout_ms: int = 200,
    max_records: int = 2_000,
) -> None:
    """Consume and recompute until ``stop`` is set; returns after finishing the current poll."""
    k = settings.kafka
    params = Params.from_settings(settings.compute)
    consumer = AIOKafkaConsumer(
        k.committed_topic,
        bootstrap_servers=k.bootstrap,
        group_id=k.compute_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=k.fetch_max_wait_ms,
    )
    conn: psycopg.Connection[Any] = await asyncio.to_thread(psycopg.connect, settings.db.dsn)
    await consumer.start()
    log.info(
        "compute worker consuming %s as group %s (factor series %s)",
        k.committed_topic,
        k.compute_group,
        params.factor_series,
    )
    try:
        while not stop.is_set():
            data = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
            records = [rec for recs in data.values() for rec in recs]
            if not records:
                await record_lag(consumer, k.compute_group)
                continue
            ranges = coalesce(decode(records))
            results = await asyncio.to_thread(recompute_many, conn, ranges, params)
            record_latency(records, time.time())
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for rec in records:
                tp = TopicPartition(rec.topic, rec.partition)
                if tp not in offsets or offsets[tp].offset <= rec.offset:
                    offsets[tp] = OffsetAndMetadata(rec.offset + 1, "")
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:  # rebalanced: the new owner replays; recompute is idempotent
                log.warning("offset commit failed after recompute (replay is harmless): %s", exc)
            await record_lag(consumer, k.compute_group)
            events = sum(sum(r.events.values()) for r in results)
            log.debug(
                "recomputed %d ranges from %d records (%d counter events)", len(ranges), len(records), events
            )
    finally:
        await consumer.stop()
        await asyncio.to_thread(conn.close)
