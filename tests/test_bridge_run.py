"""The bridge's service loop (``ingest.bridge.run_bridge``) beyond its two ack guarantees
(tests/test_bridge_acks.py), against a real Mosquitto and a real PostgreSQL registry:

- health follows the MQTT session (up on CONNACK, down on a lost connection, up again after the
  reconnect) and the Kafka brokers;
- a Kafka send that fails or is cancelled ends the bridge with an error naming it, and the message
  stays un-acked;
- on stop, the producer is flushed and the acks that arrive in that flush are sent before the MQTT
  DISCONNECT, so those messages are not delivered again;
- without a client id the bridge's persistent session is ``scopemeter-bridge-<host name>``;
- without the fleet registry (the DB is away) the bridge never subscribes, and a stop ends it;
- without a producer given, the bridge builds one from the settings.

Kafka is ``HeldKafka`` (acks released by the test), as in tests/test_bridge_acks.py and for the same
reason, except in the last test, which uses a real client against an address with no broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from aiokafka.errors import KafkaConnectionError
from paho.mqtt.enums import CallbackAPIVersion
from psycopg.conninfo import make_conninfo

from edge.wire import READINGS_SUBSCRIPTION
from ingest.bridge import run_bridge, subscription
from ingest.db import drop_database, ensure_database, migrate
from ops import metrics
from ops.procs import ManagedProcess, free_port
from ops.settings import DbSettings, IngestSettings, KafkaSettings, MqttSettings, Settings
from ops.stack import start_mosquitto
from tests.test_bridge_acks import WAIT, HeldKafka, Lane, _client, first_redelivery, publish, until
from tests.test_bridge_acks import lane as lane  # the fixture, shared


class Brokers(HeldKafka):
    """``HeldKafka`` that notes its life cycle, answers the bridge's metadata requests (its health
    probe), and, like a real producer, has every record acknowledged once ``flush`` returns."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.client = self

    async def fetch_all_metadata(self) -> object:
        return {}

    async def start(self) -> None:
        self.calls.append("start")

    async def flush(self) -> None:
        self.calls.append("flush")
        for _topic, _value, fut in self.sent:
            if not fut.done():
                fut.set_result(None)

    async def stop(self) -> None:
        self.calls.append("stop")


class Witness(metrics.Health):
    """The bridge's health, with every change noted in order."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        super().__init__("mqtt", "kafka")

    def up(self, dependency: str) -> None:
        super().up(dependency)
        self.changes.append((dependency, "up"))

    def down(self, dependency: str, reason: str) -> None:
        super().down(dependency, reason)
        self.changes.append((dependency, reason))


def _start(
    lane: Lane, stop: asyncio.Event, ready: asyncio.Event, kafka: HeldKafka, **kw: Any
) -> asyncio.Task[None]:
    kw.setdefault("client_id", lane.bridge_id)
    return asyncio.create_task(run_bridge(lane.settings, stop, on_ready=ready.set, producer=kafka, **kw))


def _in_flight() -> float:
    return metrics.BRIDGE.get_sample_value("scopemeter_bridge_in_flight_messages") or 0.0


def test_health_follows_the_mqtt_session_through_a_reconnect(
    lane: Lane, caplog: pytest.LogCaptureFixture
) -> None:
    health = Witness()
    kafka = Brokers()

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = _start(lane, stop, ready, kafka, health=health)
        try:
            await asyncio.wait_for(ready.wait(), WAIT)
            await until("Kafka reported up", lambda: health.is_up("kafka"))
            assert health.report() == (True, {"mqtt": "ok", "kafka": "ok"})
            # Another client takes the session over: Mosquitto drops the bridge, which reconnects.
            taken = threading.Event()
            other = await asyncio.to_thread(_client, lane, lane.bridge_id, clean=False, manual_ack=True)
            other.on_disconnect = lambda *_a: taken.set()
            await until("the bridge dropped", lambda: any(d == "mqtt" and s.startswith("disconnected")
                                                          for d, s in health.changes))  # fmt: skip
            await until("the bridge back", lambda: health.changes[-1] == ("mqtt", "up") and len(
                [c for c in health.changes if c == ("mqtt", "up")]) >= 2)  # fmt: skip
            await asyncio.to_thread(taken.wait, WAIT)
            other.disconnect()
            other.loop_stop()
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)

    with caplog.at_level(logging.WARNING, logger="scopemeter.bridge"):
        asyncio.run(scenario())
    mqtt = [s for d, s in health.changes if d == "mqtt"]
    assert mqtt.pop(0) == "not connected yet"
    assert mqtt[0] == "up" and mqtt[1].startswith("disconnected: ") and mqtt[2] == "up"
    assert mqtt[-1].startswith("disconnected: ")  # after the stop
    # Said on the reconnect only, not on the first connection.
    assert caplog.messages.count("MQTT reconnected: un-acked messages will be redelivered") == 1
    assert kafka.calls == ["start", "flush", "stop"]


@pytest.mark.parametrize("outcome", ["error", "cancelled"])
def test_a_failed_or_cancelled_send_ends_the_bridge_naming_it(lane: Lane, outcome: str) -> None:
    payload = lane.batch(0)
    kafka = HeldKafka()

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = _start(lane, stop, ready, kafka)
        try:
            await asyncio.wait_for(ready.wait(), WAIT)
            await asyncio.to_thread(publish, lane, payload)
            await until("the batch reaches Kafka", lambda: bool(kafka.of(payload)))
            assert _in_flight() == 1
            (fut,) = kafka.of(payload)
            if outcome == "error":
                fut.set_exception(OSError("broker gone"))
            else:
                fut.cancel()
            with pytest.raises(RuntimeError) as err:
                await asyncio.wait_for(task, WAIT)
            want = "OSError('broker gone')" if outcome == "error" else "CancelledError()"
            assert str(err.value) == f"Kafka refused a record: {want}"
            assert _in_flight() == 0
        finally:
            stop.set()
            if not task.done():
                await asyncio.wait_for(task, WAIT)

    asyncio.run(scenario())
    assert asyncio.run(asyncio.to_thread(first_redelivery, lane)) == payload


def test_acks_that_arrive_in_the_final_flush_are_sent_before_disconnecting(lane: Lane) -> None:
    held, marker = lane.batch(0), lane.batch(1)
    kafka = Brokers()

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = _start(lane, stop, ready, kafka)
        try:
            await asyncio.wait_for(ready.wait(), WAIT)
            await asyncio.to_thread(publish, lane, held)
            await until("the batch reaches Kafka", lambda: bool(kafka.of(held)))
        finally:
            stop.set()  # Kafka acks the batch during the bridge's final flush
            await asyncio.wait_for(task, WAIT)
        await asyncio.to_thread(publish, lane, marker)  # queued for the bridge's session

    asyncio.run(scenario())
    # The batch was acked before the bridge left: Mosquitto's first delivery is the marker.
    assert asyncio.run(asyncio.to_thread(first_redelivery, lane)) == marker


def test_without_a_client_id_the_session_is_named_after_the_host(
    lane: Lane, mosquitto: ManagedProcess
) -> None:
    kafka = HeldKafka()
    default_id = f"scopemeter-bridge-{socket.gethostname()}"

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = _start(lane, stop, ready, kafka, client_id=None)
        try:
            await asyncio.wait_for(ready.wait(), WAIT)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)

    asyncio.run(scenario())
    present: list[bool] = []
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=default_id, clean_session=False)

    def on_connect(_c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, _rc: object, _p: object) -> None:
        present.append(flags.session_present)
        connected.set()

    client.on_connect = on_connect
    client.connect(lane.settings.mqtt.host, lane.settings.mqtt.port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(WAIT)
        assert present == [True]  # the bridge left its persistent session under that id
        # Mosquitto's log: the bridge connected first under that id, persistent (c0), with the settings'
        # keepalive (not paho's default 60 s).
        seen = re.findall(
            rf"as {re.escape(default_id)} \(p\d, c(\d), k(\d+)\)", mosquitto.log_path.read_text()
        )
        assert seen[0] == ("0", str(lane.settings.mqtt.keepalive)), seen
    finally:
        client.disconnect()
        client.loop_stop()
        _client(lane, default_id, clean=True).disconnect()  # discard it


def test_without_its_registry_the_bridge_never_subscribes_and_a_stop_ends_it() -> None:
    """The DB is away: the registry never loads, the bridge waits (it checks no batch without it),
    and returns when stopped, its producer stopped too."""
    settings = Settings(db=DbSettings(dsn="postgresql://nobody@127.0.0.1:1/none"),
                        mqtt=MqttSettings(port=free_port()))  # fmt: skip
    kafka = Brokers()
    ready: list[bool] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        stop.set()
        bridge = run_bridge(
            settings, stop, client_id="nobody", on_ready=lambda: ready.append(True), producer=kafka
        )
        await asyncio.wait_for(bridge, WAIT)

    asyncio.run(scenario())
    assert kafka.calls == ["start", "stop"] and ready == []


def test_without_a_producer_the_bridge_builds_one_from_the_settings() -> None:
    """No broker listens at the configured address: the producer the bridge built from the
    settings cannot start, and the bridge fails at once with Kafka's error."""
    port = free_port()
    settings = Settings(kafka=KafkaSettings(bootstrap=f"127.0.0.1:{port}"),
                        db=DbSettings(dsn="postgresql://nobody@127.0.0.1:1/none"))  # fmt: skip

    async def scenario() -> None:
        await asyncio.wait_for(run_bridge(settings, asyncio.Event(), client_id="nobody"), WAIT)

    with pytest.raises(KafkaConnectionError, match=f"Unable to bootstrap from .*'127.0.0.1', {port}"):
        asyncio.run(scenario())


def test_the_subscription_is_shared_unless_turned_off() -> None:
    shared = Settings(mqtt=MqttSettings(share_group=f"g{uuid.uuid4().hex[:6]}"))
    assert subscription(shared) == f"$share/{shared.mqtt.share_group}/{READINGS_SUBSCRIPTION}"
    alone = shared.model_copy(update={"ingest": IngestSettings(shared_subscription=False)})
    assert subscription(alone) == READINGS_SUBSCRIPTION


def test_a_broker_that_refuses_the_connection_keeps_the_bridge_from_ready_and_says_why(
    pg_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Mosquitto that refuses the bridge's login (anonymous login off): the bridge never reports
    ready, health says why, and the refusal is logged. (A refused subscription is not shown: the
    project's Mosquitto grants a v3.1.1 subscription its ACL denies, and delivers nothing.)"""
    broker = start_mosquitto(free_port(), tmp_path / "mosquitto", extra_conf="allow_anonymous false")
    settings = Settings(mqtt=MqttSettings(host=broker.host, port=broker.port), db=DbSettings(dsn=pg_db))
    health = Witness()
    ready: list[bool] = []
    want = "MQTT connect refused: Not authorized"

    async def scenario() -> None:
        bridge = run_bridge(
            settings,
            asyncio.Event(),
            client_id=f"b-{uuid.uuid4().hex[:8]}",
            on_ready=lambda: ready.append(True),
            health=health,
            producer=Brokers(),
        )
        task = asyncio.create_task(bridge)
        try:
            await until("the refusal logged", lambda: want in caplog.messages)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        with caplog.at_level(logging.WARNING, logger="scopemeter.bridge"):
            asyncio.run(scenario())
    finally:
        broker.stop()
    assert ready == []
    assert ("mqtt", "connect refused: Not authorized") in health.changes
    assert ("mqtt", "up") not in health.changes


def test_the_bridge_waits_for_a_database_that_comes_up_later(
    mosquitto: ManagedProcess, pg_admin_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The DB is not there when the bridge starts (here: its database does not exist yet, as before
    ``scopemeter db migrate``): the bridge keeps asking, and subscribes once the registry loads."""
    name = f"scopemeter_late_{uuid.uuid4().hex[:8]}"
    dsn = make_conninfo(pg_admin_dsn, dbname=name)
    settings = Settings(mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port), db=DbSettings(dsn=dsn))
    kafka = Brokers()

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            run_bridge(settings, stop, client_id=f"late-{name}", on_ready=ready.set, producer=kafka)
        )
        try:
            await until("a refused registry read", lambda: any("not refreshed" in m for m in caplog.messages))
            assert not ready.is_set()
            await asyncio.to_thread(ensure_database, dsn, pg_admin_dsn)
            await asyncio.to_thread(migrate, dsn)
            await asyncio.wait_for(ready.wait(), WAIT)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)

    try:
        with caplog.at_level(logging.WARNING, logger="scopemeter.registry"):
            asyncio.run(scenario())
    finally:
        drop_database(name, pg_admin_dsn)
        _close_session(mosquitto, f"late-{name}")
    assert kafka.calls == ["start", "flush", "stop"]


def _close_session(mosquitto: ManagedProcess, client_id: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect(mosquitto.host, mosquitto.port, keepalive=30)
    client.loop_start()
    client.disconnect()
    client.loop_stop()
