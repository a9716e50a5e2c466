"""The compute worker: Kafka ``readings.committed.v1`` → ``recompute`` → offsets committed.

Each poll's dirty ranges are coalesced per (meter, quantity) into one span (recomputing the union
covers every part) and recomputed together, set-based, in ONE DB transaction
(``compute.recompute.recompute_set``); only then are the Kafka offsets committed.

Scale-out: run several workers in the compute group. The writer keys each dirty-range record by
site, so a site's ranges always land in one partition and each partition has one owner: sites are
partitioned among the workers, and the per-site advisory locks keep a rebalance (two owners for a
moment) correct. A crash replays ranges, and recompute is idempotent, so nothing is lost or doubled.
Messages that do not decode are logged and skipped (the writer is the only producer).

Metrics: ``scopemeter_kafka_consumer_lag`` for the compute group after every poll (as for the
writer: partition end minus the group's committed offset, ``ops.kafka_client``) and
``scopemeter_compute_latency_seconds`` per record, from its Kafka timestamp (the writer publishes
right after its DB commit) to after the recompute commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from aiokafka import ConsumerRecord
from pydantic import ValidationError

from compute.recompute import Params, RecomputeResult, coalesce, recompute_set
from ingest.events import DirtyRange, decode_dirty
from ops import metrics
from ops.db_session import Reconnecting
from ops.kafka_client import GroupConsumer, last_offsets
from ops.runtime import Stopped
from ops.settings import Settings

log = logging.getLogger("scopemeter.compute.worker")


def decode(records: Iterable[ConsumerRecord[bytes, bytes]]) -> list[DirtyRange]:
    ranges = []
    for rec in records:
        try:
            ranges.extend(decode_dirty(rec.value or b""))
        except ValidationError as exc:
            log.error("skipping undecodable record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
    return ranges


def recompute_many(
    conn: psycopg.Connection[Any], *, ranges: list[DirtyRange], params: Params
) -> list[RecomputeResult]:
    """The whole poll in one set-based recompute (``compute.recompute.recompute_set``)."""
    results = recompute_set(conn, ranges, params)
    metrics.COMPUTE_RANGES.inc(len(results))
    return results


def record_latency(records: Iterable[ConsumerRecord[bytes, bytes]], done_s: float) -> None:
    for rec in records:
        metrics.COMPUTE_LATENCY.observe(max(0.0, done_s - rec.timestamp / 1000))


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    poll_timeout_ms: int = 200,
    max_records: int = 2_000,
    health: metrics.Health | None = None,
) -> None:
    """Consume and recompute until ``stop`` is set; returns after finishing the current poll.

    When PostgreSQL goes away the poll's ranges are recomputed again on a new connection (capped
    backoff) until they commit; only then are the offsets committed. ``health`` follows Kafka and
    the DB."""
    k = settings.kafka
    params = Params.from_settings(settings.compute)
    consumer = GroupConsumer(k, k.committed_topic, k.compute_group, health=health)
    db: Reconnecting[psycopg.Connection[Any]] = Reconnecting(
        lambda: psycopg.connect(settings.db.dsn, connect_timeout=10),
        psycopg.Connection.close,
        _ping,
        stop=stop,
        health=health,
        max_delay=settings.db.reconnect_max_s,
    )
    await consumer.start()
    log.info(
        "compute worker consuming %s as group %s (factor series %s)",
        k.committed_topic,
        k.compute_group,
        params.factor_series,
    )
    checked_at = 0.0
    try:
        await db.ping()
        while not stop.is_set():
            data = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
            records = [rec for recs in data.values() for rec in recs]
            if not records:
                await consumer.report_lag()
                if time.monotonic() - checked_at >= 1.0:
                    checked_at = time.monotonic()
                    await db.ping()
                continue
            ranges = coalesce(decode(records))
            results = await db.run(
                functools.partial(recompute_many, ranges=ranges, params=params),
                while_waiting=consumer.keepalive,
            )
            record_latency(records, time.time())
            # Rebalanced meanwhile: the new owner replays what is not committed; recompute is idempotent.
            await consumer.commit(last_offsets(records))
            await consumer.report_lag()
            events = sum(sum(r.events.values()) for r in results)
            log.debug(
                "recomputed %d ranges from %d records (%d counter events)", len(ranges), len(records), events
            )
    except Stopped:
        log.warning("stopped while PostgreSQL was unavailable: the ranges not recomputed stay in Kafka")
    finally:
        await consumer.stop()
        await db.close()


def _ping(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")
    conn.commit()
