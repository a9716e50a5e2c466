"""``scopemeter import FILE``, ``scopemeter dlq list|show|replay`` and ``scopemeter sparkplug host``
(registered by ``ingest.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import csv
from pathlib import Path
from typing import Any

from ops.settings import Settings

SHOWN_PER_REASON = 5


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = sub.add_parser(
        "import",
        help="import a meter-data export (interval kWh or register reads, CSV) into readings",
        description="Rows are checked against the fleet registry and the wire contract; the live"
        " time window does not apply (backfill of any age). Re-importing a file is a no-op.",
    )
    imp.add_argument("file", type=Path, nargs="?", help="the CSV export")
    imp.add_argument(
        "--preset", default=None, help="layout in config/import/ (default interval-end; --list-presets)"
    )
    imp.add_argument("--mapping", type=Path, default=None, help="a mapping TOML file instead of a preset")
    imp.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    imp.add_argument("--meter", default=None, help="the meter id when the layout has no meter column")
    imp.add_argument("--site", default=None, help="refuse meters registered to another site")
    imp.add_argument("--timezone", default=None, help="zone of local stamps (default: the meter's site)")
    imp.add_argument(
        "--stamp", choices=("start", "end"), default=None, help="interval stamped at its start or end"
    )
    imp.add_argument(
        "--interval-minutes", type=int, default=None, help="interval length (overrides the mapping)"
    )
    imp.add_argument(
        "--quantity", default=None, help="e.g. energy_export_kwh, gas_m3 (default: the mapping's)"
    )
    imp.add_argument(
        "--opening", type=float, default=0.0, help="counter before the first interval (default 0)"
    )
    imp.add_argument("--rejects", type=Path, default=None, help="write every rejected row (CSV) here")
    imp.add_argument("--dry-run", action="store_true", help="check and count, store nothing")
    imp.add_argument("--no-notify", action="store_true", help="do not tell the compute worker (Kafka)")
    imp.set_defaults(handler=_import)

    dlq = sub.add_parser("dlq", help="read and replay the dead-letter queue (readings.dlq.v1)")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    lst = dsub.add_parser("list", help="count letters per reason and list them")
    show = dsub.add_parser("show", help="one letter: reason, detail, topic, payload")
    rep = dsub.add_parser("replay", help="send letters' original bytes through the bridge's checks again")
    for p in (lst, rep):
        p.add_argument("--reason", action="append", default=None, help="only this reason (repeatable)")
        p.add_argument("--topic-contains", default=None, help="only letters whose MQTT topic contains this")
    lst.add_argument("--limit", type=int, default=20, help="letters listed after the counts (0: none)")
    lst.set_defaults(handler=_dlq_list)
    show.add_argument("id", help="PARTITION:OFFSET as `dlq list` prints it")
    show.add_argument("--bytes", type=int, default=512, help="payload bytes shown (default 512)")
    show.set_defaults(handler=_dlq_show)
    rep.add_argument("--id", action="append", default=None, help="only PARTITION:OFFSET (repeatable)")
    rep.add_argument("--dry-run", action="store_true", help="say what would pass, send nothing")
    rep.set_defaults(handler=_dlq_replay)

    spb = sub.add_parser("sparkplug", help="Sparkplug B host application (third-party gateways)")
    ssub = spb.add_subparsers(dest="sparkplug_command", required=True, metavar="PROCESS")
    host = ssub.add_parser("host", help="subscribe spBv1.0/GROUP/#, map metrics to meters, feed Kafka")
    host.add_argument(
        "--group", action="append", default=None,
        help="Sparkplug group id (repeatable; default: every group the mapping names)",
    )
    host.add_argument("--host-id", default="scopemeter", help="sparkplug_host_id of the STATE topic")
    host.add_argument(
        "--mapping", type=Path, default=None,
        help="a fleet registry file whose [sparkplug] table maps nodes and metrics"
        " (default: CONFIG_DIR/fleet.toml)",
    )
    host.add_argument("--metrics-port", type=int, default=9104, help="0 disables /metrics")
    host.set_defaults(handler=_sparkplug_host)


def _import(args: Any) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edge.wire import Quantity
    from ingest.importer import load_mapping, notify_compute, presets, run_import
    from ops.errors import UserError

    if args.list_presets:
        for name, text in presets().items():
            print(f"{name:<16} {text}")
        return 0
    if args.file is None:
        raise UserError("name the FILE to import (or --list-presets)")
    mapping = load_mapping(args.preset, args.mapping)
    update: dict[str, Any] = {}
    if args.stamp:
        update["stamp"] = args.stamp
    if args.interval_minutes:
        update["interval_minutes"] = args.interval_minutes
    if args.quantity:
        try:
            update["quantity"] = Quantity(args.quantity)
        except ValueError:
            raise UserError(f"--quantity: one of {[q.value for q in Quantity]}") from None
    mapping = mapping.model_copy(update=update)
    settings = Settings()
    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        r = run_import(
            args.file, settings.db.dsn, mapping, meter=args.meter, timezone=args.timezone, site=args.site,
            opening=args.opening, dry_run=args.dry_run, progress=progress,
        )  # fmt: skip
    out = Console(highlight=False, soft_wrap=True)  # a FILE:LINE message stays on one line
    rejected = r.rejected_by_reason()
    out.print(f"[bold]{r.path}[/] sha256 {r.sha256[:16]}… ({'dry run' if args.dry_run else 'imported'})")
    out.print(f"  rows read      {r.rows_read:>10,}")
    out.print(f"  rows rejected  {sum(rejected.values()):>10,}")
    out.print(f"  readings       {r.readings_offered:>10,}  from {len(r.meters)} meters")
    if not args.dry_run:
        out.print(f"  stored         {r.readings_stored:>10,}")
        out.print(f"  duplicate      {r.readings_duplicate:>10,}  (already stored: re-import is a no-op)")
    for reason, n in rejected.most_common():
        out.print(f"  [red]{reason}[/]: {n:,} rows")
        for rej in [x for x in r.rejections if x.reason.value == reason][:SHOWN_PER_REASON]:
            out.print(f"    {r.path}:{rej.line}: {rej.detail}")
    if args.rejects is not None:
        with args.rejects.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "line", "reason", "detail"])
            w.writerows([str(r.path), x.line, x.reason.value, x.detail] for x in r.rejections)
        out.print(f"  every rejected row: {args.rejects}")
    if r.readings_stored and not args.no_notify:
        try:
            asyncio.run(notify_compute(settings.kafka, settings.kafka.committed_topic, r.dirty))
            out.print(f"  compute notified ({len(r.dirty)} dirty ranges on {settings.kafka.committed_topic})")
        except Exception as exc:  # the readings are stored; only the notice failed
            out.print(f"  [yellow]compute not notified ({exc}); run `scopemeter compute rebuild`[/]")
    return 1 if rejected else 0


def _dlq_list(args: Any) -> int:
    from ingest.dlq_tools import read_letters, summarize

    letters = read_letters(Settings(), reasons=args.reason, topic_contains=args.topic_contains)
    print(summarize(letters, limit=args.limit))
    return 0


def _dlq_show(args: Any) -> int:
    from ingest.dlq_tools import describe, find_letter

    print(describe(find_letter(Settings(), args.id), show_bytes=args.bytes))
    return 0


def _dlq_replay(args: Any) -> int:
    from ingest.dlq_tools import read_letters, replay

    settings = Settings()
    letters = read_letters(settings, reasons=args.reason, topic_contains=args.topic_contains, ids=args.id)
    result = asyncio.run(replay(settings, letters, dry_run=args.dry_run))
    print(result.summary(dry_run=args.dry_run))
    return 0 if not result.refused else 1


def _sparkplug_host(args: Any) -> int:
    import json

    from ingest.sparkplug.host import listen_groups, load_map, run_host
    from ops import metrics
    from ops.runtime import run_service, setup_logging

    setup_logging()
    settings = Settings()
    # The host is a bridge for Sparkplug traffic: it counts on the bridge's registry.
    metrics.serve(args.metrics_port, metrics.BRIDGE, bind=settings.metrics.bind)
    source = args.mapping or settings.config_dir / "fleet.toml"
    mapping = load_map(source)
    groups = listen_groups(mapping, args.group, source)

    def ready(_host: Any) -> None:
        print(json.dumps({"event": "sparkplug.ready", "groups": groups}), flush=True)

    async def main(stop: asyncio.Event) -> None:
        await run_host(settings, stop, groups=groups, host_id=args.host_id, mapping=mapping, on_ready=ready)

    return run_service(main)
