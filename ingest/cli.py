"""``scopemeter ingest bridge|writer``, ``bench ingest|pipeline``, ``db migrate|info|retention`` and
``mqtt acl``."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from ops.runtime import run_service, setup_logging
from ops.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = sub.add_parser("ingest", help="MQTT → Kafka bridge and Kafka → PostgreSQL writer")
    isub = ingest.add_subparsers(dest="ingest_command", required=True, metavar="PROCESS")
    bridge = isub.add_parser("bridge", help="validate MQTT batches and produce them to Kafka")
    bridge.add_argument("--metrics-port", type=int, default=9101, help="/metrics and /healthz port (0: off)")
    bridge.add_argument(
        "--client-id",
        default=None,
        help="persistent MQTT client id, unique per bridge (default: scopemeter-bridge-HOSTNAME); the"
        " stack's closed broker uses the bridge's user name (SCOPEMETER_MQTT__USERNAME) instead",
    )
    bridge.set_defaults(handler=_bridge)
    writer = isub.add_parser("writer", help="write readings from Kafka to PostgreSQL")
    writer.add_argument("--metrics-port", type=int, default=9102, help="/metrics and /healthz port (0: off)")
    writer.add_argument("--batch-rows", type=int, default=20_000, help="rows per DB transaction")
    writer.set_defaults(handler=_writer)

    from compute.cli import bench_subparsers

    bench = bench_subparsers(sub).add_parser(
        "ingest", help="MQTT → bridge → Kafka → writer → PostgreSQL vs raw COPY, measured side by side"
    )
    bench.add_argument("--sites", type=int, default=10, help="sites, one gateway each")
    bench.add_argument("--meters", type=int, default=100, help="meters per site")
    bench.add_argument("--steps", type=int, default=10, help="timestamps per batch (batch = meters × steps)")
    bench.add_argument("--rounds", type=int, default=60, help="batches per gateway in the sustained phase")
    bench.add_argument("--latency-seconds", type=float, default=5.0, help="length of the paced phase")
    bench.add_argument("--writers", type=int, default=1, help="writer processes (one consumer group)")
    bench.add_argument(
        "--repeat", type=int, default=3, help="(raw COPY, end to end) pairs; medians are reported"
    )
    bench.set_defaults(handler=_bench)
    pipe = bench_subparsers(sub).add_parser(
        "pipeline",
        help="MQTT → bridge → Kafka → writer → compute → rollups vs raw COPY, and reading → rollup latency",
    )
    pipe.add_argument("--sites", type=int, default=10, help="sites, one gateway each")
    pipe.add_argument("--meters", type=int, default=100, help="meters per site")
    pipe.add_argument("--steps", type=int, default=10, help="timestamps per batch (batch = meters × steps)")
    pipe.add_argument("--rounds", type=int, default=30, help="batches per gateway in the sustained phase")
    pipe.add_argument("--latency-seconds", type=float, default=10.0, help="length of the paced phase")
    pipe.add_argument("--compute-workers", type=int, default=1, help="compute processes (one consumer group)")
    pipe.set_defaults(handler=_bench_pipeline)

    db = sub.add_parser("db", help="database schema")
    dsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    mig = dsub.add_parser("migrate", help="create the database if needed and apply migrations")
    mig.add_argument(
        "--storage",
        choices=("auto", "timescaledb", "native"),
        default=None,
        help="storage path of readings, chosen at the first migration (default: the GUC"
        " scopemeter.storage, else auto = TimescaleDB when the server has it)",
    )
    mig.set_defaults(handler=_migrate)
    info = dsub.add_parser("info", help="print the storage path of readings and its policies (JSON)")
    info.set_defaults(handler=_info)
    ret = dsub.add_parser("retention", help="drop readings past the retention horizon (cron it)")
    ret.set_defaults(handler=_retention)

    mqtt = sub.add_parser("mqtt", help="the broker's users and access control")
    msub = mqtt.add_subparsers(dest="mqtt_command", required=True, metavar="ACTION")
    acl = msub.add_parser(
        "acl",
        help="generate Mosquitto's password and ACL files from the fleet registry (run after `fleet"
        " apply`); the stack's own Mosquitto re-reads them",
    )
    acl.add_argument(
        "--bridge-user",
        action="append",
        default=None,
        help="an ingest bridge's user (repeat for several bridges; each must start with '_';"
        " default: _bridge)",
    )
    acl.set_defaults(handler=_mqtt_acl)

    from ingest import tools_cli  # scopemeter import FILE, scopemeter dlq list|show|replay

    tools_cli.register(sub)


def _bridge(args: Any) -> int:
    from ingest.bridge import run_bridge
    from ops import metrics

    setup_logging()
    settings = Settings()
    health = metrics.Health("mqtt", "kafka")
    metrics.serve(args.metrics_port, metrics.BRIDGE, bind=settings.metrics.bind, health=health)

    def ready() -> None:  # one JSON line on stdout: supervisors and the demo wait for it
        print(json.dumps({"event": "bridge.ready"}), flush=True)

    return run_service(
        lambda stop: run_bridge(settings, stop, client_id=args.client_id, on_ready=ready, health=health)
    )


def _writer(args: Any) -> int:
    from ingest.writer import run_writer
    from ops import metrics

    setup_logging()
    settings = Settings()
    health = metrics.Health("kafka", "db")
    metrics.serve(args.metrics_port, metrics.WRITER, bind=settings.metrics.bind, health=health)
    return run_service(
        lambda stop: run_writer(settings, stop, batch_rows_target=args.batch_rows, health=health)
    )


def _bench(args: Any) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ops.bench_ingest import run
    from ops.errors import UserError

    counts = (args.sites, args.meters, args.steps, args.rounds, args.writers, args.repeat)
    if min(counts) < 1 or args.latency_seconds <= 0:
        raise UserError(
            "--sites, --meters, --steps, --rounds, --writers, --repeat >= 1 and --latency-seconds > 0"
            " are required"
        )
    from ops import stack

    settings = Settings()
    started = stack.up(settings).started  # brokers, database and schema, as for the demo
    columns = (TextColumn("{task.description:<12}"), BarColumn(), TimeElapsedColumn())
    with contextlib.ExitStack() as cleanup, Progress(*columns, transient=True) as bar:
        if started:
            cleanup.callback(stack.down, settings)
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: float) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=1.0)
            bar.update(tasks[phase], completed=min(1.0, done))

        r = run(
            settings, sites=args.sites, meters=args.meters, steps=args.steps, rounds=args.rounds,
            latency_s=args.latency_seconds, writers=args.writers, repeat=args.repeat,
            log_dir=settings.stack.state_dir / "bench-ingest",
            progress=progress,
        )  # fmt: skip
    batch = args.meters * args.steps
    print(f"{r.readings:,} readings from {args.sites} gateways × {args.meters} meters,"
          f" {batch:,} per MQTT batch")  # fmt: skip
    for i, rep in enumerate(r.repetitions, 1):
        print(f"  pair {i}: raw COPY {rep.copy_rate:>9,.0f}/s   end to end"
              f" {rep.e2e_rate:>9,.0f}/s whole run, {rep.sustained_rate:>9,.0f}/s sustained")  # fmt: skip
    print(f"median of {len(r.repetitions)} pairs (raw COPY, then the same rows end to end; ratios are"
          " the median of the pairs' own ratios):")  # fmt: skip
    print(f"  raw binary COPY into readings   {r.copy_rate:>10,.0f} readings/s")
    print(f"  end to end, whole run           {r.e2e_rate:>10,.0f} readings/s  {r.ratio:.2f}x raw COPY"
          " (fill and drain included)")  # fmt: skip
    print(f"  end to end, sustained (10–90 %) {r.sustained_rate:>10,.0f} readings/s"
          f"  {r.sustained_ratio:.2f}x raw COPY (goal >= 0.5)")  # fmt: skip
    print(
        f"latency reading ts → ingested_at at {r.latency_rate:,.0f} readings/s ({r.latency_readings:,}):"
        f" p50 {r.p50_s * 1e3:.0f} ms, p99 {r.p99_s * 1e3:.0f} ms"
    )
    for title, phase in (("raw COPY", "copy"), ("end to end", "e2e")):
        cpu = r.cpu(phase)
        if cpu.machine_total <= 0:  # no /proc here
            continue
        total = r.readings * len(r.repetitions)
        wall = sum(rep.copy_s if phase == "copy" else rep.e2e_s for rep in r.repetitions)
        per = 100_000 / total
        print(f"CPU in the {title} phases: machine {cpu.machine_busy / cpu.machine_total:.0%} busy;"
              " core-seconds per 100k readings:")  # fmt: skip
        for name, sec in sorted(cpu.seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<15} {sec * per:6.2f}  ({sec / wall:.0%} of a core)")
        other = cpu.machine_busy - sum(cpu.seconds.values())
        print(f"  {'(rest)':<15} {other * per:6.2f}  ({other / wall:.0%} of a core)")
    return 0


def _bench_pipeline(args: Any) -> int:
    from ops import stack
    from ops.bench_pipeline import run
    from ops.errors import UserError

    if (
        min(args.sites, args.meters, args.steps, args.rounds, args.compute_workers) < 1
        or args.latency_seconds <= 0
    ):
        raise UserError(
            "--sites, --meters, --steps, --rounds, --compute-workers >= 1 and --latency-seconds > 0"
        )
    settings = Settings()
    started = stack.up(settings).started  # brokers, database and schema, as for the demo
    try:
        r = run(
            settings, sites=args.sites, meters=args.meters, steps=args.steps, rounds=args.rounds,
            latency_s=args.latency_seconds, compute_workers=args.compute_workers,
            log_dir=settings.stack.state_dir / "bench-pipeline",
        )  # fmt: skip
    finally:
        if started:
            stack.down(settings)
    print(f"{r.readings:,} readings from {args.sites} gateways × {args.meters} meters,"
          f" {args.meters * args.steps:,} per MQTT batch; {r.compute_workers} compute worker(s)")  # fmt: skip
    print(f"  raw binary COPY into readings      {r.copy_rate:>10,.0f} readings/s")
    print(f"  end to end to committed rollups    {r.e2e_rate:>10,.0f} readings/s  {r.ratio:.2f}x raw COPY"
          " (goal >= 0.5; fill and drain included)")  # fmt: skip
    print(f"latency reading ts → rollup commit at {r.latency_rate:,.0f} readings/s"
          f" ({r.latency_rounds} rounds): p50 {r.p50_s * 1e3:.0f} ms,"
          f" p99 {r.p99_s * 1e3:.0f} ms (goal p99 <= 2000 ms)")  # fmt: skip
    for line in r.cpu_lines():
        print(line)
    return 0


def _migrate(args: Any) -> int:
    import psycopg

    from ingest.db import ensure_database, migrate
    from ingest.storage import storage_info

    settings = Settings()
    created = ensure_database(settings.db.dsn, settings.db.admin_dsn)
    applied = migrate(settings.db.dsn, storage=args.storage)
    with psycopg.connect(settings.db.dsn) as conn:
        backend = storage_info(conn).backend
    print(
        f"database {'created' if created else 'exists'}; migrations applied: {applied or 'none'};"
        f" readings storage: {backend}"
    )
    return 0


def _info(_args: Any) -> int:
    import psycopg

    from ingest.storage import storage_info

    with psycopg.connect(Settings().db.dsn) as conn:
        print(json.dumps(storage_info(conn).as_dict(), indent=2))
    return 0


def _retention(_args: Any) -> int:
    import psycopg

    from ingest.storage import apply_retention

    with psycopg.connect(Settings().db.dsn) as conn:
        dropped = apply_retention(conn)
    print(f"dropped {dropped} partitions or chunks past the retention horizon")
    return 0


def _mqtt_acl(args: Any) -> int:
    from ops import stack
    from ops.mqtt_auth import BRIDGE_USER

    settings = Settings()
    files = stack.prepare_mqtt_auth(settings, args.bridge_user or [BRIDGE_USER])
    print(f"{len(files.credentials())} users; Mosquitto dynamic-security config {files.dynsec_file};"
          f" passwords (mode 0600) {files.credentials_file}")  # fmt: skip
    return 0
