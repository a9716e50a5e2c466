"""``scopemeter bench ingest`` end to end on a small load: it runs, counts exactly and reports a
consistent result. No timing threshold: the figures are for people, printed side by side."""

from __future__ import annotations

from pathlib import Path

from ingest.bench import run
from ops.cli import build_parser
from ops.settings import Settings


def test_bench_ingest_and_bench_compute_share_the_bench_command() -> None:
    parser = build_parser()
    ingest = parser.parse_args(["bench", "ingest", "--sites", "2", "--rounds", "3"])
    compute = parser.parse_args(["bench", "compute", "--meters", "5"])
    assert (ingest.bench_command, ingest.sites, ingest.rounds) == ("ingest", 2, 3)
    assert (compute.bench_command, compute.meters) == ("compute", 5)
    assert ingest.handler is not compute.handler


def test_bench_ingest_small_run_is_consistent(settings: Settings, tmp_path: Path) -> None:
    phases: set[str] = set()
    r = run(settings, sites=2, meters=10, steps=5, rounds=4, latency_s=1.0, log_dir=tmp_path,
            progress=lambda phase, _done: phases.add(phase))  # fmt: skip
    assert r.readings == 2 * 10 * 5 * 4
    assert r.copy_s > 0 and r.e2e_s > 0
    assert abs(r.ratio - (r.readings / r.e2e_s) / (r.readings / r.copy_s)) < 1e-9
    assert r.latency_readings > 0 and r.latency_readings % (2 * 10 * 5) == 0  # whole rounds, every row
    assert 0 <= r.p50_s <= r.p99_s
    assert {"warm-up", "raw COPY", "end to end", "latency"} <= phases
    # CPU per piece, measured from /proc: every process of the pipeline did work in its phase.
    assert r.cpu is not None and r.copy_cpu is not None
    assert {"bridge", "writer", "postgresql", "mosquitto", "kafka broker", "load generator"} <= set(r.cpu.seconds)
    # A run this small takes a few clock ticks (10 ms) per piece, so only the whole is sure to show.
    assert min(r.cpu.seconds.values()) >= 0 and sum(r.cpu.seconds.values()) > 0
    assert set(r.copy_cpu.seconds) == {"COPY client", "postgresql"}
    assert 0 < r.cpu.machine_busy <= r.cpu.machine_total
