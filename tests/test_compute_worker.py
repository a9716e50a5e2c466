"""The compute worker against a real Apache Kafka broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.rebuild import recompute_all
from compute.report import site_totals
from compute.worker import coalesce, run_worker
from ingest.events import DirtyBatch, DirtyRange
from ingest.writer import dirty_ranges
from ops import metrics
from ops.procs import ManagedProcess
from ops.settings import DbSettings, KafkaSettings, Settings
from tests.test_compute_support import REPO, Row, compute_dsn, insert_rows, reset, snapshot

__all__ = ["compute_dsn"]

T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def broker(kafka: ManagedProcess) -> str:
    """The session's real Kafka; every test here uses topics and groups of its own."""
    return f"{kafka.host}:{kafka.port}"


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for key, value in payloads:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _committed(settings: Settings, partitions: int) -> dict[int, int | None]:
    k = settings.kafka
    consumer = AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap, group_id=k.compute_group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(k.committed_topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


def _rows() -> list[Row]:
    """Two meters at 60 and 30 kW read every 30 s for 2 h, arriving in 12 batches."""
    rows: list[Row] = []
    for k in range(241):
        ts = T0 + timedelta(seconds=30 * k)
        rows.append(
            ("sz1-smt-line-1", "energy_import_kwh", ts, 1000 + 60 * k / 120, 0, "sz-plant-1", "gw-sz1-01", 0)
        )
        rows.append(("sz1-hvac", "energy_import_kwh", ts, 50 + 30 * k / 120, 0, "sz-plant-1", "gw-sz1-01", 0))
    return rows


def test_coalesce_spans_union_per_meter() -> None:
    def d(meter: str, a: int, b: int) -> DirtyRange:
        return DirtyRange(
            site_id="s", meter_id=meter, quantity="energy_import_kwh",
            t_min=T0 + timedelta(minutes=a), t_max=T0 + timedelta(minutes=b), rows=1,
        )  # fmt: skip

    merged = coalesce([d("a", 10, 20), d("b", 0, 1), d("a", 5, 7), d("a", 30, 31)])
    assert [(m.meter_id, m.t_min, m.t_max, m.rows) for m in merged] == [
        ("a", T0 + timedelta(minutes=5), T0 + timedelta(minutes=31), 3),
        ("b", T0, T0 + timedelta(minutes=1), 1),
    ]


def test_worker_recomputes_and_commits_offsets(broker: str, compute_dsn: str) -> None:
    topic = f"committed-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka=KafkaSettings(bootstrap=broker, committed_topic=topic, compute_group=f"compute-{topic}"),
        db=DbSettings(dsn=compute_dsn),
    )
    rows = _rows()
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_fleet(conn, REPO / "config" / "fleet.toml")
        apply_factors(conn, REPO / "config" / "factors.toml")
        insert_rows(conn, rows)
        recompute_all(conn)
        expected = snapshot(conn)
        conn.execute("TRUNCATE meter_energy_15m, site_rollups_15m")
        conn.commit()

    # What the writer would publish: one message per batch and meter, replayed once, plus junk.
    batches = [rows[i : i + 40] for i in range(0, len(rows), 40)]
    messages = [(d.site_id.encode(), d.encode()) for b in batches for d in dirty_ranges(b)]
    messages += [*messages[:3], (b"sz-plant-1", b"{not json")]
    latency_before = metrics.COMPUTE.get_sample_value("scopemeter_compute_latency_seconds_count") or 0.0

    async def scenario() -> dict[int, int | None]:
        await _create_topic(broker, topic, partitions=2)
        await _produce(broker, topic, messages)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(settings, stop))
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and not worker.done():
                if await asyncio.to_thread(_snapshot, compute_dsn) == expected:
                    break
                await asyncio.sleep(0.2)
            # Offsets are committed right after the recompute that produced the final state.
            while time.monotonic() < deadline and not worker.done():
                committed = await _committed(settings, 2)
                if sum(v or 0 for v in committed.values()) == len(messages):
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 30)
        return await _committed(settings, 2)

    committed = asyncio.run(scenario())
    assert _snapshot(compute_dsn) == expected
    assert sum(v or 0 for v in committed.values()) == len(messages)
    # One latency observation per record handled; the lag of every partition ends at zero.
    latency_count = metrics.COMPUTE.get_sample_value("scopemeter_compute_latency_seconds_count")
    assert latency_count == latency_before + len(messages)
    group = settings.kafka.compute_group
    lag = {
        p: metrics.COMPUTE.get_sample_value(
            "scopemeter_kafka_consumer_lag", {"group": group, "topic": topic, "partition": str(p)}
        )
        for p in range(2)
    }
    assert lag == {0: 0.0, 1: 0.0}

    with psycopg.connect(compute_dsn) as conn:
        (total,) = site_totals(conn, T0, T0 + timedelta(hours=2))
    assert total.site_id == "sz-plant-1" and total.carrier == "electricity"
    assert total.kwh == pytest.approx(180.0)  # (60 + 30) kW * 2 h
    assert total.kg_co2e == pytest.approx(180.0 * 0.5306)  # MEE/NBS 2023 national average
    assert total.buckets == 8 and total.buckets_without_factor == 0
    assert total.factor_ids == ("cn-mee-stat-2023-national-v1",)


def _snapshot(dsn: str) -> Any:
    with psycopg.connect(dsn) as conn:
        return snapshot(conn)


SCALE_SITES = 8


def _scale_fleet() -> str:
    parts = ['[[suppliers]]\nid = "acme"\nname = "Acme"\n']
    for s in range(SCALE_SITES):
        parts.append(
            f'[[sites]]\nid = "site-{s}"\nsupplier = "acme"\nname = "Site {s}"\n'
            'grid_region = "CN"\ntimezone = "Asia/Shanghai"\n'
        )
        parts += [
            f'[[meters]]\nid = "site-{s}-m{m}"\nsite = "site-{s}"\ncarrier = "electricity"\n'
            'model = "eastron_sdm630"\n'
            for m in range(2)
        ]
    return "\n".join(parts)


def _scale_rows() -> list[Row]:
    rows: list[Row] = []
    for s in range(SCALE_SITES):
        for m in range(2):
            for k in range(121):
                ts = T0 + timedelta(seconds=60 * k + s + m)
                rows.append(
                    (
                        f"site-{s}-m{m}",
                        "energy_import_kwh",
                        ts,
                        10.0 * s + (1 + m) * k / 7,
                        0,
                        f"site-{s}",
                        "gw",
                        0,
                    )
                )
    return rows


async def _members(settings: Settings) -> list[set[int]]:
    """The partitions the compute group's members own, as the group coordinator reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([settings.kafka.compute_group])
    except KafkaError:  # the coordinator is still being elected: no members yet
        return []
    finally:
        await admin.close()
    (group,) = response.groups
    owned = []
    for member in group[5]:
        assignment = ConsumerProtocolMemberAssignment.decode(member[-1]) if member[-1] else None
        owned.append({tp.partition for tp in assignment.partitions()} if assignment else set())
    return owned


def _run_group(broker: str, dsn: str, workers: int, messages: list[tuple[bytes, bytes]]) -> list[set[int]]:
    """``workers`` compute workers in one consumer group over a 4-partition topic: once each owns
    partitions, the messages are produced; returns when every offset is committed."""
    topic = f"committed-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka=KafkaSettings(bootstrap=broker, committed_topic=topic, compute_group=f"compute-{topic}"),
        db=DbSettings(dsn=dsn),
    )

    async def scenario() -> list[set[int]]:
        await _create_topic(broker, topic, partitions=4)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_worker(settings, stop)) for _ in range(workers)]
        deadline = time.monotonic() + 90
        try:
            owned: list[set[int]] = []
            while time.monotonic() < deadline and not any(t.done() for t in tasks):
                owned = await _members(settings)
                if len(owned) == workers and all(owned) and set().union(*owned) == {0, 1, 2, 3}:
                    break
                await asyncio.sleep(0.5)
            await _produce(broker, topic, messages)
            while time.monotonic() < deadline and not any(t.done() for t in tasks):
                committed = await _committed(settings, 4)
                if sum(v or 0 for v in committed.values()) == len(messages):
                    break
                await asyncio.sleep(0.2)
            return owned
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)

    return asyncio.run(scenario())


def test_two_workers_in_one_group_share_sites_and_equal_one(
    broker: str, compute_dsn: str, tmp_path: Any
) -> None:
    """Scale-out: the dirty ranges are keyed by site (as the writer publishes them), so each site
    lives in one partition; two workers of one group split the partitions and their rollups are
    exactly those of one worker, and of a clean rebuild."""
    rows = _scale_rows()
    (tmp_path / "fleet.toml").write_text(_scale_fleet())
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_fleet(conn, tmp_path / "fleet.toml")
        apply_factors(conn, REPO / "config" / "factors.toml")
        insert_rows(conn, rows)
        recompute_all(conn)
        expected = snapshot(conn)
    batches = [rows[i : i + 50] for i in range(0, len(rows), 50)]
    messages = []
    for b in batches:
        by_site: dict[str, list[DirtyRange]] = {}
        for d in dirty_ranges(b):
            by_site.setdefault(d.site_id, []).append(d)
        messages += [(s.encode(), DirtyBatch(site_id=s, ranges=r).encode()) for s, r in by_site.items()]

    results = []
    for workers in (1, 2):
        with psycopg.connect(compute_dsn) as conn:
            conn.execute("TRUNCATE meter_energy_15m, site_rollups_15m, site_market_1h")
            conn.commit()
        owned = _run_group(broker, compute_dsn, workers, messages)
        assert len(owned) == workers and all(owned)  # every worker owns partitions
        results.append(_snapshot(compute_dsn))
    assert results[0] == expected
    assert results[1] == results[0]
