"""``scopemeter bench ingest`` end to end on a small load: it runs, counts exactly and reports a
consistent result. No timing threshold: the figures are for people, printed side by side."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from ops.bench_ingest import run, sustained
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
    r = run(settings, sites=2, meters=10, steps=5, rounds=4, latency_s=1.0, repeat=3, log_dir=tmp_path,
            progress=lambda phase, _done: phases.add(phase))  # fmt: skip
    assert r.readings == 2 * 10 * 5 * 4 and len(r.repetitions) == 3
    assert all(rep.copy_s > 0 and rep.e2e_s > 0 for rep in r.repetitions)
    # Rates and ratios are medians over the pairs, each pair's ratio from its own two phases.
    ratios = sorted(rep.copy_s / rep.e2e_s for rep in r.repetitions)
    assert abs(r.ratio - ratios[1]) < 1e-12
    assert abs(r.e2e_rate - sorted(r.readings / rep.e2e_s for rep in r.repetitions)[1]) < 1e-6
    assert r.latency_readings > 0 and r.latency_readings % (2 * 10 * 5) == 0  # whole rounds, every row
    assert 0 <= r.p50_s <= r.p99_s
    assert {"warm-up", "raw COPY 1/3", "end to end 3/3", "latency"} <= phases
    # CPU per piece, measured from /proc: every process of the pipeline did work in its phase.
    e2e, copy = r.cpu("e2e"), r.cpu("copy")
    assert e2e is not None and copy is not None
    pieces = {"bridge", "writer", "postgresql", "mosquitto", "kafka broker", "load generator"}
    assert pieces <= set(e2e.seconds)
    # A run this small takes a few clock ticks (10 ms) per piece, so only the whole is sure to show;
    # and the pieces are part of the machine's busy time, so they cannot add up to more than it (a
    # process counted many times over, or ticks taken for seconds, would). Slack: each process's
    # delta may round up by two 10 ms ticks (utime, stime); 0.5 s covers 25 processes.
    assert sum(e2e.seconds.values()) > 0
    assert sum(e2e.seconds.values()) <= e2e.machine_busy + 0.5
    assert set(copy.seconds) == {"COPY client", "postgresql"}
    assert 0 < e2e.machine_busy <= e2e.machine_total


def test_sustained_rate_leaves_out_fill_and_drain() -> None:
    t0 = datetime(2026, 11, 23, tzinfo=UTC)
    # Ten transactions of 100 rows one second apart: the steady part is between the transaction
    # that reaches 10 % (the first) and the one that reaches 90 % (the ninth): 8 of them in 8 s.
    steady = [(t0 + timedelta(seconds=i), 100) for i in range(10)]
    assert sustained(steady) == (800, 8.0)
    # A late last transaction (the drain) does not change it; a stall in the middle does.
    late_drain = [*steady[:9], (t0 + timedelta(seconds=60), 100)]
    assert sustained(late_drain) == (800, 8.0)
    stall = [*steady[:5], *[(t + timedelta(seconds=4), n) for t, n in steady[5:]]]
    assert sustained(stall) == (800, 12.0)
    assert sustained([(t0, 1000)]) == (0, 0.0)  # one transaction: nothing to measure
