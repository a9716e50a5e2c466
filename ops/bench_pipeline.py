"""``scopemeter bench pipeline``: load generator → MQTT → bridge → Kafka → writer → compute →
rollups committed, next to raw binary COPY of the same rows, measured in one run.

Real ``scopemeter ingest bridge|writer`` and ``scopemeter compute run`` processes run on private
topics, consumer groups and client ids (``ops.bench_ingest.lane_settings``), with two registered
fleets: one for throughput, one for latency (fresh meters, so no earlier reading of theirs is in
the way).

Completion is read from the database itself: a meter's counter (``ingest.loadgen.value_of``)
grows by 0.25 per step, so once every reading of a fleet is in committed rollups, the sum of its
sites' ``site_rollups_15m.kwh`` is exactly ``0.25 × (steps - 1)`` per meter. The sustained phase
publishes every round as fast as it can and stops the clock at the first poll (every 0.1 s) that
sees that total. The paced phase publishes the latency fleet one round (one reading per meter) at
a time at ``latency_fraction`` of the sustained rate, each stamped with the wall clock; a watcher
polls the fleet's total every 20 ms, and a round's latency is the first poll that shows its energy
minus its timestamp, i.e. reading timestamp → rollup commit of the slowest meter of the round
(the poll interval is part of the figure).
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from ingest.loadgen import Fleet, LoadGenerator, forget_session
from ops.bench_ingest import (
    CpuMeter,
    CpuUse,
    broker_pids,
    lane_settings,
    raw_copy_seconds,
    vacuum,
    wait_assigned,
    wait_inserted,
)
from ops.errors import UserError
from ops.mqtt_auth import BRIDGE_USER
from ops.pipeline import _Proc, settings_env
from ops.procs import free_port
from ops.settings import Settings
from ops.stack import client_settings, ensure_topics_async, prepare_mqtt_auth

Progress = Callable[[str, float], None]
STEP_KWH = 0.25  # ingest.loadgen.value_of: each step adds this to every counter


@dataclass(frozen=True)
class PipelineBenchResult:
    readings: int
    copy_s: float  # raw binary COPY of the same rows into readings
    e2e_s: float  # first publish → every reading in committed rollups
    latency_rate: float  # readings/s offered in the paced phase
    latency_rounds: int
    p50_s: float
    p99_s: float
    compute_workers: int
    cpu: CpuUse = field(default_factory=lambda: CpuUse({}, 0.0, 0.0))  # of the sustained phase

    @property
    def copy_rate(self) -> float:
        return self.readings / self.copy_s

    @property
    def e2e_rate(self) -> float:
        return self.readings / self.e2e_s

    @property
    def ratio(self) -> float:
        return self.e2e_rate / self.copy_rate

    def cpu_lines(self) -> list[str]:
        """Where the sustained phase's CPU went: core-seconds per 100k readings, per piece."""
        cpu = self.cpu
        if cpu.machine_total <= 0:  # no /proc here
            return []
        per = 100_000 / self.readings
        out = [
            f"CPU in the sustained phase: machine {cpu.machine_busy / cpu.machine_total:.0%} busy;"
            " core-seconds per 100k readings:"
        ]
        seconds = dict(cpu.seconds)
        backends = [k for k in seconds if k.endswith("'s DB")]
        if "postgresql" in seconds:  # every postgres process, the pieces' own backends included
            seconds["postgresql"] = max(0.0, seconds.pop("postgresql") - sum(seconds[k] for k in backends))
            seconds["postgresql (rest)"] = seconds.pop("postgresql")
        for name, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
            out.append(f"  {name:<17} {sec * per:6.2f}  ({sec / self.e2e_s:.0%} of a core)")
        other = cpu.machine_busy - sum(seconds.values())
        out.append(f"  {'(other processes)':<17} {other * per:6.2f}  ({other / self.e2e_s:.0%} of a core)")
        return out


def fleet_kwh(conn: psycopg.Connection[tuple[float]], fleet: Fleet) -> float:
    """The energy in the fleet's committed rollups (0 when none yet)."""
    sites = [fleet.site(s) for s in range(fleet.sites)]
    row = conn.execute(
        "SELECT coalesce(sum(kwh), 0) FROM site_rollups_15m WHERE site_id = ANY(%s)", (sites,)
    ).fetchone()
    conn.commit()
    return float(row[0]) if row else 0.0


def backend_pids(dsn: str, names: dict[str, str]) -> dict[str, list[int]]:
    """PostgreSQL backend pids per piece, by the application_name its sessions carry."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT application_name, pid FROM pg_stat_activity WHERE application_name = ANY(%s)",
            (list(names),),
        ).fetchall()
    out: dict[str, list[int]] = {label: [] for label in names.values()}
    for app, pid in rows:
        out[names[app]].append(int(pid))
    return out


def expected_kwh(fleet: Fleet, steps: int) -> float:
    """Energy of a fleet after ``steps`` readings per meter."""
    return fleet.sites * fleet.meters * STEP_KWH * max(0, steps - 1)


def wait_rollups(dsn: str, fleet: Fleet, want: float, timeout: float, procs: list[_Proc]) -> float:
    """Poll until the fleet's rollups hold ``want``; returns the wall time it was first seen."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn) as conn:
        while True:
            got = fleet_kwh(conn, fleet)
            if math.isclose(got, want, rel_tol=1e-9) or got > want:
                return time.time()
            for p in procs:
                if p.popen.poll() is not None:
                    raise UserError(f"{p.name} exited ({p.popen.returncode}); see {p.log_path}")
            if time.monotonic() > deadline:
                raise UserError(f"rollups hold {got:.2f} of {want:.2f} kWh after {timeout:.0f} s")
            time.sleep(0.1)


class Watcher(threading.Thread):
    """Polls a fleet's committed rollup energy every ``interval`` s: (wall time, kWh) samples."""

    def __init__(self, dsn: str, fleet: Fleet, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.dsn, self.fleet, self.interval = dsn, fleet, interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            while not self.stop.is_set():
                kwh = fleet_kwh(conn, self.fleet)
                self.samples.append((time.time(), kwh))
                time.sleep(self.interval)

    def first_at(self, want: float) -> float | None:
        for t, kwh in self.samples:
            if kwh > want or math.isclose(kwh, want, rel_tol=1e-9):
                return t
        return None


def run(
    settings: Settings,
    *,
    sites: int,
    meters: int,
    steps: int,
    rounds: int,
    latency_s: float,
    latency_fraction: float = 0.5,
    compute_workers: int = 1,
    log_dir: Path,
    progress: Progress = lambda _phase, _done: None,
    timeout: float = 600.0,
) -> PipelineBenchResult:
    tag = f"bench-{uuid.uuid4().hex[:10]}"
    s = lane_settings(settings, tag)
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"compute_group": f"compute-{tag}"})})
    asyncio.run(ensure_topics_async(s.kafka))
    prefix = tag.replace("-", "")
    fleet, paced = Fleet(prefix + "t", sites, meters), Fleet(prefix + "l", sites, meters)
    fleet.register(s.db.dsn)
    paced.register(s.db.dsn)
    prepare_mqtt_auth(s)  # the closed broker admits both fleets' gateways from now on
    gen = LoadGenerator(s, fleet, steps=steps, spacing=timedelta(milliseconds=1))
    pgen = LoadGenerator(s, paced, steps=1, spacing=timedelta(milliseconds=1))
    env = settings_env(s)
    log_dir = log_dir / tag
    log_dir.mkdir(parents=True, exist_ok=True)
    bridge_id = f"{tag}-bridge"
    procs: list[_Proc] = []
    try:
        writer_port = free_port()
        # Each piece's PostgreSQL sessions carry its name (libpq's PGAPPNAME), so the CPU of its
        # backends can be told apart from the rest of the server's.
        writer = _Proc(
            "bench-writer",
            ["ingest", "writer", "--metrics-port", str(writer_port)],
            {**env, "PGAPPNAME": f"{tag}-writer"},
            log_dir,
        )
        procs.append(writer)
        for w in range(compute_workers):  # one consumer group: sites are split by partition
            procs.append(
                _Proc(
                    f"bench-compute-{w}",
                    ["compute", "run", "--metrics-port", str(free_port())],
                    {**env, "PGAPPNAME": f"{tag}-compute"},
                    log_dir,
                )
            )
        bridge = _Proc(
            "bench-bridge",
            ["ingest", "bridge", "--metrics-port", str(free_port()), "--client-id", bridge_id],
            settings_env(client_settings(s, BRIDGE_USER)),
            log_dir,
        )
        procs.append(bridge)
        bridge.wait_event("bridge.ready", 60)
        wait_assigned([(writer, writer_port)], s.kafka.partitions, 60)
        gen.connect()
        pgen.connect()

        # Warm-up (not timed): every process joined and every code path compiled and hot.
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
        gen.publish_round(base - timedelta(minutes=30))
        wait_rollups(s.db.dsn, fleet, expected_kwh(fleet, steps), timeout, procs)
        progress("warm-up", 1.0)

        # The ceiling: the same rows COPYed straight into readings (then deleted and vacuumed).
        span = steps * gen.spacing
        starts = [base + r * span for r in range(rounds)]
        first = len(gen.rounds)
        rows = sorted(row for r, start in enumerate(starts) for row in gen.rows(first + r, start))
        gc.freeze()
        copy_s, _cpu = raw_copy_seconds(s.db.dsn, rows)
        gc.unfreeze()
        n = len(rows)
        del rows
        progress("raw COPY", 1.0)

        # Sustained: everything published at once; the clock stops when the rollups hold it all.
        encoded = [gen.encode_round(start) for start in starts]
        groups = {
            "load generator": [os.getpid()],
            "bridge": [bridge.popen.pid],
            "writer": [writer.popen.pid],
            "compute": [p.popen.pid for p in procs if p.name.startswith("bench-compute")],
            **{name: [pid] for name, pid in broker_pids(s).items()},
            **backend_pids(s.db.dsn, {f"{tag}-writer": "writer's DB", f"{tag}-compute": "compute's DB"}),
        }
        cpu = CpuMeter(groups)
        started = time.time()
        for start, payloads in zip(starts, encoded, strict=True):
            gen.publish_round(start, payloads)
        done_at = wait_rollups(s.db.dsn, fleet, expected_kwh(fleet, (1 + rounds) * steps), timeout, procs)
        cpu_use = cpu.stop()
        e2e_s = done_at - started
        progress("end to end", 1.0)

        # Latency at a fraction of that rate: one reading per meter per round, wall-clock stamps.
        rate = latency_fraction * n / e2e_s
        pause = pgen.readings_per_round / rate
        watcher = Watcher(s.db.dsn, paced)
        watcher.start()
        stamps: list[datetime] = []
        until = time.monotonic() + latency_s
        while time.monotonic() < until:
            t = time.monotonic()
            stamp = max(datetime.now(UTC), stamps[-1] + pgen.spacing) if stamps else datetime.now(UTC)
            stamps.append(stamp)
            pgen.publish_round(stamp)
            progress("latency", 1 - max(0.0, until - time.monotonic()) / latency_s)
            time.sleep(max(0.0, pause - (time.monotonic() - t)))
        wait_rollups(s.db.dsn, paced, expected_kwh(paced, len(stamps)), timeout, procs)
        time.sleep(0.1)
        watcher.stop.set()
        watcher.join()
        latencies = []
        for r in range(1, len(stamps)):  # round 0 is a lone first reading: no energy to see
            seen = watcher.first_at(expected_kwh(paced, r + 1))
            if seen is None:
                raise UserError(f"the watcher never saw round {r}; see {log_dir}")
            latencies.append(seen - stamps[r].timestamp())
        if len(latencies) < 2:
            raise UserError("too few paced rounds for a latency figure: raise --latency-seconds")
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        with psycopg.connect(s.db.dsn) as conn:
            meter_ids = [f.meter(i, m) for f in (fleet, paced) for i in range(sites) for m in range(meters)]
            conn.execute("DELETE FROM readings WHERE meter_id = ANY(%s)", (meter_ids,))
            conn.execute("DELETE FROM meter_energy_15m WHERE meter_id = ANY(%s)", (meter_ids,))
            conn.execute(
                "DELETE FROM site_rollups_15m WHERE site_id = ANY(%s)",
                ([f.site(i) for f in (fleet, paced) for i in range(sites)],),
            )
        vacuum(s.db.dsn)
        return PipelineBenchResult(
            readings=n, copy_s=copy_s, e2e_s=e2e_s, latency_rate=rate, latency_rounds=len(latencies),
            p50_s=q[49], p99_s=q[98], compute_workers=compute_workers, cpu=cpu_use,
        )  # fmt: skip
    finally:
        gen.close()
        pgen.close()
        for p in reversed(procs):
            p.stop()
        forget_session(s, bridge_id)


__all__ = ["PipelineBenchResult", "run", "wait_inserted"]
