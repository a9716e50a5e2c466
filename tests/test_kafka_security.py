"""Kafka with security switched on: real brokers with a SASL_PLAINTEXT (PLAIN) listener and with a
mutual-TLS (SSL, client certificates required) listener, and the project's own clients configured
only through the settings (``kafka.security_protocol``, ``sasl_*``, ``ssl_*``, applied by
``ops.kafka_client.client_kwargs`` to every producer, consumer and admin).

On each, the topics are created by ``stack.ensure_topics`` and a real writer process stores a batch
read over the secured listener; a wrong password, a client without SASL, a client without a
certificate, one whose certificate another CA signed, one that trusts another CA (the broker is
verified, not just encrypted to) and a plaintext client are refused."""

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
from ops.kafka_broker import SaslListener, TlsListener, start_kafka
from ops.kafka_client import client_kwargs
from ops.pipeline import _Proc, settings_env
from ops.procs import ManagedProcess, free_port
from ops.settings import KafkaSettings, Settings
from ops.stack import ensure_topics, status
from tests.chaos_support import until
from tests.helpers import make_batch
from tests.tls_support import make_pki

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


def _writer_stores_over(kafka: KafkaSettings, settings: Settings, tmp_path: Path) -> None:
    """Topics created, a batch produced and a real writer process storing it, all over ``kafka``."""
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
    writer = _Proc(f"writer-{kafka.security_protocol.lower()}", ["ingest", "writer", "--metrics-port", "0"],
                   settings_env(s), tmp_path)
    try:
        def stored() -> bool:
            with psycopg.connect(s.db.dsn) as conn:
                row = conn.execute("SELECT count(*) FROM readings WHERE meter_id LIKE %s", (prefix + "%",))
                return (row.fetchone() or (0,))[0] == 6
        until(f"the writer's 6 rows, read over {kafka.security_protocol}", stored, 60)
    finally:
        writer.stop()


def test_writer_stores_readings_read_over_sasl(
    sasl_broker: tuple[ManagedProcess, int], settings: Settings, tmp_path: Path
) -> None:
    _proc, port = sasl_broker
    _writer_stores_over(_sasl_settings(port), settings, tmp_path)


# --- mutual TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """A broker whose SSL listener requires a client certificate signed by the test CA. Yields the
    listener's port, the PKI (ca.pem, server, writer) and a second, foreign PKI (its own CA, rogue)."""
    pki, foreign = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("pki-foreign")
    make_pki(pki, ["writer"])
    make_pki(foreign, ["rogue"])
    keystore = pki / "server-keystore.pem"
    keystore.write_bytes((pki / "server.key").read_bytes() + (pki / "server.pem").read_bytes())
    tls_port = free_port()
    proc = start_kafka(
        free_port(), tmp_path_factory.mktemp("kafka-tls"), controller_port=free_port(),
        tls=TlsListener(tls_port, keystore=keystore, truststore=pki / "ca.pem"),
    )
    yield tls_port, pki, foreign
    proc.stop(30.0)


def _tls_settings(port: int, ca: Path, cert: Path | None, key: Path | None) -> KafkaSettings:
    tag = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap=f"127.0.0.1:{port}", security_protocol="SSL", ssl_cafile=ca, ssl_certfile=cert,
        ssl_keyfile=key, partitions=1, readings_topic=f"readings-{tag}", dlq_topic=f"dlq-{tag}",
        committed_topic=f"committed-{tag}", writer_group=f"writer-{tag}",
    )


def test_writer_stores_readings_read_over_mutual_tls(
    tls_broker: tuple[int, Path, Path], settings: Settings, tmp_path: Path
) -> None:
    port, pki, _foreign = tls_broker
    kafka = _tls_settings(port, pki / "ca.pem", pki / "writer.pem", pki / "writer.key")
    _writer_stores_over(kafka, settings, tmp_path)


@pytest.mark.parametrize(
    "who",
    ["no client certificate", "certificate from another CA", "trusts another CA", "plaintext"],
)
def test_tls_listener_refuses(tls_broker: tuple[int, Path, Path], who: str) -> None:
    port, pki, foreign = tls_broker
    kafka = {
        "no client certificate": _tls_settings(port, pki / "ca.pem", None, None),
        "certificate from another CA": _tls_settings(port, pki / "ca.pem", foreign / "rogue.pem",
                                                     foreign / "rogue.key"),
        "trusts another CA": _tls_settings(port, foreign / "ca.pem", pki / "writer.pem", pki / "writer.key"),
        "plaintext": _tls_settings(port, pki / "ca.pem", None, None).model_copy(
            update={"security_protocol": "PLAINTEXT", "ssl_cafile": None}
        ),
    }[who]
    with pytest.raises(UserError, match="kafka: cannot create topics"):
        ensure_topics(kafka, timeout=10)


def test_stack_status_sees_a_tls_only_broker_through_the_settings(
    tls_broker: tuple[int, Path, Path], settings: Settings
) -> None:
    """The plaintext port probe cannot tell a TLS listener from any other service; status asks the
    way the clients connect, so a healthy mutual-TLS broker is up and a client without a
    certificate sees it down."""
    port, pki, _foreign = tls_broker
    good = _tls_settings(port, pki / "ca.pem", pki / "writer.pem", pki / "writer.key")

    def kafka_up(kafka: KafkaSettings) -> bool:
        pieces = status(settings.model_copy(update={"kafka": kafka})).pieces
        return next(p for p in pieces if p.name == "kafka").reachable

    assert kafka_up(good)
    assert not kafka_up(_tls_settings(port, pki / "ca.pem", None, None))


def test_import_notice_and_dlq_reader_use_the_security_settings(
    tls_broker: tuple[int, Path, Path], settings: Settings
) -> None:
    """The tools that talk to Kafka outside the bridge and writer (the importer's dirty-range notice,
    the DLQ reader) connect with the same TLS settings: the notice the importer sends is read back
    by the DLQ tools' reader over the mutual-TLS listener."""
    import datetime as dt

    from ingest.dlq_tools import read_records
    from ingest.events import DirtyBatch, DirtyRange
    from ingest.importer import notify_compute

    port, pki, _foreign = tls_broker
    kafka = _tls_settings(port, pki / "ca.pem", pki / "writer.pem", pki / "writer.key")
    ensure_topics(kafka, timeout=30)
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    dirty = [DirtyRange(site_id="s-tls", meter_id="m-tls", quantity="energy_import_kwh",
                        t_min=t0, t_max=t0 + dt.timedelta(hours=1), rows=5)]
    assert asyncio.run(notify_compute(kafka, kafka.committed_topic, dirty)) == 1
    records = read_records(settings.model_copy(update={"kafka": kafka}), kafka.committed_topic)
    assert [DirtyBatch.model_validate_json(r.value or b"").ranges for r in records] == [dirty]


def test_every_kafka_client_of_the_product_takes_the_security_settings() -> None:
    """A producer, consumer or admin client built with ``bootstrap_servers=`` alone would ignore
    TLS and SASL and fail against a secured cluster (the Sparkplug host, the importer and the DLQ
    tools once did): each one in the product packages is given ``**client_kwargs(...)``."""
    import ast

    root = Path(__file__).resolve().parent.parent
    bare = []
    for pkg in ("edge", "ingest", "compute", "ops"):
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name not in {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}:
                    continue
                spread = [k.value for k in node.keywords if k.arg is None]
                if not any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "client_kwargs"
                           for v in spread):
                    bare.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert not bare, bare
