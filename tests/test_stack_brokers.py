"""The brokers themselves: Tansu speaks enough Kafka for aiokafka, Mosquitto's config keeps every
QoS 1 message for persistent sessions, and the process helpers can crash and restart them."""

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

# --- Tansu ---------------------------------------------------------------------------------------


def test_tansu_round_trip_with_consumer_group_commit(tansu: ManagedProcess) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = f"{tansu.host}:{tansu.port}"
    topic, group = f"rt-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"

    async def consume(expected: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group,
            auto_offset_reset="earliest", enable_auto_commit=False,
            # Tansu lets a new member in only after the previous one's session expired (it does
            # not act on LeaveGroup at once), so short sessions keep this test quick.
            session_timeout_ms=3000, heartbeat_interval_ms=500, rebalance_timeout_ms=3000,
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
        # Tansu's idempotent producer does not work: never enable it.
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
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


def test_probes_tell_brokers_apart(mosquitto: ManagedProcess, tansu: ManagedProcess) -> None:
    assert probe_mqtt(mosquitto.host, mosquitto.port) is PortState.SPEAKS
    assert probe_kafka(tansu.host, tansu.port) is PortState.SPEAKS
    assert probe_mqtt(tansu.host, tansu.port) is not PortState.SPEAKS
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


def test_kill_is_a_crash_and_start_again_works(tmp_path: Path) -> None:
    port = free_port()
    broker = stack.start_tansu(port, tmp_path)
    assert broker.log_path == tmp_path.resolve() / "tansu.log"
    pid = broker.pid
    broker.kill()
    assert not pid_alive(pid)
    assert not port_open("127.0.0.1", port)
    assert not (tmp_path / "tansu.pid").exists()
    again = stack.start_tansu(port, tmp_path)
    try:
        assert again.pid != pid and probe_kafka("127.0.0.1", port) is PortState.SPEAKS
    finally:
        again.stop()


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
