"""``scopemeter demo``: the whole pipeline on embedded defaults, checked against ground truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console
from rich.table import Table

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from ingest.db import drop_database
from ops import stack
from ops.errors import UserError
from ops.pipeline import PipelineResult, run_pipeline
from ops.settings import Settings

DEMO_DB = "scopemeter_demo"
# Float32 counters (≈0.004 kWh resolution at these readings), read latency × speed, and linear
# apportionment of the few seconds an interval straddles a bucket edge: well inside these.
TOTAL_TOLERANCE = 0.001  # relative, per site over the window
BUCKET_TOLERANCE = 0.01  # relative, per 15-minute bucket


def demo_settings(base: Settings | None = None) -> Settings:
    base = base or Settings()
    params = conninfo_to_dict(base.db.dsn)
    params["dbname"] = DEMO_DB
    db = base.db.model_copy(update={"dsn": make_conninfo("", **params)})
    return base.model_copy(update={"db": db})


def prepare(settings: Settings) -> None:
    """A fresh database (the one in ``settings.db.dsn``, dropped first) with the schema, the fleet
    registry and the factor library."""
    drop_database(str(conninfo_to_dict(settings.db.dsn)["dbname"]), settings.db.admin_dsn)
    stack.prepare_database(settings)
    with psycopg.connect(settings.db.dsn) as conn:
        apply_fleet(conn, settings.config_dir / "fleet.toml")
        apply_factors(conn, settings.config_dir / "factors.toml")
        conn.commit()


def run(args: argparse.Namespace) -> int:
    console = Console()
    settings = demo_settings()
    started_at = time.monotonic()
    with console.status("starting the stack (Mosquitto, Apache Kafka, PostgreSQL)…"):
        stack.ensure_postgres(settings)
        prepare(settings)  # first: a demo database from an older schema is dropped, not migrated
        status = stack.up(settings)
    console.print(f"[bold]stack[/] up ({', '.join(status.started) or 'already running'} started); "
                  f"database [bold]{DEMO_DB}[/] prepared")
    try:
        with console.status("running the pipeline…") as spinner:

            def progress(message: str) -> None:
                console.print(message)
                spinner.update(message)

            result = run_pipeline(
                settings,
                hours=args.hours,
                speed=args.speed,
                log_dir=settings.stack.state_dir / "demo",
                progress=progress,
            )
    finally:
        if not args.keep_stack and status.started:
            stack.down(settings)
    ok = render(console, result)
    with console.status("issuing and verifying the month's signed statement…"):
        statement, verdict = issue_statement(settings, result)
    console.print(f"statement: {statement} — verify: [bold]{verdict}[/] (PDF, CSV and signed JSON beside it)")
    console.print(f"logs: {settings.stack.state_dir / 'demo'}   ({time.monotonic() - started_at:.0f} s)")
    return 0 if ok and verdict == "valid" else 1


def issue_statement(settings: Settings, result: PipelineResult) -> tuple[Path, str]:
    """Issue the supplier's statement for the window's month from the demo database, then verify it
    by recomputing from the raw readings; the key and outbox are the demo's own."""
    from datetime import UTC, datetime

    from compute.recompute import Params
    from compute.statements.config import load_statements_config
    from compute.statements.document import keygen, load_public_key, public_key_path
    from compute.statements.issue import issue_one
    from compute.statements.verify import verify_statement

    demo_dir = settings.stack.state_dir / "demo"
    cfg = load_statements_config(settings.config_dir / "statements.toml").model_copy(
        update={"signing_key": demo_dir / "keys" / "statements_ed25519.pem",
                "outbox_dir": demo_dir / "statements"}
    )
    if not cfg.key_path.exists():
        keygen(cfg.key_path)
    month = result.window[0].astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m")
    with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT supplier_id FROM sites WHERE site_id = %s", (result.site_id,)).fetchone()
        if row is None:
            raise UserError(f"site {result.site_id} is not in the fleet registry")
        supplier = row
        # A demo covers minutes of a month: the statement can only be provisional.
        issued = issue_one(conn, cfg, supplier[0], month, now=datetime.now(UTC),
                           params=Params.from_settings(settings.compute), force=True, provisional=True)
        if issued.directory is None:
            raise UserError(f"no statement for {supplier[0]} {month}: {'; '.join(issued.reasons)}")
        statement = issued.directory / "statement.json"
        [verdict] = verify_statement(conn, [statement], load_public_key(public_key_path(cfg.key_path)), cfg)
    return issued.directory / "statement.pdf", verdict.status


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


def render(console: Console, r: PipelineResult) -> bool:
    tz = ZoneInfo("Asia/Shanghai")
    table = Table(title=f"{r.site_id}: electricity per 15 min, location-based Scope 2 (Asia/Shanghai)")
    for col in ("bucket", "kWh", "truth kWh", "Δ", "kgCO2e", "load"):
        table.add_column(col, justify="left" if col in ("bucket", "load") else "right", no_wrap=True)
    peak = max((b.truth_kwh for b in r.buckets), default=1.0) or 1.0
    bad_buckets = 0
    for b in r.buckets:
        rel = _rel(b.kwh, b.truth_kwh)
        bad_buckets += rel > BUCKET_TOLERANCE
        table.add_row(
            b.bucket.astimezone(tz).strftime("%a %m-%d %H:%M"),
            f"{b.kwh:,.3f}",
            f"{b.truth_kwh:,.3f}",
            f"{rel:.3%}",
            "—" if b.kg_co2e is None else f"{b.kg_co2e:,.2f}",
            "█" * round(16 * b.kwh / peak),
        )
    console.print(table)

    counts_ok = r.readings_produced == r.readings_published == r.readings_in_db and r.dead_letters == 0
    total_rel = _rel(r.kwh, r.truth_kwh)
    truth_kg = r.truth_kg_co2e
    kg_ok = truth_kg is not None and _rel(r.kg_co2e, truth_kg) <= TOTAL_TOLERANCE
    totals = Table(title="site totals over the window", show_header=True)
    for col in ("", "pipeline", "simulator truth", "Δ"):
        totals.add_column(col, justify="right")
    totals.add_row("readings", f"{r.readings_in_db:,} in DB", f"{r.readings_produced:,} produced",
                   f"{r.readings_in_db - r.readings_produced:+,}")
    totals.add_row("electricity kWh", f"{r.kwh:,.3f}", f"{r.truth_kwh:,.3f}", f"{total_rel:.4%}")
    totals.add_row("Scope 2 kgCO2e (location)", f"{r.kg_co2e:,.3f}",
                   "—" if truth_kg is None else f"{truth_kg:,.3f}",
                   "—" if truth_kg is None else f"{_rel(r.kg_co2e, truth_kg):.4%}")
    console.print(totals)
    console.print(f"factor: {', '.join(r.factor_ids) or 'none'} ({r.factor_kg_per_kwh} kgCO2e/kWh); "
                  f"readings published {r.readings_published:,}, dead letters {r.dead_letters}")
    ok = counts_ok and total_rel <= TOTAL_TOLERANCE and kg_ok and bad_buckets == 0
    verdict = "[bold green]MATCH[/]" if ok else "[bold red]MISMATCH[/]"
    console.print(f"{verdict}: every reading delivered exactly once; energy and emissions within "
                  f"{TOTAL_TOLERANCE:.1%} of the simulator's ground truth over the window "
                  f"({bad_buckets} of {len(r.buckets)} buckets beyond {BUCKET_TOLERANCE:.0%})")
    return ok
