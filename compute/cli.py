"""``scopemeter fleet|factors|activity apply``, ``compute run|rebuild`` and ``bench compute``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ops.runtime import run_service, setup_logging
from ops.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = sub.add_parser("fleet", help="fleet registry: suppliers, sites, gateways, meters")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    fapply = fsub.add_parser("apply", help="validate the fleet file and upsert it into the database")
    fapply.add_argument("path", nargs="?", type=Path, help="default: CONFIG_DIR/fleet.toml")
    fapply.set_defaults(handler=_fleet_apply)

    factors = sub.add_parser("factors", help="emission factor library")
    xsub = factors.add_subparsers(dest="factors_command", required=True, metavar="ACTION")
    xapply = xsub.add_parser("apply", help="validate the factor file and upsert it into the database")
    xapply.add_argument("path", nargs="?", type=Path, help="default: CONFIG_DIR/factors.toml")
    xapply.set_defaults(handler=_factors_apply)

    instruments = sub.add_parser("instruments", help="contractual instruments for market-based Scope 2")
    isub = instruments.add_subparsers(dest="instruments_command", required=True, metavar="ACTION")
    iapply = isub.add_parser(
        "apply", help="validate the instrument ledger, make the DB equal it and re-allocate claims"
    )
    iapply.add_argument("path", nargs="?", type=Path, help="default: CONFIG_DIR/instruments.toml")
    iapply.set_defaults(handler=_instruments_apply)

    activity = sub.add_parser(
        "activity", help="non-metered activity: refrigerants, fuel invoices, generation"
    )
    asub = activity.add_subparsers(dest="activity_command", required=True, metavar="ACTION")
    aapply = asub.add_parser("apply", help="validate the activity file (TOML or CSV), compute and upsert it")
    aapply.add_argument("path", nargs="?", type=Path, help="default: CONFIG_DIR/activity.toml")
    aapply.set_defaults(handler=_activity_apply)

    compute = sub.add_parser("compute", help="readings → 15-minute energy and emissions rollups")
    csub = compute.add_subparsers(dest="compute_command", required=True, metavar="ACTION")
    run = csub.add_parser("run", help="consume dirty ranges from Kafka and recompute them")
    run.add_argument("--metrics-port", type=int, default=9103, help="/metrics and /healthz port (0: off)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=_run)
    rebuild = csub.add_parser(
        "rebuild", help="recompute every rollup from all readings (after factor or fleet changes)"
    )
    rebuild.set_defaults(handler=_rebuild)

    bench = bench_subparsers(sub).add_parser(
        "compute", help="numba rollup vs the same rollup in pandas, measured side by side"
    )
    bench.add_argument("--meters", type=int, default=200)
    bench.add_argument("--readings", type=int, default=2_880, help="readings per meter")
    bench.add_argument("--repeat", type=int, default=3, help="best of N runs each")
    bench.set_defaults(handler=_bench)
    rebuild_bench = bench_subparsers(sub).add_parser(
        "rebuild", help="`compute rebuild` of a year of 15-minute data vs raw COPY-out of the same rows"
    )
    rebuild_bench.add_argument("--sites", type=int, default=10)
    rebuild_bench.add_argument("--meters", type=int, default=10, help="meters per site")
    rebuild_bench.add_argument("--readings", type=int, default=35_040, help="readings per meter (a year)")
    rebuild_bench.add_argument("--repeat", type=int, default=3, help="pairs measured; medians printed")
    rebuild_bench.set_defaults(handler=_bench_rebuild)


def bench_subparsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The ``scopemeter bench`` sub-command's own sub-parsers, creating ``bench`` if no other
    package did yet: every package adds ``bench <what>`` through this, whichever registers first."""
    parser = sub.choices.get("bench")
    if parser is None:
        parser = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
        return parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")


def _bench(args: Any) -> int:
    from compute.benchmark import run
    from ops.errors import UserError

    if args.meters < 1 or args.readings < 2 or args.repeat < 1:
        raise UserError("--meters >= 1, --readings >= 2 and --repeat >= 1 are required")
    r = run(args.meters, args.readings, args.repeat)
    print(
        f"rollup of {r.readings:,} readings ({args.meters} meters) into 15-min site buckets,"
        f" best of {args.repeat}"
    )
    print(f"numba  {r.numba_s * 1e3:9.2f} ms  {r.readings / r.numba_s / 1e6:8.1f} M readings/s")
    print(f"pandas {r.pandas_s * 1e3:9.2f} ms  {r.readings / r.pandas_s / 1e6:8.1f} M readings/s")
    print(f"numba is {r.ratio:.1f}x pandas (goal >= 10x)")
    return 0


def _connect(settings: Settings) -> Any:
    import psycopg

    return psycopg.connect(settings.db.dsn)


def _fleet_apply(args: Any) -> int:
    from compute.fleet import apply_fleet, load_fleet

    settings = Settings()
    path = args.path or settings.config_dir / "fleet.toml"
    load_fleet(path)  # a bad file is reported before touching the database
    with _connect(settings) as conn:
        result = apply_fleet(conn, path)
    for table, inserted in result.inserted.items():
        extra = result.not_in_file[table]
        note = f"; in the database but not in the file: {', '.join(extra)}" if extra else ""
        print(f"{table}: {inserted} inserted, {result.updated[table]} updated{note}")
    return 0


def _activity_apply(args: Any) -> int:
    from compute.activity import apply_activity, load_activity

    settings = Settings()
    path = args.path or settings.config_dir / "activity.toml"
    load_activity(path)  # a bad file is reported before touching the database
    with _connect(settings) as conn:
        result = apply_activity(conn, path, settings.compute.fuel_factor_series)
    print(f"activity {path}: {result.written} records written")
    for line in result.refused:
        print(f"  refused (no emissions): {line}")
    if result.not_in_file:
        print(f"  in the database but not in the file (kept): {', '.join(result.not_in_file)}")
    return 0


def _factors_apply(args: Any) -> int:
    from compute.factors import apply_factors, load_factors

    settings = Settings()
    path = args.path or settings.config_dir / "factors.toml"
    load_factors(path)  # a bad file is reported before touching the database
    with _connect(settings) as conn:
        result = apply_factors(conn, path)
    print(
        f"emission_factors: {result.inserted} inserted, {result.updated} updated, "
        f"{result.unchanged} unchanged"
    )
    if result.inserted or result.updated:
        print("existing rollups keep their factors until `scopemeter compute rebuild`")
    return 0


def _instruments_apply(args: Any) -> int:
    from compute.market import apply_instruments, load_instruments

    settings = Settings()
    path = args.path or settings.config_dir / "instruments.toml"
    load_instruments(path)  # a bad file is reported before touching the database
    with _connect(settings) as conn:
        r = apply_instruments(conn, path)
    retracted = f" (retracted with their claims: {', '.join(r.retracted)})" if r.retracted else ""
    print(
        f"contractual_instruments: {r.upserted} applied, {len(r.retracted)} retracted{retracted};"
        f" claims re-allocated for {len(r.sites)} sites"
    )
    return 0


def _run(args: Any) -> int:
    from compute.worker import run_worker
    from ops import metrics

    setup_logging(args.verbose)
    settings = Settings()
    health = metrics.Health("kafka", "db")
    metrics.serve(args.metrics_port, metrics.COMPUTE, bind=settings.metrics.bind, health=health)
    return run_service(lambda stop: run_worker(settings, stop, health=health))


def _bench_rebuild(args: Any) -> int:
    from compute.benchmark import run_rebuild
    from ops.errors import UserError

    if args.sites < 1 or args.meters < 1 or args.readings < 2 or args.repeat < 1:
        raise UserError("--sites, --meters, --repeat >= 1 and --readings >= 2 are required")
    r = run_rebuild(
        Settings(), sites=args.sites, meters_per_site=args.meters, readings=args.readings, repeat=args.repeat
    )
    print(
        f"compute rebuild of {r.readings:,} readings ({args.sites * args.meters} meters):"
        f" {r.buckets:,} meter buckets, {r.rollups:,} site rollups; medians of {args.repeat}"
    )
    rows = [
        ("raw binary COPY-out of the readings", r.copy_out_rate),
        ("raw binary COPY-in of the meter rows", r.copy_in_rate),
        ("compute rebuild, meter rows written", r.written_rate),
        ("compute rebuild, meter rows unchanged", r.rebuild_rate),
    ]
    for label, rate in rows:
        print(f"{label:<40} {r.readings / rate:7.2f} s  {rate / 1e6:6.2f} M readings/s")
    print(
        f"rebuild with unchanged meter rows (a factor change) is {r.rebuild_rate / r.copy_out_rate:.2f}x"
        " raw COPY-out (goal: >= 1 M readings/s)"
    )
    for label, phases in (("written", r.written_phases), ("unchanged", r.phases)):
        print(f"last rebuild, meter rows {label}, seconds per step: " + ", ".join(
            f"{k} {v:.2f}" for k, v in phases.items()
        ))  # fmt: skip
    return 0


def _rebuild(_args: Any) -> int:
    from compute.rebuild import recompute_all
    from compute.recompute import Params

    settings = Settings()
    with _connect(settings) as conn:
        r = recompute_all(conn, Params.from_settings(settings.compute))
    events = ", ".join(f"{v} {k}" for k, v in r.events.items() if v) or "no counter events"
    print(f"rebuilt {r.meters} meters: {r.buckets} meter buckets, {r.rollups} site rollups; {events}")
    return 0
