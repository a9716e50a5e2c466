"""Kafka with SASL switched on: a real broker whose second listener is SASL_PLAINTEXT (PLAIN), and
the project's own clients configured only through the settings (``kafka.security_protocol``,
``sasl_*``, applied by ``ops.kafka_client.client_kwargs`` to every producer, consumer and admin).

The topics are created by ``stack.ensure_topics`` and a real writer process stores a batch read
over the authenticated listener; a wrong password and a client without SASL are refused."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from ingest.registry import register_gateway
from ops.errors import UserError
from ops.kafka_broker import SaslListener, start_kafka
from ops.kafka_client import client_kwargs
from ops.pipeline import _Proc, settings_env
from ops.procs import ManagedProcess, free_port
from ops.settings import KafkaSettings, Settings
from ops.stack import ensure_topics
from tests.chaos_support import until
from tests.helpers import make_batch

USER, PASSWORD = "scopemeter-writer", "s3cret-for-tests"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, int]]:
    sasl_port = free_port()
    proc = start_kafka(
        free_port(), tmp_path_factory.mktemp("kafka-sasl"), controller_port=free_port(),
        sasl=SaslListener(sasl_port, {USER: PASSWORD}),
    )
    yield proc, sasl_port
    proc.stop(30.0)


def _sasl_settings(port: int, password: str = PASSWORD, tag: str = "") -> KafkaSettings:
    tag = tag or uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap=f"127.0.0.1:{port}", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
        sasl_username=USER, sasl_password=password, partitions=1,
        readings_topic=f"readings-{tag}", dlq_topic=f"dlq-{tag}", committed_topic=f"committed-{tag}",
        writer_group=f"writer-{tag}",
    )


def test_wrong_password_and_missing_sasl_are_refused(sasl_broker: tuple[ManagedProcess, int]) -> None:
    _proc, port = sasl_broker
    with pytest.raises(UserError, match="kafka: cannot create topics"):
        ensure_topics(_sasl_settings(port, password="wrong"), timeout=10)
    plain = _sasl_settings(port).model_copy(
        update={"security_protocol": "PLAINTEXT", "sasl_username": None, "sasl_password": None}
    )
    with pytest.raises(UserError, match="kafka: cannot create topics"):
        ensure_topics(plain, timeout=10)


def test_writer_stores_readings_read_over_sasl(
    sasl_broker: tuple[ManagedProcess, int], settings: Settings, tmp_path: Path
) -> None:
    _proc, port = sasl_broker
    kafka = _sasl_settings(port)
    assert sorted(ensure_topics(kafka, timeout=30)) == sorted(
        [kafka.readings_topic, kafka.dlq_topic, kafka.committed_topic]
    )
    s = settings.model_copy(update={"kafka": kafka})
    tag = uuid.uuid4().hex[:6]
    site, gateway, prefix = f"s-{tag}", f"g-{tag}", f"m{tag}-"
    batch = make_batch(0, site=site, gateway=gateway, meter_prefix=prefix, meters=2, steps=3)
    with psycopg.connect(s.db.dsn) as conn:
        register_gateway(conn, batch.supplier, site, gateway, [f"{prefix}0", f"{prefix}1"])

    async def produce() -> None:
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **client_kwargs(kafka))
        await producer.start()
        try:
            await producer.send_and_wait(kafka.readings_topic, batch.encode(), key=site.encode())
        finally:
            await producer.stop()

    asyncio.run(produce())
    writer = _Proc("writer-sasl", ["ingest", "writer", "--metrics-port", "0"], settings_env(s), tmp_path)
    try:
        def stored() -> bool:
            with psycopg.connect(s.db.dsn) as conn:
                row = conn.execute("SELECT count(*) FROM readings WHERE meter_id LIKE %s", (prefix + "%",))
                return (row.fetchone() or (0,))[0] == 6
        until("the writer's 6 rows, read over SASL", stored, 60)
    finally:
        writer.stop()
