"""The bridge's two acknowledgement guarantees (ingest/bridge.py docstring), against a real Mosquitto
and a real PostgreSQL registry:

- a message is PUBACKed only after Kafka acknowledged its record: until then Mosquitto keeps it and
  redelivers it to the bridge's session;
- a PUBACK is sent only on the MQTT connection that delivered the message: after a reconnect, a late
  Kafka ack of a message received on the old connection acknowledges nothing.

Kafka is a stand-in whose acks the test releases one by one: a real broker cannot be made to hold a
given record's ack and then give it at a chosen moment. The bridge's producer is the only fake.

Whether Mosquitto still holds a message is observed by reconnecting as the bridge's persistent session
(without acking): messages still in flight are redelivered first, in order, before a marker batch the
test published after them. So every check waits for a delivery that must come; none waits for one
that must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.wire import Batch, readings_topic
from ingest.bridge import AckGate, Incoming, run_bridge
from ingest.registry import register_gateway
from ops.procs import ManagedProcess
from ops.settings import DbSettings, MqttSettings, Settings, StackSettings
from tests.helpers import make_batch

WAIT = 30.0  # seconds any single expected event may take before the test fails


class HeldKafka:
    """Stand-in for ``AIOKafkaProducer``: every send is recorded and acked only when the test says."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, asyncio.Future[object]]] = []
        self.keys: list[bytes | None] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def flush(self) -> None: ...

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: object = None) -> asyncio.Future[object]:  # fmt: skip
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, value, fut))
        self.keys.append(key)
        return fut

    def of(self, payload: bytes) -> list[asyncio.Future[object]]:
        return [fut for _topic, value, fut in self.sent if value == payload]


class Lane:
    def __init__(self, settings: Settings, tag: str) -> None:
        self.settings, self.tag = settings, tag
        self.supplier, self.site, self.gateway = f"sup-{tag}", f"site-{tag}", f"gw-{tag}"
        self.bridge_id = f"bridge-{tag}"
        self.topic = readings_topic(self.supplier, self.site, self.gateway)

    def batch(self, seq: int) -> bytes:
        start = datetime.now(UTC) - timedelta(hours=1)
        b: Batch = make_batch(seq, supplier=self.supplier, site=self.site, gateway=self.gateway,
                              start=start, meter_prefix=f"m{self.tag}-")  # fmt: skip
        return b.encode()


@pytest.fixture
def lane(mosquitto: ManagedProcess, pg_db: str, tmp_path: Path) -> Iterator[Lane]:
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, share_group=f"g{tag}"),
        db=DbSettings(dsn=pg_db),
        stack=StackSettings(state_dir=tmp_path),
    )
    lane = Lane(settings, tag)
    with psycopg.connect(pg_db, autocommit=True) as conn:
        register_gateway(conn, lane.supplier, lane.site, lane.gateway, [f"m{tag}-{i}" for i in range(2)])
    yield lane
    client = _client(lane, lane.bridge_id, clean=True)  # discard the bridge's session
    client.disconnect()
    client.loop_stop()


def _client(lane: Lane, client_id: str, *, clean: bool, manual_ack: bool = False,
            on_message: Callable[[mqtt.MQTTMessage], None] | None = None) -> mqtt.Client:  # fmt: skip
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                         manual_ack=manual_ack)  # fmt: skip
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    if on_message is not None:
        client.on_message = lambda _c, _u, msg: on_message(msg)
    client.connect(lane.settings.mqtt.host, lane.settings.mqtt.port, keepalive=30)
    client.loop_start()
    assert connected.wait(WAIT), f"MQTT client {client_id} got no CONNACK"
    return client


def publish(lane: Lane, payload: bytes) -> None:
    client = _client(lane, f"edge-{uuid.uuid4().hex[:8]}", clean=True)
    try:
        info = client.publish(lane.topic, payload, qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published(), "Mosquitto did not PUBACK the edge's batch"
    finally:
        client.disconnect()
        client.loop_stop()


def first_redelivery(lane: Lane) -> bytes:
    """Connect as the bridge's session, take the first message of the lane's topic without acking
    it (so Mosquitto keeps it), and leave."""
    got: queue.Queue[bytes] = queue.Queue()
    client = _client(lane, lane.bridge_id, clean=False, manual_ack=True,
                     on_message=lambda m: got.put(bytes(m.payload)) if m.topic == lane.topic else None)
    try:
        return got.get(timeout=WAIT)
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.asynccontextmanager
async def running_bridge(lane: Lane, kafka: HeldKafka) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_bridge(lane.settings, stop, client_id=lane.bridge_id, on_ready=ready.set,
                                          producer=kafka))  # type: ignore[arg-type]  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), WAIT)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def until(what: str, check: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_puback_only_after_the_kafka_ack(lane: Lane) -> None:
    first, marker = lane.batch(0), lane.batch(1)

    async def scenario() -> None:
        # 1. Kafka never acks: the bridge must not PUBACK, so Mosquitto still holds the batch.
        kafka = HeldKafka()
        async with running_bridge(lane, kafka):
            await asyncio.to_thread(publish, lane, first)
            await until("the batch reaches Kafka", lambda: bool(kafka.of(first)))
        assert await asyncio.to_thread(first_redelivery, lane) == first
        # 2. Kafka acks the redelivered batch: now the bridge PUBACKs it and Mosquitto drops it.
        kafka = HeldKafka()
        async with running_bridge(lane, kafka):
            await until("the redelivered batch reaches Kafka", lambda: bool(kafka.of(first)))
            for fut in kafka.of(first):
                fut.set_result(None)
            await asyncio.to_thread(publish, lane, marker)  # held: stays in flight
            await until("the marker reaches Kafka", lambda: bool(kafka.of(marker)))
        assert await asyncio.to_thread(first_redelivery, lane) == marker

    asyncio.run(scenario())


def test_a_failed_kafka_send_is_not_acked_and_stops_the_bridge(lane: Lane) -> None:
    payload = lane.batch(0)

    async def scenario() -> None:
        kafka = HeldKafka()
        with pytest.raises(RuntimeError, match="Kafka refused a record"):
            async with running_bridge(lane, kafka):
                await asyncio.to_thread(publish, lane, payload)
                await until("the batch reaches Kafka", lambda: bool(kafka.of(payload)))
                kafka.of(payload)[0].set_exception(OSError("broker gone"))
                await asyncio.sleep(1.0)  # the loop notices the failure within one inbox poll
        assert await asyncio.to_thread(first_redelivery, lane) == payload

    asyncio.run(scenario())


def test_puback_only_on_the_delivering_connection(lane: Lane) -> None:
    held, marker = lane.batch(0), lane.batch(1)

    async def scenario() -> None:
        kafka = HeldKafka()
        async with running_bridge(lane, kafka):
            await asyncio.to_thread(publish, lane, held)
            await until("the batch reaches Kafka", lambda: len(kafka.of(held)) == 1)
            # Take the session over (Mosquitto disconnects the bridge) and leave without acking: the
            # bridge reconnects and Mosquitto redelivers the batch, on a new connection, same packet id.
            await asyncio.to_thread(first_redelivery, lane)
            await until("the redelivery reaches Kafka", lambda: len(kafka.of(held)) >= 2)
            kafka.of(held)[0].set_result(None)  # Kafka acks the copy from the old connection only
            await asyncio.to_thread(publish, lane, marker)
            await until("the marker reaches Kafka", lambda: bool(kafka.of(marker)))
        # The late ack acknowledged nothing: the batch is still Mosquitto's to redeliver.
        assert await asyncio.to_thread(first_redelivery, lane) == held

    asyncio.run(scenario())


def _item(connection: int, mid: int = 7, qos: int = 1) -> Incoming:
    return Incoming("t", b"", mid, qos, connection)


def test_ack_gate_acks_only_a_clean_kafka_ack_of_this_connections_qos1_message() -> None:
    gate = AckGate()
    assert gate.connected() == 1
    first = _item(1)
    gate.received(first)
    assert gate.in_flight == {(1, 7)}
    assert gate.settled(first, OSError("refused")) is False  # Kafka refused: no PUBACK
    assert gate.in_flight == set()  # settled either way
    assert gate.settled(_item(1), None) is True
    assert gate.settled(_item(1, qos=0), None) is False  # QoS 0 has no PUBACK
    assert gate.connected() == 2
    old = _item(1)
    gate.received(old)
    gate.received(_item(2))
    assert gate.settled(old, None) is False  # the old connection's packet id means nothing now
    assert gate.in_flight == {(2, 7)}
    assert gate.settled(_item(2), None) is True


def test_a_dead_letter_goes_to_the_dlq_topic_keyed_by_topic_counted_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ingest import bridge
    from ingest.dlq import DeadLetter, Reason
    from ops import metrics
    from ops.ratelog import RateLimitedLog

    log = RateLimitedLog(bridge.log)
    monkeypatch.setattr(bridge, "dlq_log", log)
    settings = Settings()
    topic = "scopemeter/v1/" + "t" * 300
    letter = DeadLetter.of(Reason.SCHEMA, "d" * 300, topic, b"{}")
    dlq = metrics.BRIDGE_MESSAGES.labels(outcome="dlq")
    schema = metrics.BRIDGE_DLQ.labels(reason="schema")
    before = dlq._value.get(), schema._value.get()

    async def scenario() -> None:
        kafka = HeldKafka()
        with caplog.at_level(logging.WARNING, logger=bridge.log.name):
            fut = await bridge._dead_letter(kafka, settings, letter)  # type: ignore[arg-type]
        assert kafka.sent == [(settings.kafka.dlq_topic, letter.encode(), fut)]
        assert kafka.keys == [letter.key()]

    asyncio.run(scenario())
    assert (dlq._value.get(), schema._value.get()) == (before[0] + 1, before[1] + 1)
    assert [r.getMessage() for r in caplog.records] == [f"DLQ schema: {'d' * 200} ({topic[:200]})"]
    assert list(log._windows) == ["schema"]  # rate-limited per reason


def test_the_kafka_producer_waits_for_all_replicas_and_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the bridge asks of its real producer (``acks=all``: the ack the PUBACK waits for means
    every in-sync replica has the record). Checked on the arguments, with the class replaced: the
    producer keeps them in private fields only."""
    from ingest import bridge

    made: list[dict[str, object]] = []
    monkeypatch.setattr(bridge, "AIOKafkaProducer", lambda **kw: made.append(kw))
    settings = Settings()
    bridge._new_producer(settings)
    (kw,) = made
    assert kw["acks"] == "all" and kw["enable_idempotence"] is True
    assert kw["bootstrap_servers"] == settings.kafka.bootstrap
    assert kw["max_request_size"] == settings.kafka.max_message_bytes
    assert kw["max_batch_size"] == 1024 * 1024 and kw["linger_ms"] == 5


def test_the_bridges_mqtt_client_keeps_the_pipe_full_and_reconnects_fast() -> None:
    """Acks are manual only where asked (the bridge); up to 1000 messages in flight while Kafka acks
    arrive; nothing queued in paho (Mosquitto keeps what is not delivered); reconnects within 1–5 s
    instead of paho's 120 s backoff. Private fields for the delays: paho has no getter for them."""
    from ingest.bridge import make_mqtt_client

    client = make_mqtt_client(Settings(), "bridge-config-check")
    assert client._manual_ack is False
    assert make_mqtt_client(Settings(), "bridge-config-check", manual_ack=True)._manual_ack is True
    assert (client.max_inflight_messages, client.max_queued_messages) == (1000, 0)
    assert (client._reconnect_min_delay, client._reconnect_max_delay) == (1, 5)
