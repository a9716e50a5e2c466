"""Chaos: kill -9 every piece of ingest under sustained load; the DB ends with exactly what was sent.

Real processes only: the bridge and the writer run as ``python -m ops.cli ingest bridge|writer``
under a small supervisor that restarts them when they exit (as systemd ``Restart=always`` does);
this test's own Mosquitto and Kafka are killed with SIGKILL and started again on the same port
and state directory. A load generator publishes as four gateways (QoS 1, persistent sessions;
paho re-sends every batch not PUBACKed after each reconnect, as the edge outbox does).

What "loses nothing" means for each kill:
- bridge: messages it had not acked after their Kafka ack are redelivered by Mosquitto.
- writer: offsets are committed after the DB commit; the restart replays the rest, the key dedups.
- Mosquitto: 2.0.11 does not restore *shared* subscriptions from its persistence file (shown by
  ``test_mosquitto_forgets_shared_subscriptions_on_restart``): batches published after a restart
  and before the bridge re-subscribes would be PUBACKed and dropped. The bridge here therefore uses
  a plain subscription (``ingest.shared_subscription = False``, right for a single bridge). Mosquitto
  also persists only every second (no write-ahead log), so what it PUBACKed in the last second
  and had not yet handed to the bridge can be lost by a kill -9. The bridge keeps up with this
  load, so Mosquitto hands each message on at once and the window is empty in practice; the kill
  happens while the load runs, and the exact final check would catch a loss.
- Kafka: killed with SIGKILL while the load runs and restarted on the same port and log directory.
  The bridge produces with the idempotent producer and ``acks=all`` and PUBACKs a batch only after
  Kafka acked it, so what Kafka had not acked is redelivered by Mosquitto; what it acked is in its log
  (a process crash keeps the page cache). The writer and the bridge reconnect on their own (or are
  restarted by the supervisor when they exit) and every reading lands exactly once.
  ``tests/test_chaos_kafka_cluster.py`` does the same to the partition leader of a 3-node cluster.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.loadgen import Fleet, LoadGenerator, forget_session
from ops.bench_ingest import lane_settings, scrape
from ops.kafka_broker import start_kafka
from ops.pipeline import settings_env
from ops.procs import ManagedProcess, free_port
from ops.settings import Settings
from ops.stack import ensure_topics, start_mosquitto
from tests.chaos_support import WAIT, Load, Supervised, db_count, db_rows, until


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[ManagedProcess, ManagedProcess, int, Path]]:
    """This test's own Mosquitto and Kafka (and Kafka's controller port, which a restart must reuse):
    the session's brokers are never killed."""
    mosquitto = start_mosquitto(free_port(), tmp_path / "mosquitto")
    controller = free_port()
    kafka = start_kafka(free_port(), tmp_path / "kafka", controller_port=controller)
    yield mosquitto, kafka, controller, tmp_path
    mosquitto.stop()
    kafka.stop(30.0)


def test_kill_9_of_every_ingest_piece_loses_and_duplicates_nothing(
    settings: Settings, brokers: tuple[ManagedProcess, ManagedProcess, int, Path]
) -> None:
    mosquitto, kafka, kafka_controller, tmp = brokers
    tag = f"chaos-{uuid.uuid4().hex[:8]}"
    s = lane_settings(settings, tag)
    s = s.model_copy(
        update={
            "ingest": s.ingest.model_copy(update={"shared_subscription": False}),
            "mqtt": s.mqtt.model_copy(update={"host": mosquitto.host, "port": mosquitto.port}),
            "kafka": s.kafka.model_copy(update={"bootstrap": f"{kafka.host}:{kafka.port}", "partitions": 2}),
        }
    )
    ensure_topics(s.kafka)
    env = settings_env(s)
    bridge_id = f"{tag}-bridge"
    writer_port = free_port()
    fleet = Fleet(tag.replace("-", ""), sites=4, meters=25)
    fleet.register(s.db.dsn)
    gen = LoadGenerator(s, fleet, steps=4, spacing=timedelta(seconds=1))
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    bridge = Supervised("bridge", ["ingest", "bridge", "--metrics-port", "0", "--client-id", bridge_id],
                        env, tmp)  # fmt: skip
    writer = Supervised("writer", ["ingest", "writer", "--metrics-port", str(writer_port)], env, tmp)
    load: Load | None = None
    restarted: list[ManagedProcess] = []
    try:
        bridge.proc.wait_event("bridge.ready", WAIT)  # its persistent session exists from here on
        gen.connect()
        load = Load(gen, base, pause=0.05)  # 4 × 100 readings per round: ~5-8k readings/s

        def settle(what: str) -> None:
            """Wait until everything published up to now is in the DB (the load keeps running)."""
            mark = load.published()
            try:
                until(f"{mark} rows after {what}", lambda: db_count(s.db.dsn, fleet.prefix) >= mark)
            except AssertionError as exc:
                have = {(m, t) for m, t, _v in db_rows(s.db.dsn, fleet.prefix)}
                lost = sorted({(m.split("-")[1], t) for m, t, _v in gen.expected() if (m, t) not in have})
                raise AssertionError(f"{exc}; {len(have)} in the DB; missing (site, ts): {lost[:8]}…"
                                     f" ({len(lost)}); bridge exits {bridge.exits}, writer exits"
                                     f" {writer.exits}; logs in {tmp}") from None

        settle("start")
        bridge.kill()
        settle("kill -9 of the bridge")
        writer.kill()
        settle("kill -9 of the writer")
        mosquitto.kill()
        time.sleep(0.5)
        restarted.append(start_mosquitto(mosquitto.port, tmp / "mosquitto"))
        settle("kill -9 of Mosquitto")

        # Kafka mid-flight: the load keeps publishing while the broker is dead and while it restarts.
        before_kafka = load.published()
        kafka.kill()
        time.sleep(1.0)
        during_outage = load.published()
        restarted.append(start_kafka(kafka.port, tmp / "kafka", controller_port=kafka_controller))
        settle("kill -9 of Kafka")

        bridge.kill()
        writer.kill()
        time.sleep(1.0)  # rounds published after the kill: only the new processes can write them
        settle("kill -9 of the bridge and the writer together")
        load.stop()
        assert gen.wait_acked(WAIT), "some batches never got a PUBACK"
        total = gen.total
        until(f"all {total} rows", lambda: db_count(s.db.dsn, fleet.prefix) >= total)
        until("writer consumer lag 0 on /metrics", lambda: _lag(writer_port, s) == 0)
        time.sleep(1.0)  # a late duplicate would show up as an extra row (the PK forbids it; values too)
        rows = db_rows(s.db.dsn, fleet.prefix)
        kills = {"bridge": bridge.kills, "writer": writer.kills}
    finally:
        if load is not None:
            load.stop()
        gen.close()
        bridge.stop()
        writer.stop()
        forget_session(s, bridge_id)
        for proc in restarted:
            proc.stop()

    expected = sorted(gen.expected())
    # readings were published before, during and after the Kafka outage
    assert 0 < before_kafka < during_outage < total
    assert len(rows) == len(expected) == total
    assert rows == expected  # every generated reading, once, with its exact value
    # Every kill hit a running process; the readings after the last kills were written by new ones.
    assert kills == {"bridge": [-9, -9], "writer": [-9, -9]}


def _lag(port: int, s: Settings) -> float:
    try:
        return sum(
            scrape(port, "scopemeter_kafka_consumer_lag", group=s.kafka.writer_group, partition=str(p))
            for p in range(s.kafka.partitions)
        )
    except OSError:
        return -1.0


def test_mosquitto_forgets_shared_subscriptions_on_restart(tmp_path: Path) -> None:
    """Why the chaos test's bridge subscribes without $share: a persistent session keeps its plain
    subscription across a broker restart but loses its shared one. When this starts failing, the
    broker was fixed and shared subscriptions are safe for the chaos test too."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    port = free_port()
    received: dict[str, list[bytes]] = {}
    for kind, topic_filter in (("shared", "$share/g/t/x"), ("plain", "t/x")):
        broker = start_mosquitto(port, tmp_path / kind)
        try:
            sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{kind}", clean_session=False)
            got: list[bytes] = []
            sub.on_message = lambda _c, _u, m, got=got: got.append(m.payload)
            subacked = threading.Event()
            sub.on_subscribe = lambda *_a, ev=subacked: ev.set()
            sub.connect(broker.host, port)
            sub.loop_start()
            sub.subscribe(topic_filter, qos=1)
            assert subacked.wait(10)
            sub.disconnect()
            sub.loop_stop()
            broker.stop()  # a clean stop writes the persistence file
            broker = start_mosquitto(port, tmp_path / kind)
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{kind}", clean_session=True)
            pub.connect(broker.host, port)
            pub.loop_start()
            pub.publish("t/x", kind.encode(), qos=1).wait_for_publish(10)
            pub.disconnect()
            pub.loop_stop()
            sub.reconnect()
            sub.loop_start()
            until(f"the {kind} session to be back", sub.is_connected, 10)
            time.sleep(1.0)  # a queued message is delivered right after the CONNACK
            sub.disconnect()
            sub.loop_stop()
            received[kind] = got
        finally:
            broker.stop()
    assert received == {"shared": [], "plain": [b"plain"]}
