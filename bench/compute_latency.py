"""Latency from a reading's DB commit to its rollup's commit, through the compute worker's own code.

A writer thread inserts one reading per meter per batch (many sites, many meters, the clock
advancing ``--step`` seconds per batch) into a fresh database and commits; it hands the batch's
dirty ranges (``ingest.writer.dirty_ranges``, what the real writer publishes) to the worker loop,
which does what ``compute.worker.run_worker`` does per poll: take everything queued, coalesce,
``recompute_many`` (one set-based ``recompute_set`` per poll). Latency per batch = rollup commit
time − reading commit time. Kafka is left out on purpose: this measures compute under load, not
the broker (``scopemeter bench pipeline`` measures the whole chain). The README table is

    for m in 10 50 250; do   # 200, 1,000 and 5,000 meters
        .venv/bin/python bench/compute_latency.py --sites 20 --meters $m --batches 150 --interval 0.1
    done
"""

from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from rich.progress import track

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.recompute import Params
from compute.worker import coalesce, recompute_many
from ingest.db import drop_database, ensure_database, migrate
from ingest.events import DirtyRange
from ingest.writer import dirty_ranges
from ops.settings import REPO_ROOT, Settings

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def fleet_toml(sites: int, meters: int) -> str:
    parts = ['[[suppliers]]\nid = "bench"\nname = "Bench"\n']
    for s in range(sites):
        parts.append(
            f'[[sites]]\nid = "s{s}"\nsupplier = "bench"\nname = "Site {s}"\n'
            'grid_region = "CN"\ntimezone = "Asia/Shanghai"\n'
        )
        for m in range(meters):
            parts.append(
                f'[[meters]]\nid = "s{s}-m{m}"\nsite = "s{s}"\n'
                'carrier = "electricity"\nmodel = "eastron_sdm630"\n'
            )
    return "\n".join(parts)


def writer(
    dsn: str,
    sites: int,
    meters: int,
    batches: int,
    interval: float,
    step: float,
    out: queue.Queue[tuple[float, list[DirtyRange]] | None],
) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (T0, T0 + timedelta(days=40)))
        conn.commit()
        for b in range(batches):
            ts = T0 + timedelta(seconds=b * step)
            rows = [
                (f"s{s}-m{m}", "energy_import_kwh", ts, 1000.0 + b * (1 + m % 5), 0, f"s{s}", "gw", b)
                for s in range(sites)
                for m in range(meters)
            ]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO readings (meter_id, quantity, ts, value, quality, site_id, gateway_id,"
                    " batch_seq) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    rows,
                )
            conn.commit()
            out.put((time.perf_counter(), dirty_ranges(rows)))
            time.sleep(interval)
    out.put(None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--meters", type=int, default=10, help="per site")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.1, help="wall seconds between writer commits")
    ap.add_argument("--step", type=float, default=30.0, help="simulated seconds between readings")
    args = ap.parse_args()

    settings = Settings()
    name = f"scopemeter_bench_{uuid.uuid4().hex[:8]}"
    dsn = make_conninfo(settings.db.admin_dsn, dbname=name)
    ensure_database(dsn, settings.db.admin_dsn)
    try:
        migrate(dsn)
        with tempfile.TemporaryDirectory() as tmp, psycopg.connect(dsn) as conn:
            fleet = Path(tmp) / "fleet.toml"
            fleet.write_text(fleet_toml(args.sites, args.meters))
            apply_fleet(conn, fleet)
            apply_factors(conn, REPO_ROOT / "config" / "factors.toml")
        q: queue.Queue[tuple[float, list[DirtyRange]] | None] = queue.Queue()
        t = threading.Thread(
            target=writer, args=(dsn, args.sites, args.meters, args.batches, args.interval, args.step, q)
        )
        latencies: list[float] = []
        polls = 0
        params = Params.from_settings(settings.compute)
        with psycopg.connect(dsn) as conn:
            t.start()
            done = False
            progress = iter(track(range(args.batches), description="batches"))
            while not done:
                items = [q.get()]
                while True:  # a poll takes everything already there
                    try:
                        items.append(q.get_nowait())
                    except queue.Empty:
                        break
                if items[-1] is None:
                    done = True
                batch = [i for i in items if i is not None]
                if not batch:
                    continue
                recompute_many(conn, ranges=coalesce(r for _, ranges in batch for r in ranges), params=params)
                now = time.perf_counter()
                latencies += [now - committed for committed, _ in batch]
                polls += 1
                for _ in batch:
                    next(progress, None)
            for _ in progress:
                pass
            t.join()
            rollups: Any = conn.execute("SELECT count(*) FROM site_rollups_15m").fetchone()
    finally:
        drop_database(name, settings.db.admin_dsn)
    qs = statistics.quantiles(latencies, n=100)
    meters = args.sites * args.meters
    print(
        f"{len(latencies)} batches × {meters} meters ({args.sites} sites),"
        f" one commit every {args.interval}s; "
        f"{polls} worker polls; {rollups[0]} rollup rows"
    )
    print(
        f"commit → rollup latency: p50 {qs[49] * 1e3:.1f} ms, p99 {qs[98] * 1e3:.1f} ms, "
        f"max {max(latencies) * 1e3:.1f} ms (goal p99 <= 2000 ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
