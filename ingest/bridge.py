"""MQTT → Kafka bridge.

Each MQTT message (QoS 1, shared subscription, persistent session) is validated, then produced to
``readings.v1`` (key = site) or to the DLQ. The MQTT PUBACK is sent only after Kafka acknowledged
the record (paho manual ack), so a crash at any point leaves the message with Mosquitto, which
redelivers it: nothing accepted is ever lost, and a redelivered duplicate is dropped by the DB key.

Every batch is checked against the fleet registry (``ingest.registry``): its topic's supplier, site
and gateway and each reading's meter must be registered together, else the batch goes to the DLQ.
The bridge becomes ready only once it holds the registry; a DB outage later keeps the last one.
Nothing a client sends can stop it: ``classify`` is total, and a dead letter is bounded in size.

Two loss holes are closed on purpose:
- A Kafka send that fails ends the process with an error (exit code 1): the supervisor restarts it
  and Mosquitto redelivers every message the dead process had not acked. Retrying in-process
  would need the same bookkeeping Mosquitto already does.
- A PUBACK is sent only on the MQTT connection the message arrived on. After a reconnect the broker
  redelivers un-acked messages and may reuse their packet ids for *other* messages (a broker
  restored from an older autosave certainly does), so a late ack of an old id could acknowledge a
  message that never reached Kafka. Old-connection acks are dropped; the redelivery is produced
  again and deduplicated by the DB key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from paho.mqtt.reasoncodes import ReasonCode

from edge.mqtt_client import new_client
from edge.wire import READINGS_SUBSCRIPTION
from ingest.dlq import DeadLetter, Reason
from ingest.registry import RegistryCache
from ingest.validate import Accepted, classify
from ops import metrics
from ops.kafka_client import client_kwargs, watch_broker
from ops.ratelog import RateLimitedLog
from ops.settings import Settings

log = logging.getLogger("scopemeter.bridge")
dlq_log = RateLimitedLog(log)


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which MQTT connection delivered it: its ack is valid only there


class AckGate:
    """Decides which MQTT messages the bridge may PUBACK: only once Kafka acknowledged the record
    without error, only QoS > 0, and only on the MQTT connection that delivered the message (a
    reconnect makes older packet ids meaningless; see the module docstring).

    ``connection`` is bumped by the paho thread on every CONNACK and read by the event loop; an
    int swap is atomic."""

    def __init__(self) -> None:
        self.connection = 0
        self.in_flight: set[tuple[int, int]] = set()  # (connection, mid) received and not yet settled

    def connected(self) -> int:
        """A new MQTT connection (CONNACK): acks of every earlier one are void from now on."""
        self.connection += 1
        return self.connection

    def received(self, item: Incoming) -> None:
        self.in_flight.add((item.connection, item.mid))

    def settled(self, item: Incoming, error: BaseException | None) -> bool:
        """Kafka answered for ``item``: True when its PUBACK must be sent now."""
        self.in_flight.discard((item.connection, item.mid))
        return error is None and item.qos > 0 and item.connection == self.connection


def make_mqtt_client(settings: Settings, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """A paho client configured from settings (credentials, TLS); the caller connects it."""
    client = new_client(settings.mqtt, client_id, manual_ack=manual_ack)
    # Many in-flight messages keep the pipe full while Kafka acks arrive.
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    # paho's default backs off to 120 s: a restarted broker would wait minutes for its clients.
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    return client


def subscription(settings: Settings) -> str:
    """The bridge's topic filter: shared (scale-out) unless ``ingest.shared_subscription`` is off."""
    if settings.ingest.shared_subscription:
        return f"$share/{settings.mqtt.share_group}/{READINGS_SUBSCRIPTION}"
    return READINGS_SUBSCRIPTION


async def run_bridge(
    settings: Settings,
    stop: asyncio.Event,
    client_id: str | None = None,
    on_ready: Callable[[], None] | None = None,
    health: metrics.Health | None = None,
    *,
    producer: AIOKafkaProducer | None = None,
) -> None:
    """Run until ``stop`` is set; raises if Kafka refuses a record (un-acked messages stay in MQTT).

    ``on_ready`` is called once the shared subscription is in place: from then on no batch is missed.
    ``health`` follows the MQTT session and the Kafka brokers. ``producer`` (tests) replaces the
    Kafka producer built from ``settings``.
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    # A stable id keeps the persistent session (and its un-acked messages) across restarts.
    client_id = client_id or f"scopemeter-bridge-{socket.gethostname()}"
    producer = producer or _new_producer(settings)
    await producer.start()
    registry = RegistryCache(settings.db.dsn, settings.ingest.registry_refresh_s)
    registry.refresh(soon=True)
    while not registry.loaded():  # no batch is checked without it; the DB may be starting
        if stop.is_set():
            await producer.stop()
            return
        await asyncio.sleep(1.0)
        registry.refresh(soon=True)
    watch = asyncio.create_task(watch_broker(producer.client.fetch_all_metadata, health)) if health else None
    subscribed = asyncio.Event()
    gate = AckGate()

    def on_connect(client: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.error("MQTT connect refused: %s", rc)
            if health is not None:
                health.down("mqtt", f"connect refused: {rc}")
            return
        if health is not None:
            health.up("mqtt")
        if gate.connected() > 1:
            log.warning("MQTT reconnected: un-acked messages will be redelivered")
        client.subscribe(subscription(settings), qos=1)

    def on_subscribe(_c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object) -> None:
        if any(code.is_failure for code in codes):
            log.error("MQTT subscription refused: %s", codes)
            return
        loop.call_soon_threadsafe(subscribed.set)  # SUBACK: from here on nothing is missed

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        item = Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos, gate.connection)
        loop.call_soon_threadsafe(inbox.put_nowait, item)

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if health is not None:
            health.down("mqtt", f"disconnected: {rc}")

    client = make_mqtt_client(settings, client_id, manual_ack=True)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect_async(settings.mqtt.host, settings.mqtt.port, keepalive=settings.mqtt.keepalive)
    client.loop_start()
    failure: list[BaseException] = []
    unsettled: set[asyncio.Future[object]] = set()  # records Kafka has not answered for yet

    def acked(item: Incoming, fut: asyncio.Future[object]) -> None:
        unsettled.discard(fut)
        # fut.exception() itself raises on a cancelled future, so cancellation is asked first.
        error = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if gate.settled(item, error):
            client.ack(item.mid, item.qos)
        metrics.BRIDGE_IN_FLIGHT.set(len(gate.in_flight))
        if error is not None:
            failure.append(error)  # not acked: Mosquitto redelivers after the restart

    try:
        await asyncio.wait_for(subscribed.wait(), timeout=30)
        log.info("bridge %s subscribed", client_id)
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            if failure:
                raise RuntimeError(f"Kafka refused a record: {failure[0]!r}")
            registry.refresh()
            try:
                item = await asyncio.wait_for(inbox.get(), timeout=0.2)
            except TimeoutError:
                dlq_log.flush()
                continue
            gate.received(item)
            metrics.BRIDGE_IN_FLIGHT.set(len(gate.in_flight))
            fut = await _produce(producer, settings, item, registry)
            unsettled.add(fut)
            fut.add_done_callback(functools.partial(acked, item))
        await producer.flush()
        # A record's answer reaches ``acked`` a few loop turns after the flush (through the task
        # that watches for a too-large refusal): wait for it, so its PUBACK goes before DISCONNECT.
        # Bounded: an answer that comes later only means Mosquitto redelivers that message.
        if unsettled:
            await asyncio.wait(unsettled, timeout=_SETTLE_S)
    finally:
        if watch is not None:
            watch.cancel()
        client.disconnect()
        client.loop_stop()
        await producer.stop()
        registry.close()


def _new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_kwargs(settings.kafka),
        acks="all",
        # Idempotent: a retry after a lost ack is written once per partition, in order (Kafka dedups by
        # producer id and sequence); the DB key still dedups a redelivery from MQTT.
        enable_idempotence=True,
        linger_ms=5,
        # Batches are ~100 kB: the 16 kB default would send each in its own request.
        max_batch_size=1024 * 1024,
        max_request_size=settings.kafka.max_message_bytes,
    )


async def _produce(
    producer: AIOKafkaProducer, settings: Settings, item: Incoming, registry: RegistryCache
) -> asyncio.Future[object]:
    now = settings.clock.now()
    check = functools.partial(classify, item.topic, item.payload, now=now, limits=settings.ingest)
    decided = check(registry=registry.registry)
    if isinstance(decided, DeadLetter) and decided.reason in _REGISTRY_REASONS:
        # Perhaps the fleet changed a moment ago: look once more (at most once a second) first.
        held = registry.registry
        if registry.refresh(soon=True) is not held:
            decided = check(registry=registry.registry)
    if isinstance(decided, Accepted):
        metrics.BRIDGE_MESSAGES.labels(outcome="accepted").inc()
        metrics.BRIDGE_READINGS.inc(decided.readings)
        metrics.GATEWAY_LAST_SEEN.labels(site=decided.site, gateway=decided.gateway).set_to_current_time()
        try:
            sent = await producer.send(
                settings.kafka.readings_topic,
                value=item.payload,  # validated; forwarded as received (a re-encode costs ~20 % CPU)
                key=decided.site.encode(),
                headers=[("gateway", decided.gateway.encode()), ("seq", str(decided.seq).encode())],
            )
        except MessageSizeTooLargeError as exc:  # above the producer's own max_request_size
            return await _dead_letter(producer, settings, _refused_by_kafka(item, exc))
        return asyncio.ensure_future(_letter_if_refused_as_too_large(producer, settings, item, sent))
    return await _dead_letter(producer, settings, decided)


async def _dead_letter(
    producer: AIOKafkaProducer, settings: Settings, letter: DeadLetter
) -> asyncio.Future[object]:
    metrics.BRIDGE_MESSAGES.labels(outcome="dlq").inc()
    metrics.BRIDGE_DLQ.labels(reason=letter.reason.value).inc()
    dlq_log.warning(letter.reason.value, "DLQ %s: %s (%s)", letter.reason.value, letter.detail[:200],
                    letter.topic[:200])  # fmt: skip
    return await producer.send(  # type: ignore[no-any-return]
        settings.kafka.dlq_topic, value=letter.encode(), key=letter.key()
    )


def _refused_by_kafka(item: Incoming, exc: BaseException) -> DeadLetter:
    return DeadLetter.of(Reason.TOO_LARGE, f"Kafka refused the record: {exc!r}", item.topic, item.payload)


async def _letter_if_refused_as_too_large(
    producer: AIOKafkaProducer, settings: Settings, item: Incoming, sent: asyncio.Future[object]
) -> object:
    """The readings record's ack; when the broker refuses it as too large (an Apache Kafka topic keeps
    the 1 MB default ``max.message.bytes``), a bounded dead letter's ack instead: such a batch would
    otherwise fail on every redelivery and stop the bridge for good."""
    try:
        return await sent
    except (RecordTooLargeError, MessageSizeTooLargeError) as exc:
        return await (await _dead_letter(producer, settings, _refused_by_kafka(item, exc)))


# How long a stopping bridge waits, after its producer's flush, for the answers to reach ``acked``.
_SETTLE_S = 1.0

_REGISTRY_REASONS = frozenset(
    {Reason.UNREGISTERED_GATEWAY, Reason.UNREGISTERED_METER, Reason.METER_SITE_MISMATCH}
)
