"""The writer and the compute worker outlive PostgreSQL: they start while a private cluster (initdb
in a temp dir, its own port; the machine's PostgreSQL is never touched) refuses connections, and
it is later stopped while readings keep arriving in Kafka and started again. Both processes (the
real ``scopemeter`` commands) stay up, say so on /healthz (503 with the reason while the DB is
away, 200 after), commit no Kafka offset while nothing reaches the DB, and the DB ends with
exactly the readings produced."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.rebuild import recompute_all
from edge.wire import Batch, Quantity, Reading
from ingest.db import ensure_database, migrate
from ingest.events import DirtyRange
from ops.kafka_client import client_kwargs
from ops.procs import free_port
from ops.settings import KafkaSettings, Settings
from ops.stack import ensure_topics_async
from tests.test_compute_support import snapshot

REPO = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
T0 = datetime(2026, 11, 4, 0, 0, tzinfo=UTC)
METERS = ("sz1-smt-line-1", "sz1-hvac")
WAIT = 90.0
V = TypeVar("V")


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on ``port``; run as the postgres user when we are root."""

    def __init__(self, port: int) -> None:
        self.port = port
        # Not under pytest's tmp dir: the postgres user cannot enter root's 0700 directories.
        self.base = Path(tempfile.mkdtemp(prefix="scopemeter-pg-"))
        self.data, self.log = self.base / "data", self.base / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self._cmd(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "scopemeter", "--no-sync")

    def _cmd(self, *argv: object) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        r = subprocess.run([*prefix, *map(str, argv)], capture_output=True, text=True)
        assert r.returncode == 0, f"{argv[0]}: {r.stdout}{r.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._cmd(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start")

    def stop(self) -> None:
        self._cmd(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def dsn(self, dbname: str) -> str:
        return f"postgresql://scopemeter@127.0.0.1:{self.port}/{dbname}"

    def remove(self) -> None:
        subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(free_port())
    try:
        pg.start()
        yield pg
    finally:
        if os.geteuid() == 0:
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(pg.data),
                            "-m", "immediate", "stop"], capture_output=True)  # fmt: skip
        pg.remove()


class Service:
    """One ``scopemeter`` command as a child process, its stderr in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.port = free_port()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args, "--metrics-port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=self._log, env=env,
        )  # fmt: skip

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz; (0, {}) while it does not answer yet."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def _until(what: str, probe: Callable[[], V], ok: Callable[[V], bool], services: list[Service]) -> V:
    deadline = time.monotonic() + WAIT
    while True:
        value = probe()
        if ok(value):
            return value
        for s in services:
            tail = s.log_path.read_text()[-3000:]
            assert s.alive(), f"{s.log_path.stem} exited ({s.popen.returncode}): {tail}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last seen {value!r}")
        time.sleep(0.2)


def _batch(seq: int) -> Batch:
    """One minute of both meters' energy counters (60 kW and 30 kW), as a gateway sends it."""
    readings = []
    for i in range(3):
        ts = T0 + timedelta(minutes=seq * 3 + i)
        hours = (ts - T0).total_seconds() / 3600
        for meter, kw in zip(METERS, (60.0, 30.0), strict=True):
            readings.append(
                Reading(meter_id=meter, quantity=Quantity.ENERGY_IMPORT_KWH, ts=ts, value=1000 + kw * hours)
            )
    return Batch(supplier="acme-electronics", site="sz-plant-1", gateway="gw-sz1-01", seq=seq, sent_at=T0,
                 readings=readings)  # fmt: skip


def _identities(batches: list[Batch]) -> set[tuple[str, str, datetime]]:
    return {(r.meter_id, r.quantity.value, r.ts) for b in batches for r in b.readings}


async def _produce(kafka: KafkaSettings, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(acks="all", **client_kwargs(kafka))
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"sz-plant-1")
    finally:
        await producer.stop()


async def _committed(kafka: KafkaSettings, group: str, topic: str) -> int:
    """The group's committed offsets summed over the topic's partitions."""
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **client_kwargs(kafka))
    await consumer.start()
    try:
        return sum([await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(kafka.partitions)])
    finally:
        await consumer.stop()


def _db_identities(dsn: str) -> list[tuple[str, str, datetime]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT meter_id, quantity, ts FROM readings").fetchall()
    return [(m, q, ts) for m, q, ts in rows]


def test_writer_and_compute_outlive_a_postgresql_restart(
    settings: Settings, private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    dsn = private_pg.dsn("scopemeter")
    ensure_database(dsn, private_pg.dsn("postgres"))
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        apply_fleet(conn, REPO / "config" / "fleet.toml")
        apply_factors(conn, REPO / "config" / "factors.toml")

    tag = uuid.uuid4().hex[:8]
    names = {"readings_topic": "readings", "dlq_topic": "dlq", "committed_topic": "committed",
             "writer_group": "writer", "compute_group": "compute"}  # fmt: skip
    kafka = settings.kafka.model_copy(update={k: f"{v}-{tag}" for k, v in names.items()} | {"partitions": 2})
    asyncio.run(ensure_topics_async(kafka))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEMETER_")}
    env.update({
        "SCOPEMETER_KAFKA": kafka.model_dump_json(),
        "SCOPEMETER_DB__DSN": dsn,
        "SCOPEMETER_DB__RECONNECT_MAX_S": "1",
        "SCOPEMETER_STACK__STATE_DIR": str(tmp_path),
        "SCOPEMETER_CONFIG_DIR": str(REPO / "config"),
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip

    def writer_committed() -> int:
        return asyncio.run(_committed(kafka, kafka.writer_group, kafka.readings_topic))

    def compute_committed() -> int:
        return asyncio.run(_committed(kafka, kafka.compute_group, kafka.committed_topic))

    private_pg.stop()  # both start while PostgreSQL refuses connections
    writer = Service("writer", ["ingest", "writer"], env, tmp_path)
    compute = Service("compute", ["compute", "run"], env, tmp_path)
    services = [writer, compute]
    try:
        for s in services:
            _, body = _until(f"{s.log_path.stem} up without its DB", s.health,
                             lambda h: h[0] == 503, services)  # fmt: skip
            assert body["dependencies"]["db"] != "ok", body
        private_pg.start()
        for s in services:
            _until(f"{s.log_path.stem} healthy", s.health, lambda h: h[0] == 200, services)

        before = [_batch(seq) for seq in range(10)]
        asyncio.run(_produce(kafka, kafka.readings_topic, [b.encode() for b in before]))
        _until("the first readings in the DB", lambda: len(_db_identities(dsn)),
               lambda n: n == len(_identities(before)), services)  # fmt: skip
        committed = _until("the writer's offsets", writer_committed, lambda n: n == len(before), services)

        private_pg.stop()  # connections are refused from here on
        during = [_batch(seq) for seq in range(10, 25)]
        asyncio.run(_produce(kafka, kafka.readings_topic, [b.encode() for b in during]))
        # A dirty range straight to compute, as the writer publishes them: compute must retry it too.
        extra = DirtyRange(site_id="sz-plant-1", meter_id=METERS[0], quantity="energy_import_kwh",
                           t_min=T0, t_max=T0 + timedelta(minutes=29), rows=30)  # fmt: skip
        compute_before = compute_committed()
        asyncio.run(_produce(kafka, kafka.committed_topic, [extra.encode()]))
        for s in services:
            _, body = _until(f"{s.log_path.stem} to report the DB down", s.health,
                             lambda h: h[0] == 503, services)  # fmt: skip
            assert body["dependencies"]["kafka"] == "ok", body
            assert body["dependencies"]["db"] != "ok", body  # the reason, e.g. AdminShutdown
        # The records reached the writer (its lag counts them) and yet no offset moved past the DB.
        lag = "scopemeter_kafka_consumer_lag"
        _until("the writer to fetch the new records", lambda: _metric(writer, lag),
               lambda n: n == len(during), services)  # fmt: skip
        assert writer_committed() == committed
        assert compute_committed() == compute_before

        private_pg.start()
        everything = before + during
        _until("every reading in the DB", lambda: len(_db_identities(dsn)),
               lambda n: n >= len(_identities(everything)), services)  # fmt: skip
        _until("the writer's offsets", writer_committed, lambda n: n == len(everything), services)
        ends = asyncio.run(_end(kafka, kafka.committed_topic))
        _until("compute's offsets", compute_committed, lambda n: n == ends, services)
        for s in services:
            _until(f"{s.log_path.stem} healthy again", s.health, lambda h: h[0] == 200, services)
        assert all(s.alive() for s in services)
        in_db = _db_identities(dsn)
        assert len(in_db) == len(set(in_db)) and set(in_db) == _identities(everything)
        # Compute's rollups are those of a clean recompute of what is in the DB.
        with psycopg.connect(dsn) as conn:
            by_worker = snapshot(conn)
            recompute_all(conn)
            assert snapshot(conn) == by_worker
            assert by_worker[0], "compute wrote no rollups"
    finally:
        codes = {s.log_path.stem: s.stop() for s in services}
    assert codes == {"writer": 0, "compute": 0}, codes
    assert "PostgreSQL failed" in writer.log_path.read_text()  # the outage was logged with its cause


async def _end(kafka: KafkaSettings, topic: str) -> int:
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_kwargs(kafka))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def _metric(service: Service, name: str) -> float:
    """The sum of a metric's samples on the service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
