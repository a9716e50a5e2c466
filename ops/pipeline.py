"""Run the whole pipeline as separate processes on one simulated site and compare with ground truth.

Used by ``scopemeter demo`` and by the end-to-end test, so both exercise exactly the same path:
simulator (Modbus TCP) → edge agent → Mosquitto → bridge → Kafka → writer → PostgreSQL →
compute worker → rollups. Every process is a real ``scopemeter`` sub-process configured only
through the environment (the one settings model), as it would be under systemd.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from edge.config import load_edge_config
from ops.errors import UserError
from ops.kafka_client import client_kwargs
from ops.mqtt_auth import BRIDGE_USER
from ops.procs import free_port
from ops.settings import Settings
from ops.stack import client_settings
from simulators.config import load_simulation
from simulators.loadprofile import energy_kwh

BUCKET = timedelta(minutes=15)
DEMO_SIMULATION = Path("simulation/demo.toml")
DEMO_GATEWAY = Path("edge/demo-gateway.toml")
# Wall seconds the simulator, bridge, writer, compute and edge agent may take to start before the
# measured window opens (run_pipeline's lead).
STARTUP_WALL_S = 15.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BucketRow:
    bucket: datetime
    kwh: float
    truth_kwh: float
    kg_co2e: float | None


@dataclass
class PipelineResult:
    site_id: str
    window: tuple[datetime, datetime]
    polls: int
    readings_produced: int
    readings_published: int
    readings_in_db: int
    dead_letters: int
    factor_ids: list[str]
    factor_kg_per_kwh: float | None
    buckets: list[BucketRow] = field(default_factory=list)

    @property
    def kwh(self) -> float:
        return math.fsum(b.kwh for b in self.buckets)

    @property
    def truth_kwh(self) -> float:
        return math.fsum(b.truth_kwh for b in self.buckets)

    @property
    def kg_co2e(self) -> float:
        return math.fsum(b.kg_co2e or 0.0 for b in self.buckets)

    @property
    def truth_kg_co2e(self) -> float | None:
        f = self.factor_kg_per_kwh
        return None if f is None else self.truth_kwh * f


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEMETER_")}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        env[f"SCOPEMETER_{name.upper()}"] = (
            value.model_dump_json() if hasattr(value, "model_dump_json") else str(value)
        )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def window_start(hours: float, now: datetime | None = None) -> datetime:
    """07:00 in Shenzhen on the latest past weekday: the day shift starting at 08:00, entirely in the
    past, and the same all day long so a rerun simulates the same window."""
    shenzhen = ZoneInfo("Asia/Shanghai")
    now = (now or datetime.now(UTC)).astimezone(shenzhen)
    start = (now - timedelta(days=1)).replace(hour=7, minute=0, second=0, microsecond=0)
    while start + timedelta(hours=hours) > now or start.weekday() >= 5:
        start -= timedelta(days=1)
    return start.astimezone(UTC)


class _Proc:
    """A child ``scopemeter`` process: stderr to a log file, stdout read line by line."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith("{") and json.loads(line).get("event") == event:
                        return dict(json.loads(line))
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise UserError(f"{self.name} exited ({self.popen.returncode}); see {self.log_path}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UserError(
                        f"{self.name} did not report {event!r} in {timeout:.0f}s; see {self.log_path}"
                    )
                self._cond.wait(min(left, 0.5))

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


@contextmanager
def _processes() -> Iterator[list[_Proc]]:
    procs: list[_Proc] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


async def _group_lag(settings: Settings, group: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **client_kwargs(settings.kafka))
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await consumer.end_offsets(tps)
        lag = 0
        for tp in tps:
            committed = await consumer.committed(tp) or 0
            lag += max(0, ends[tp] - committed)
        return lag
    finally:
        await consumer.stop()


def _wait(what: str, condition: Callable[[], bool], timeout: float, log_hint: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f}s waiting for {what}; see {log_hint}")
        time.sleep(0.25)


def _on_free_port(gateway_file: Path, port: int, log_dir: Path) -> Path:
    """A copy of the demo gateway's config in ``log_dir`` whose meters use a free Modbus port (the
    simulator is started on it), so a run never meets another program on the demo's fixed port."""
    text = gateway_file.read_text()
    fixed = f"port = {port}"
    lines = text.splitlines(keepends=True)
    hits = sum(1 for line in lines if line.strip() == fixed)
    if not hits:
        raise UserError(f"{gateway_file}: no meter line '{fixed}' (the simulator's port) to move")
    free = f"port = {free_port()}"
    copy = log_dir / gateway_file.name
    copy.write_text("".join(line.replace(fixed, free) if line.strip() == fixed else line for line in lines))
    return copy


def run_pipeline(
    settings: Settings,
    *,
    hours: float = 2.0,
    speed: float = 240.0,
    log_dir: Path,
    progress: Progress = lambda _msg: None,
    timeout: float = 120.0,
) -> PipelineResult:
    """Simulate ``hours`` of the demo site at ``speed``× through every process; compare with truth.

    The caller has started the stack and prepared an empty, migrated database with the fleet and
    factors applied. The simulated clock starts ``STARTUP_WALL_S`` of wall time (at least 20
    simulated minutes) before the window so the edge agent is polling when the window opens, and
    polls until 10 minutes after it closes.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    sim_path = settings.config_dir / DEMO_SIMULATION
    simulation = load_simulation(sim_path)
    edge_path = _on_free_port(settings.config_dir / DEMO_GATEWAY, simulation.server.port, log_dir)
    gateway = load_edge_config(edge_path)
    modbus_port = gateway.meters[0].port
    site = gateway.site
    w0 = window_start(hours)
    w1 = w0 + timedelta(hours=hours)
    # The agent must be polling when the window opens, however long the processes take to start:
    # the lead covers STARTUP_WALL_S of wall time (20 simulated minutes at least). On a loaded
    # 2-core machine the five processes took more than the 5 s that 20 minutes are at 240×.
    lead = max(timedelta(minutes=20), timedelta(seconds=STARTUP_WALL_S * speed))
    polls = math.ceil((lead + (w1 - w0) + timedelta(minutes=10)) / timedelta(seconds=gateway.poll_interval_s))
    outbox = gateway.resolved_outbox(settings.stack.state_dir)
    outbox.unlink(missing_ok=True)  # a fresh gateway: nothing left from an earlier run

    clock = settings.clock.model_copy(
        update={"speed": speed, "sim_start": w0 - lead, "wall_start": time.time()}
    )
    run_settings = settings.model_copy(update={"clock": clock})
    env = settings_env(run_settings)

    # The stack's Mosquitto admits only its users: the bridge and the gateway log in as themselves.
    as_user = {
        "bridge": settings_env(client_settings(run_settings, BRIDGE_USER)),
        "edge": settings_env(client_settings(run_settings, gateway.gateway)),
    }

    with _processes() as procs:
        def start(name: str, *args: str) -> _Proc:
            p = _Proc(name, list(args), as_user.get(name, env), log_dir)
            procs.append(p)
            return p

        sim = start("simulator", "sim", "run", str(sim_path), "--port", str(modbus_port))
        bridge = start("bridge", "ingest", "bridge", "--metrics-port", "0")
        start("writer", "ingest", "writer", "--metrics-port", "0")
        start("compute", "compute", "run", "--metrics-port", "0")
        sim.wait_event("sim.listening", 30)
        bridge.wait_event("bridge.ready", 30)
        progress(f"simulating {hours:g} h of {site} at {speed:g}× "
                 f"({(lead + (w1 - w0)).total_seconds() / speed:.0f} s wall)")
        edge = start("edge", "edge", "run", str(edge_path), "--polls", str(polls))
        report = edge.wait_event("edge.report", timeout + (lead + (w1 - w0)).total_seconds() / speed * 2)
        edge.popen.wait(30)
        if report["pending_batches"]:
            pending = report["pending_batches"]
            raise UserError(f"edge agent left {pending} batches unsent; see {edge.log_path}")
        progress(f"edge published {report['readings_published']} readings in {report['batches_published']} "
                 "batches; waiting for the writer and compute")

        with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
            def rows() -> int:
                return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])  # type: ignore[index]

            _wait("the writer", lambda: rows() >= report["readings_published"], timeout, str(log_dir))
            for group, topic in ((settings.kafka.writer_group, settings.kafka.readings_topic),
                                 (settings.kafka.compute_group, settings.kafka.committed_topic)):

                def caught_up(group: str = group, topic: str = topic) -> bool:
                    return asyncio.run(_group_lag(settings, group, topic)) == 0

                _wait(f"consumer group {group}", caught_up, timeout, str(log_dir))
            in_db = rows()
            measured = {
                r[0]: (r[1], r[2], r[3]) for r in conn.execute(
                    "SELECT bucket, kwh, kg_co2e, factor_id FROM site_rollups_15m"
                    " WHERE site_id = %s AND scope = 2 AND method = 'location'"
                    " AND bucket >= %s AND bucket < %s ORDER BY bucket",
                    (site, w0, w1),
                )
            }
            coverage = conn.execute(
                "SELECT meter_id, min(ts), max(ts) FROM readings WHERE quantity = 'energy_import_kwh'"
                " GROUP BY meter_id"
            ).fetchall()
            factor_row = conn.execute(
                "SELECT DISTINCT f.kg_co2e_per_unit FROM site_rollups_15m r"
                " JOIN emission_factors f USING (factor_id) WHERE r.site_id = %s", (site,)
            ).fetchall()
        dlq = asyncio.run(_topic_size(settings, settings.kafka.dlq_topic))

    for meter_id, t_min, t_max in coverage:
        if t_min > w0 or t_max < w1:
            raise UserError(f"meter {meter_id} was read {t_min}..{t_max}, not over the whole window "
                            f"{w0}..{w1}: the processes started too slowly; try a lower --speed")
    buckets = []
    t = w0
    while t < w1:
        truth = math.fsum(energy_kwh(m.profile, t, t + BUCKET) for m in simulation.meters)
        kwh, kg, _factor = measured.get(t, (0.0, None, None))
        buckets.append(BucketRow(t, kwh, truth, kg))
        t += BUCKET
    factor_ids = sorted({v[2] for v in measured.values() if v[2]})
    return PipelineResult(
        site_id=site,
        window=(w0, w1),
        polls=int(report["polls"]),
        readings_produced=int(report["readings_produced"]),
        readings_published=int(report["readings_published"]),
        readings_in_db=in_db,
        dead_letters=dlq,
        factor_ids=factor_ids,
        factor_kg_per_kwh=float(factor_row[0][0]) if len(factor_row) == 1 else None,
        buckets=buckets,
    )


async def _topic_size(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_kwargs(settings.kafka))
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return 0
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        with suppress(Exception):
            await consumer.stop()
