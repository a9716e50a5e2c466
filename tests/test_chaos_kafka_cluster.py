"""Chaos on a replicated Kafka: three KRaft nodes on this machine (replication factor 3,
``min.insync.replicas=2``), the bridge producing with ``acks=all`` and the idempotent producer.

The leader of the readings partitions is killed with SIGKILL while the load runs. The two followers
in sync elect a new leader; the bridge's unacked sends are retried there (its MQTT PUBACK waits for
the Kafka ack), and the writer follows the new leader. The killed node is then started again and
catches up. PostgreSQL must end with exactly the generated readings: none lost, none doubled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.loadgen import Fleet, LoadGenerator, forget_session
from ops.bench_ingest import lane_settings
from ops.kafka_broker import KafkaCluster, start_kafka_cluster
from ops.pipeline import settings_env
from ops.procs import ManagedProcess, free_port
from ops.settings import Settings
from ops.stack import ensure_topics, start_mosquitto
from tests.chaos_support import WAIT, Load, Supervised, db_count, db_rows, until


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ManagedProcess, KafkaCluster, Path]]:
    mosquitto = start_mosquitto(free_port(), tmp_path / "mosquitto")
    nodes = start_kafka_cluster([(free_port(), free_port()) for _ in range(3)], tmp_path / "kafka")
    yield mosquitto, nodes, tmp_path
    mosquitto.stop()
    nodes.stop()


async def _leaders(bootstrap: str, topic: str) -> dict[int, tuple[int, list[int]]]:
    """partition → (leader node id, in-sync replicas)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {p["partition"]: (p["leader"], sorted(p["isr"])) for p in described["partitions"]}


async def _min_insync(bootstrap: str, topic: str) -> str:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    for _code, _msg, _type, _name, entries in response.resources:
        for name, value, *_rest in entries:
            if name == "min.insync.replicas":
                return str(value)
    raise AssertionError("min.insync.replicas not described")


def test_kill_9_of_the_partition_leader_loses_and_duplicates_nothing(
    settings: Settings, cluster: tuple[ManagedProcess, KafkaCluster, Path]
) -> None:
    mosquitto, nodes, tmp = cluster
    tag = f"kc-{uuid.uuid4().hex[:8]}"
    s = lane_settings(settings, tag)
    s = s.model_copy(update={
        "ingest": s.ingest.model_copy(update={"shared_subscription": False}),
        "mqtt": s.mqtt.model_copy(update={"host": mosquitto.host, "port": mosquitto.port}),
        "kafka": s.kafka.model_copy(update={"bootstrap": nodes.bootstrap, "partitions": 2}),
    })
    ensure_topics(s.kafka)
    leaders: dict[int, tuple[int, list[int]]] = {}

    def described() -> bool:  # a new topic reaches every node's metadata a moment after creation
        leaders.update(asyncio.run(_leaders(s.kafka.bootstrap, s.kafka.readings_topic)))
        return len(leaders) == 2

    until("the readings topic's two partitions in the metadata", described, 30)
    assert all(isr == [1, 2, 3] for _leader, isr in leaders.values()), leaders  # replication factor 3
    assert asyncio.run(_min_insync(s.kafka.bootstrap, s.kafka.readings_topic)) == "2"

    env = settings_env(s)
    bridge_id = f"{tag}-bridge"
    fleet = Fleet(tag.replace("-", ""), sites=4, meters=25)
    fleet.register(s.db.dsn)  # the bridge admits only registered gateways and meters
    gen = LoadGenerator(s, fleet, steps=4, spacing=timedelta(seconds=1))
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    bridge = Supervised("bridge", ["ingest", "bridge", "--metrics-port", "0", "--client-id", bridge_id],
                        env, tmp)  # fmt: skip
    writer = Supervised("writer", ["ingest", "writer", "--metrics-port", "0"], env, tmp)
    load: Load | None = None
    try:
        bridge.proc.wait_event("bridge.ready", WAIT)
        gen.connect()
        load = Load(gen, base, pause=0.05)

        def settle(what: str) -> None:
            mark = load.published()
            until(f"{mark} rows after {what}", lambda: db_count(s.db.dsn, fleet.prefix) >= mark, 90)

        settle("start")
        victim = leaders[0][0]
        before = load.published()
        nodes.kill(victim)  # mid-flight: the load keeps publishing
        time.sleep(2.0)
        during = load.published()
        survivors = ",".join(f"{n.host}:{n.port}" for n in nodes.nodes if n.node_id != victim)

        def new_leaders() -> bool:
            from aiokafka.errors import KafkaError

            try:  # the survivors' metadata may still name the dead node for a moment
                now = asyncio.run(_leaders(survivors, s.kafka.readings_topic))
            except KafkaError:
                return False
            return all(leader not in (victim, -1) for leader, _isr in now.values())

        until(f"leaders other than node {victim}", new_leaders, 60)
        settle(f"kill -9 of node {victim}, the leader of partition 0")
        nodes.restart(victim)
        settle(f"restart of node {victim}")
        load.stop()
        assert gen.wait_acked(WAIT), "some batches never got a PUBACK"
        total = gen.total
        until(f"all {total} rows", lambda: db_count(s.db.dsn, fleet.prefix) >= total, 90)
        time.sleep(1.0)  # a late duplicate would show up as an extra row
        rows = db_rows(s.db.dsn, fleet.prefix)
    finally:
        if load is not None:
            load.stop()
        gen.close()
        bridge.stop()
        writer.stop()
        forget_session(s, bridge_id)

    assert 0 < before < during < total  # readings flowed before, during and after the leader's death
    expected = sorted(gen.expected())
    assert len(rows) == len(expected) == total
    assert rows == expected  # every generated reading, once, with its exact value
