"""``scopemeter bench pipeline`` on a small load: every reading reaches committed rollups through
the real processes, and the report is consistent. No timing threshold: the figures are for people."""

from __future__ import annotations

from pathlib import Path

import psycopg

from ingest.loadgen import Fleet
from ops.bench_pipeline import expected_kwh, fleet_kwh, run
from ops.cli import build_parser
from ops.settings import Settings


def test_bench_pipeline_is_a_bench_command() -> None:
    args = build_parser().parse_args(["bench", "pipeline", "--sites", "2", "--compute-workers", "2"])
    assert (args.bench_command, args.sites, args.compute_workers) == ("pipeline", 2, 2)


def test_bench_pipeline_small_run_reaches_rollups_and_cleans_up(settings: Settings, tmp_path: Path) -> None:
    phases: set[str] = set()
    r = run(settings, sites=2, meters=5, steps=4, rounds=3, latency_s=1.5, compute_workers=2,
            log_dir=tmp_path, progress=lambda phase, _done: phases.add(phase))  # fmt: skip
    assert r.readings == 2 * 5 * 4 * 3 and r.compute_workers == 2
    assert r.copy_s > 0 and r.e2e_s > 0 and r.ratio == r.e2e_rate / r.copy_rate
    assert r.latency_rounds >= 1 and 0 <= r.p50_s <= r.p99_s
    assert {"warm-up", "raw COPY", "end to end", "latency"} <= phases
    # CPU per piece, the compute's and the writer's PostgreSQL backends found by their session name
    assert {"compute", "writer", "compute's DB", "writer's DB"} <= set(r.cpu.seconds)
    assert any(line.lstrip().startswith("compute's DB") for line in r.cpu_lines())
    with psycopg.connect(settings.db.dsn) as conn:  # the run's rows are gone again
        left = conn.execute("SELECT count(*) FROM readings WHERE meter_id LIKE 'bench%'").fetchone()
    assert left == (0,)


def test_fleet_energy_is_what_the_counters_add_up_to(settings: Settings) -> None:
    fleet = Fleet.fresh(2, 3, label="bp")
    assert expected_kwh(fleet, 1) == 0.0 and expected_kwh(fleet, 5) == 2 * 3 * 0.25 * 4
    with psycopg.connect(settings.db.dsn) as conn:
        assert fleet_kwh(conn, fleet) == 0.0  # nothing of a fresh fleet is in the rollups
