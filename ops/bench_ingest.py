"""``scopemeter bench ingest``: end-to-end ingest next to raw binary COPY, measured in one run.

The bridge and the writer run as real ``scopemeter ingest`` processes on their own Kafka topics,
consumer group, MQTT share group and client ids (a running stack's processes never see the load).
It measures ``--repeat`` pairs (default 3): the rows are first COPYed straight into ``readings``
in the writer's order (then deleted and vacuumed, so the next phase meets a clean table): the
ceiling. Then the load generator publishes the same rows over MQTT as fast as it can, and the
clock stops at the writers' last commit once their ``scopemeter_writer_rows_total`` has counted
them all. Rates and ratios are medians over the pairs, so one noisy moment on a shared machine
cannot make the figure. Last, a paced phase at half that rate measures the latency from each
reading's timestamp (the wall time it was published) to ``ingested_at`` — the start of the
writer's transaction, so the commit itself (see ``scopemeter_writer_commit_seconds``) is not in it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from ingest.loadgen import Fleet, LoadGenerator, forget_session
from ingest.writer import _COLS, _TYPES, Row
from ops.errors import UserError
from ops.mqtt_auth import BRIDGE_USER
from ops.pipeline import _Proc, settings_env
from ops.procs import cpu_seconds, free_port, listener_pid, machine_cpu_seconds, pids_named
from ops.settings import Settings
from ops.stack import client_settings, ensure_topics_async, kafka_address, prepare_mqtt_auth

Progress = Callable[[str, float], None]  # (phase, fraction done)


@dataclass(frozen=True)
class Repetition:
    """One raw COPY of ``readings`` rows and the end-to-end run of the same rows right after it."""

    readings: int
    copy_s: float
    e2e_s: float
    copy_cpu: CpuUse
    cpu: CpuUse
    # The end-to-end run without its fill and drain: rows and seconds between the transactions
    # that reached 10 % and 90 % of the rows (0 when there were too few transactions to tell).
    sustained_readings: int = 0
    sustained_s: float = 0.0

    @property
    def copy_rate(self) -> float:
        return self.readings / self.copy_s

    @property
    def e2e_rate(self) -> float:
        return self.readings / self.e2e_s

    @property
    def sustained_rate(self) -> float:
        return self.sustained_readings / self.sustained_s if self.sustained_s > 0 else 0.0


@dataclass(frozen=True)
class IngestBenchResult:
    """Figures of ``repetitions`` back-to-back (raw COPY, end to end) pairs of ``readings`` rows
    each; rates and ratios are medians over the pairs, so one noisy moment cannot make them."""

    readings: int
    repetitions: list[Repetition]
    latency_readings: int
    latency_rate: float
    p50_s: float
    p99_s: float

    def _median(self, f: Callable[[Repetition], float]) -> float:
        return statistics.median(f(r) for r in self.repetitions)

    @property
    def copy_rate(self) -> float:
        return self._median(lambda r: r.copy_rate)

    @property
    def e2e_rate(self) -> float:
        return self._median(lambda r: r.e2e_rate)

    @property
    def ratio(self) -> float:
        return self._median(lambda r: r.e2e_rate / r.copy_rate)

    @property
    def sustained_rate(self) -> float:
        return self._median(lambda r: r.sustained_rate)

    @property
    def sustained_ratio(self) -> float:
        return self._median(lambda r: r.sustained_rate / r.copy_rate)

    def cpu(self, phase: str) -> CpuUse:
        """CPU of all repetitions of ``phase`` ("copy" or "e2e") together."""
        uses = [r.copy_cpu if phase == "copy" else r.cpu for r in self.repetitions]
        seconds: dict[str, float] = {}
        for u in uses:
            for name, sec in u.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + sec
        return CpuUse(seconds, sum(u.machine_busy for u in uses), sum(u.machine_total for u in uses))


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds each piece used during a phase, and the machine's busy and total seconds."""

    seconds: dict[str, float]
    machine_busy: float
    machine_total: float


class CpuMeter:
    """Per-process CPU over a phase, from /proc: where a 2-core box spends its cycles.

    Processes are grouped by piece; ``postgresql`` is every ``postgres`` process, listed again at
    the end so backends started during the phase count from zero (one that ends during the phase is
    missed: the writer's backend lives through it)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = self._sample()
        self.machine = machine_cpu_seconds()

    def _sample(self) -> dict[tuple[str, int], float]:
        groups = {**self.groups, "postgresql": pids_named("postgres")}
        return {(name, pid): cpu_seconds(pid) for name, pids in groups.items() for pid in pids}

    def stop(self) -> CpuUse:
        end = self._sample()
        busy, total = machine_cpu_seconds()
        seconds: dict[str, float] = {}
        for (name, pid), t in end.items():
            seconds[name] = seconds.get(name, 0.0) + max(0.0, t - self.start.get((name, pid), 0.0))
        busy_s, total_s = busy - self.machine[0], total - self.machine[1]
        # On a fully busy machine the two deltas are equal ticks, which float rounding may order
        # either way (seen in CI: 3.2700000000004 > 3.2699999999986).
        return CpuUse(seconds, min(busy_s, total_s), total_s)


def broker_pids(settings: Settings) -> dict[str, int]:
    """Mosquitto's and the Kafka broker's pids when they run on this machine (whoever started them)."""
    ports = {"mosquitto": settings.mqtt.port, "kafka broker": kafka_address(settings.kafka.bootstrap)[1]}
    found = {name: listener_pid(port) for name, port in ports.items()}
    return {name: pid for name, pid in found.items() if pid is not None}


def lane_settings(settings: Settings, tag: str) -> Settings:
    """Private topics, group and share group: the run can neither see nor disturb other traffic."""
    kafka = settings.kafka.model_copy(
        update={
            "readings_topic": f"readings-{tag}",
            "dlq_topic": f"dlq-{tag}",
            "committed_topic": f"committed-{tag}",
            "writer_group": f"writer-{tag}",
        }
    )
    mqtt = settings.mqtt.model_copy(update={"share_group": f"ingest-{tag}"})
    return settings.model_copy(update={"kafka": kafka, "mqtt": mqtt})


def scrape(port: int, name: str, **labels: str) -> float:
    """One sample of a process's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def scrape_writers(writers: list[tuple[_Proc, int]], name: str, **labels: str) -> list[float]:
    """One sample of ``name`` from each writer's /metrics (0 while it is not serving yet); raises
    when a writer has exited."""
    got = []
    for proc, port in writers:
        if proc.popen.poll() is not None:
            raise UserError(f"a writer exited ({proc.popen.returncode}); see {proc.log_path}")
        try:
            got.append(scrape(port, name, **labels))
        except OSError:
            got.append(0.0)
    return got


def wait_inserted(
    writers: list[tuple[_Proc, int]],
    want: float,
    timeout: float,
    progress: Callable[[float], None] | None = None,
    interval: float = 0.05,
) -> None:
    """Poll the writers' /metrics until together they have inserted ``want`` rows. A scrape costs a
    writer CPU, so a timed phase polls slowly and reads the end time from the writers' own gauge."""
    deadline = time.monotonic() + timeout
    while True:
        got = sum(scrape_writers(writers, "scopemeter_writer_rows_total", outcome="inserted"))
        if progress is not None:
            progress(got)
        if got >= want:
            return
        if time.monotonic() > deadline:
            raise UserError(f"the writers inserted {got:.0f} of {want:.0f} rows in {timeout:.0f} s")
        time.sleep(interval)


def wait_assigned(writers: list[tuple[_Proc, int]], partitions: int, timeout: float) -> None:
    """Until the consumer group is settled: every partition held, every writer holding some (when
    there are enough). A writer joining mid-run would stop the group for a rebalance."""
    deadline = time.monotonic() + timeout
    want_each = 1 if len(writers) <= partitions else 0
    while True:
        held = scrape_writers(writers, "scopemeter_writer_assigned_partitions")
        if sum(held) == partitions and min(held) >= want_each:
            return
        if time.monotonic() > deadline:
            raise UserError(f"the writers hold {held} of {partitions} partitions after {timeout:.0f} s")
        time.sleep(0.2)


def raw_copy_seconds(dsn: str, rows: list[Row]) -> tuple[float, CpuUse]:
    """Binary COPY of ``rows`` straight into ``readings`` and commit, timed; then deleted again and
    vacuumed, so the end-to-end phase that follows meets a clean table."""
    with psycopg.connect(dsn) as conn:
        t_min = min(r[2] for r in rows)
        t_max = max(r[2] for r in rows)
        conn.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (t_min, t_max))
        conn.commit()
        cpu = CpuMeter({"COPY client": [os.getpid()]})
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY readings ({_COLS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(list(_TYPES))
            for row in rows:
                copy.write_row(row)
        conn.commit()
        elapsed = time.perf_counter() - started
        cpu_use = cpu.stop()
        meters = sorted({r[0] for r in rows})
        conn.execute(
            "DELETE FROM readings WHERE meter_id = ANY(%s) AND ts BETWEEN %s AND %s", (meters, t_min, t_max)
        )
        conn.commit()
    vacuum(dsn)
    return elapsed, cpu_use


def sustained(
    transactions: list[tuple[datetime, int]], low: float = 0.1, high: float = 0.9
) -> tuple[int, float]:
    """(rows, seconds) of the steady part of a run, from its transactions as (start, rows) in start
    order: from the start of the transaction that reaches ``low`` of the rows to the start of the
    one that reaches ``high``, counting the rows of the transactions started in between. The
    pipeline's fill and drain (reported as latency) stay out of the throughput."""
    total = sum(n for _, n in transactions)
    done, first, last = 0, None, None
    for i, (_start, n) in enumerate(transactions):
        if first is None and done + n >= low * total:
            first = i
        if done + n >= high * total:
            last = i
            break
        done += n
    if first is None or last is None or last <= first:
        return 0, 0.0
    rows = sum(n for _, n in transactions[first:last])
    return rows, (transactions[last][0] - transactions[first][0]).total_seconds()


def vacuum(dsn: str) -> None:
    """Clear the dead rows a phase left behind. The end-to-end phase inserts the very keys the raw
    COPY just deleted: without this, every insert checks their dead index entries (measured: a
    third more PostgreSQL CPU per row), and a next run would pay for this run's leftovers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM readings")


def run(
    settings: Settings,
    *,
    sites: int,
    meters: int,
    steps: int,
    rounds: int,
    latency_s: float,
    latency_fraction: float = 0.5,
    writers: int = 1,
    repeat: int = 3,
    log_dir: Path,
    progress: Progress = lambda _phase, _done: None,
    timeout: float = 300.0,
) -> IngestBenchResult:
    tag = f"bench-{uuid.uuid4().hex[:10]}"
    s = lane_settings(settings, tag)
    asyncio.run(ensure_topics_async(s.kafka))
    fleet = Fleet(tag.replace("-", ""), sites, meters)
    fleet.register(s.db.dsn)
    prepare_mqtt_auth(s)  # the stack's closed broker admits the fleet's gateways from now on
    gen = LoadGenerator(s, fleet, steps=steps, spacing=timedelta(milliseconds=1))
    env = settings_env(s)
    bridge_env = settings_env(client_settings(s, BRIDGE_USER))
    log_dir = log_dir / tag  # each run keeps its own logs
    log_dir.mkdir(parents=True, exist_ok=True)
    bridge_port = free_port()
    bridge_id = f"{tag}-bridge"
    procs: list[_Proc] = []
    try:
        writer_procs: list[tuple[_Proc, int]] = []
        for w in range(writers):  # one consumer group: Kafka shares the partitions among them
            port = free_port()
            proc = _Proc(f"bench-writer-{w}", ["ingest", "writer", "--metrics-port", str(port)], env, log_dir)
            procs.append(proc)
            writer_procs.append((proc, port))
        bridge = _Proc(
            "bench-bridge",
            ["ingest", "bridge", "--metrics-port", str(bridge_port), "--client-id", bridge_id],
            bridge_env, log_dir,
        )  # fmt: skip
        procs.append(bridge)
        bridge.wait_event("bridge.ready", 60)
        wait_assigned(writer_procs, s.kafka.partitions, 60)
        gen.connect()

        # Warm-up: processes joined, partitions created, code paths hot; not timed.
        now = datetime.now(UTC).replace(microsecond=0)
        base = now - timedelta(hours=2)
        gen.publish_round(base - timedelta(minutes=30))
        wait_inserted(writer_procs, gen.total, timeout)
        progress("warm-up", 1.0)

        vacuum(s.db.dsn)  # the first pair starts clean too, whatever earlier runs left behind
        span = steps * gen.spacing
        pieces = {name: [pid] for name, pid in broker_pids(s).items()}
        groups = {
            "load generator": [os.getpid()], "bridge": [bridge.popen.pid],
            "writer": [proc.popen.pid for proc, _ in writer_procs], **pieces,
        }  # fmt: skip
        repetitions = []
        for rep in range(repeat):
            starts = [base + (rep * rounds + r) * span for r in range(rounds)]

            def pair_progress(phase: str, done: float, rep: int = rep) -> None:
                progress(f"{phase} {rep + 1}/{repeat}", done)

            repetitions.append(
                _repetition(s, gen, starts, span, writer_procs, groups, timeout, pair_progress)
            )
        n = gen.readings_per_round * rounds
        e2e_s = statistics.median(r.e2e_s for r in repetitions)

        # Latency at a sustainable pace: timestamps are the wall clock when published.
        rate = latency_fraction * n / e2e_s
        pause = gen.readings_per_round / rate
        latency_from = datetime.now(UTC)
        before = gen.total
        paced_until = time.monotonic() + latency_s
        last = latency_from
        while time.monotonic() < paced_until:
            t = time.monotonic()
            stamp = max(datetime.now(UTC), last + span)
            last = stamp
            gen.publish_round(stamp)
            progress("latency", 1 - max(0.0, paced_until - time.monotonic()) / latency_s)
            time.sleep(max(0.0, pause - (time.monotonic() - t)))
        wait_inserted(writer_procs, gen.total, timeout)
        with psycopg.connect(s.db.dsn) as conn:
            lat = [
                float(x)
                for (x,) in conn.execute(
                    "SELECT extract(epoch FROM ingested_at - ts) FROM readings"
                    " WHERE meter_id LIKE %s AND ts >= %s",
                    (fleet.prefix + "-%", latency_from),
                )
            ]
            in_db = conn.execute(
                "SELECT count(*) FROM readings WHERE meter_id LIKE %s", (fleet.prefix + "-%",)
            ).fetchone()
            conn.execute("DELETE FROM readings WHERE meter_id LIKE %s", (fleet.prefix + "-%",))
        vacuum(s.db.dsn)
        if in_db is None or in_db[0] != gen.total or len(lat) != gen.total - before:
            raise UserError(f"expected {gen.total} rows, found {in_db}: see {log_dir}")
        q = statistics.quantiles(lat, n=100, method="inclusive")
        return IngestBenchResult(
            readings=n, repetitions=repetitions, latency_readings=len(lat),
            latency_rate=rate, p50_s=q[49], p99_s=q[98],
        )  # fmt: skip
    finally:
        gen.close()
        for p in reversed(procs):
            p.stop()
        forget_session(s, bridge_id)


def _repetition(
    s: Settings,
    gen: LoadGenerator,
    starts: list[datetime],
    span: timedelta,
    writer_procs: list[tuple[_Proc, int]],
    groups: dict[str, list[int]],
    timeout: float,
    progress: Progress,
) -> Repetition:
    """Raw COPY of the rows of ``starts`` (then deleted), then the same rows end to end."""
    # The ceiling: the same rows the load phase will publish, COPYed straight into readings.
    first = len(gen.rounds)
    rows = [row for r, start in enumerate(starts) for row in gen.rows(first + r, start)]
    rows.sort()  # in identity order, as the writer sends them: PostgreSQL's fastest order
    gc.freeze()  # the collector would otherwise rescan these rows and slow the COPY client
    copy_s, copy_cpu = raw_copy_seconds(s.db.dsn, rows)
    gc.unfreeze()
    n = len(rows)
    del rows
    progress("raw COPY", 1.0)

    # Sustained end to end: publish everything, stop the clock when the writers have it all.
    encoded = []
    for r, start in enumerate(starts):
        encoded.append(gen.encode_round(start))
        progress("encode", (r + 1) / len(starts))
    warm = gen.total
    cpu = CpuMeter(groups)
    started = time.time()
    for start, payloads in zip(starts, encoded, strict=True):
        gen.publish_round(start, payloads)
    wait_inserted(writer_procs, warm + n, timeout,
                  lambda got: progress("end to end", (got - warm) / n), interval=0.5)  # fmt: skip
    cpu_use = cpu.stop()
    last_commit = "scopemeter_writer_last_commit_timestamp_seconds"
    e2e_s = max(scrape(port, last_commit) for _, port in writer_procs) - started
    with psycopg.connect(s.db.dsn) as conn:
        # ingested_at is now() of the writer's transaction: one value per transaction.
        transactions = conn.execute(
            "SELECT ingested_at, count(*) FROM readings WHERE meter_id LIKE %s AND ts >= %s"
            " AND ts < %s GROUP BY ingested_at ORDER BY ingested_at",
            (gen.fleet.prefix + "-%", starts[0], starts[-1] + span),
        ).fetchall()
    steady_rows, steady_s = sustained([(t, int(c)) for t, c in transactions])
    return Repetition(n, copy_s, e2e_s, copy_cpu, cpu_use, steady_rows, steady_s)
