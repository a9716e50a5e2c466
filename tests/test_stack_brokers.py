"""The brokers themselves: Apache Kafka 4 answers every call aiokafka makes for us (idempotent
producer, consumer groups, commits, topic creation), Mosquitto's config keeps every QoS 1 message
for persistent sessions, and the process helpers can crash and restart them."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ops import stack
from ops.procs import ManagedProcess, PortState, free_port, pid_alive, port_open, probe_kafka, probe_mqtt

# --- Kafka ---------------------------------------------------------------------------------------


def test_kafka_round_trip_with_consumer_group_commit(kafka: ManagedProcess) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = f"{kafka.host}:{kafka.port}"
    topic, group = f"rt-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"

    async def consume(expected: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group,
            auto_offset_reset="earliest", enable_auto_commit=False,
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + 20
            while len(got) < expected and time.monotonic() < deadline:
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    got += [m.value for m in msgs if m.value is not None]
            # and nothing beyond what was expected
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got += [m.value for m in msgs if m.value is not None]
            await consumer.commit()
            committed = [await consumer.committed(TopicPartition(topic, p)) for p in range(2)]
            assert sum(c or 0 for c in committed) >= len(got)
        finally:
            await consumer.stop()
        return got

    async def produce(values: list[bytes]) -> None:
        # What the bridge runs: the idempotent producer with acks=all (Kafka 4 enables it by default).
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            for i, v in enumerate(values):
                await producer.send_and_wait(topic, v, key=f"site-{i % 5}".encode())
        finally:
            await producer.stop()

    async def scenario() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 2, 1)])
            assert topic in await admin.list_topics()
        finally:
            await admin.close()

        first = [f"a{i}".encode() for i in range(30)]
        await produce(first)
        assert sorted(await consume(30)) == sorted(first)
        # the group's committed offsets hold: a new member only sees what came after
        second = [f"b{i}".encode() for i in range(10)]
        await produce(second)
        assert sorted(await consume(10)) == sorted(second)

    asyncio.run(scenario())


def test_ensure_topics_is_idempotent(settings) -> None:  # type: ignore[no-untyped-def]
    kafka = settings.kafka.model_copy(update={
        "readings_topic": f"r-{uuid.uuid4().hex[:6]}",
        "dlq_topic": f"d-{uuid.uuid4().hex[:6]}",
        "committed_topic": f"c-{uuid.uuid4().hex[:6]}",
    })
    assert len(stack.ensure_topics(kafka)) == 3
    assert stack.ensure_topics(kafka) == []


def test_probes_tell_brokers_apart(mosquitto: ManagedProcess, kafka: ManagedProcess) -> None:
    assert probe_mqtt(mosquitto.host, mosquitto.port) is PortState.SPEAKS
    assert probe_kafka(kafka.host, kafka.port) is PortState.SPEAKS
    assert probe_mqtt(kafka.host, kafka.port) is not PortState.SPEAKS
    assert probe_kafka(mosquitto.host, mosquitto.port) is not PortState.SPEAKS
    assert probe_mqtt("127.0.0.1", free_port()) is PortState.CLOSED


# --- Mosquitto -----------------------------------------------------------------------------------


def test_rendered_config_has_queue_limits_persistence_and_log(tmp_path: Path) -> None:
    conf = stack.render_mosquitto_conf("127.0.0.1", 12345, tmp_path, extra_conf="max_packet_size 1000000")
    lines = {ln.split(None, 1)[0]: ln.split(None, 1)[1] for ln in conf.splitlines()
             if ln.strip() and not ln.startswith("#") and " " in ln}
    assert lines["listener"] == "12345 127.0.0.1"
    assert lines["max_queued_messages"] == "0"  # 0 = unbounded: no drop for offline sessions
    assert lines["max_queued_bytes"] == "0"
    assert int(lines["max_inflight_messages"]) > 0
    assert lines["persistence"] == "true"
    assert lines["persistence_location"].startswith(str(tmp_path.resolve()))
    assert lines["log_dest"] == f"file {tmp_path.resolve() / 'mosquitto.log'}"
    assert lines["max_packet_size"] == "1000000"
    assert "$" not in conf


class _Subscriber:
    """A persistent-session (clean_session=False) QoS 1 subscriber, as the ingest bridge is."""

    def __init__(self, port: int, client_id: str, topic: str) -> None:
        self.got: list[bytes] = []
        self.connected = threading.Event()
        self.session_present = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.got.append(bytes(msg.payload))
        self.topic = topic
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, client, _userdata, flags, _rc, _props):  # type: ignore[no-untyped-def]
        self.session_present = flags.session_present
        client.subscribe(self.topic, qos=1)
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(port: int, topic: str, n: int) -> None:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish(topic, f"m{i}".encode(), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    pub.disconnect()
    pub.loop_stop()


def test_offline_persistent_session_keeps_every_message_across_restart(tmp_path: Path) -> None:
    """More than Mosquitto's default queue (1000) published while the subscriber is offline, then
    a graceful broker restart: the subscriber still receives every message."""
    port, n = free_port(), 2500
    topic = "scopemeter/v1/acme/site/gw/readings"
    broker = stack.start_mosquitto(port, tmp_path)
    try:
        sub = _Subscriber(port, "bridge-under-test", topic)
        time.sleep(0.2)  # SUBACK
        sub.close()
        _publish(port, topic, n)
        broker.stop()
        assert (tmp_path / "mosquitto" / "mosquitto.db").exists()
        broker = stack.start_mosquitto(port, tmp_path)
        sub = _Subscriber(port, "bridge-under-test", topic)
        assert sub.session_present
        deadline = time.monotonic() + 30
        while len(set(sub.got)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        sub.close()
        assert len(set(sub.got)) == n
    finally:
        broker.stop()


def test_kill_is_a_crash_and_restart_keeps_the_log(tmp_path: Path) -> None:
    """kill -9 of Kafka, then a start on the same directory: the records acked before the crash are
    still there (the log directory is on disk in the state dir, not in memory)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from ops.kafka_broker import start_kafka

    port, cport = free_port(), free_port()
    broker = start_kafka(port, tmp_path, controller_port=cport)
    assert broker.log_path == tmp_path.resolve() / "kafka.log"
    bootstrap, topic = f"127.0.0.1:{port}", f"k-{uuid.uuid4().hex[:8]}"

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait(topic, f"r{i}".encode())
        finally:
            await producer.stop()

    async def consume() -> list[bytes]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + 30
            while len(got) < 20 and time.monotonic() < deadline:
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    got += [m.value for m in msgs if m.value is not None]
        finally:
            await consumer.stop()
        return got

    try:
        asyncio.run(produce())
        pid = broker.pid
        broker.kill()
        assert not pid_alive(pid)
        assert not port_open("127.0.0.1", port)
        assert not (tmp_path / "kafka.pid").exists()
        broker = start_kafka(port, tmp_path, controller_port=cport)
        assert broker.pid != pid and probe_kafka("127.0.0.1", port) is PortState.SPEAKS
        assert sorted(asyncio.run(consume())) == sorted(f"r{i}".encode() for i in range(20))
    finally:
        broker.stop(30.0)


def test_multi_line_extra_config_starts_a_broker_with_every_line(tmp_path: Path) -> None:
    """TLS listeners and ACLs arrive as several lines of extra config: each must land once, as
    configuration (a placeholder inside a comment once swallowed all but the first line)."""
    second = free_port()
    extra = f"listener {second} 127.0.0.1\nallow_anonymous true"
    assert stack.render_mosquitto_conf("127.0.0.1", 1, tmp_path, extra).count(f"listener {second}") == 1
    proc = stack.start_mosquitto(free_port(), tmp_path, extra_conf=extra)
    try:
        assert probe_mqtt("127.0.0.1", second) is PortState.SPEAKS
    finally:
        proc.stop()
