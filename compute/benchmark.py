"""``scopemeter bench compute``: the numba rollup vs. the same rollup in pandas, in one run; and
``scopemeter bench rebuild``: ``compute rebuild`` of a year of 15-minute data against raw binary
COPY-out of the same rows, in one run.

Both turn the cumulative counters of many meters into per-site 15-minute energy (total and the
estimated part from gaps) with linear apportionment across bucket boundaries. pandas does it the
idiomatic vectorised way: ``groupby().diff()`` for deltas, one row per (interval, bucket) piece via
``np.repeat``, then ``groupby().sum()``. Results are checked equal before any time is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import psycopg
from psycopg.conninfo import make_conninfo

from compute.kernels import BUCKET_MS, rollup_sites
from ops.settings import Settings

T0_MS = 1_793_000_000_000


@dataclass(frozen=True)
class Fleet:
    meter: np.ndarray  # int64 meter index per reading, readings grouped by meter and sorted by ts
    site: np.ndarray  # int64 site index per reading
    ts: np.ndarray
    value: np.ndarray
    bounds: np.ndarray  # reading offsets per meter, len = meters + 1


def synthetic(meters: int, readings_per_meter: int, meters_per_site: int = 10, seed: int = 1) -> Fleet:
    """Irregular ~30 s polls with occasional long gaps; counters with varying load."""
    rng = np.random.default_rng(seed)
    step = rng.choice(
        [30_000, 31_000, 29_000, 20 * 60_000], p=[0.4, 0.3, 0.299, 0.001], size=(meters, readings_per_meter)
    )
    ts = T0_MS + np.cumsum(step, axis=1) + rng.integers(0, 1000, size=(meters, 1))
    value = 1000.0 + np.cumsum(rng.random((meters, readings_per_meter)) * 2.0, axis=1)
    meter = np.repeat(np.arange(meters, dtype=np.int64), readings_per_meter)
    bounds = np.arange(0, meters * readings_per_meter + 1, readings_per_meter, dtype=np.int64)
    return Fleet(meter, meter // meters_per_site, ts.ravel().astype(np.int64), value.ravel(), bounds)


Rollup = dict[tuple[int, int], tuple[float, float]]  # (site, bucket start ms) → (kwh, kwh_estimated)


@dataclass(frozen=True)
class Grid:
    first: int  # start of bucket 0, epoch ms
    kwh: np.ndarray  # [site, bucket]
    est: np.ndarray


def rollup_numba(f: Fleet, max_gap_ms: int) -> Grid:
    meters = len(f.bounds) - 1
    first = int(f.ts.min()) // BUCKET_MS * BUCKET_MS
    nb = (-(-int(f.ts.max()) // BUCKET_MS) * BUCKET_MS - first) // BUCKET_MS
    site_of_meter = f.site[f.bounds[:-1]]
    kwh, est = rollup_sites(
        f.bounds,
        site_of_meter,
        int(site_of_meter.max()) + 1,
        f.ts,
        f.value,
        np.zeros_like(f.ts),
        np.zeros(meters),
        np.full(meters, max_gap_ms, dtype=np.int64),
        BUCKET_MS,
        first,
        nb,
        np.zeros(meters),  # max_kw: no per-meter bound
    )
    return Grid(first, kwh, est)


def rollup_pandas(f: Fleet, max_gap_ms: int) -> Rollup:
    df = pd.DataFrame({"meter": f.meter, "site": f.site, "ts": f.ts, "value": f.value})
    g = df.groupby("meter", sort=False)
    df["t1"] = g["ts"].shift(-1)
    df["d"] = g["value"].diff().shift(-1)
    iv = df.dropna(subset=["t1"]).copy()
    iv["t1"] = iv["t1"].astype("int64")
    iv["d"] = iv["d"].clip(lower=0.0)  # a backwards step contributes nothing
    iv["est"] = (iv["t1"] - iv["ts"]) > max_gap_ms
    k0 = iv["ts"].to_numpy() // BUCKET_MS
    k1 = np.maximum((iv["t1"].to_numpy() - 1) // BUCKET_MS, k0)
    n = k1 - k0 + 1
    rep = np.repeat(np.arange(len(iv)), n)
    piece = np.arange(len(rep)) - np.repeat(np.cumsum(n) - n, n)
    start = (k0[rep] + piece) * BUCKET_MS
    s, e = iv["ts"].to_numpy()[rep], iv["t1"].to_numpy()[rep]
    dur = (e - s).astype(np.float64)
    overlap = np.minimum(e, start + BUCKET_MS) - np.maximum(s, start)
    d = iv["d"].to_numpy()[rep]
    kwh = np.where(dur > 0, d * overlap / np.where(dur > 0, dur, 1.0), d)
    pieces = pd.DataFrame(
        {
            "site": iv["site"].to_numpy()[rep],
            "bucket": start,
            "kwh": kwh,
            "est": np.where(iv["est"].to_numpy()[rep], kwh, 0.0),
        }
    )
    sums = pieces.groupby(["site", "bucket"], sort=False)[["kwh", "est"]].sum()
    return {
        (int(a), int(b)): (float(k), float(x))
        for (a, b), k, x in zip(sums.index, sums["kwh"], sums["est"], strict=True)
    }


def check_equal(grid: Grid, ref: Rollup) -> None:
    """Every (site, bucket) pandas produced has the same energy in the grid, and nothing else does."""
    for (site, start), (k, x) in ref.items():
        col = (start - grid.first) // BUCKET_MS
        k2, x2 = grid.kwh[site, col], grid.est[site, col]
        if not (np.isclose(k, k2, rtol=1e-9, atol=1e-9) and np.isclose(x, x2, rtol=1e-9, atol=1e-9)):
            raise AssertionError(f"site {site} bucket {start}: pandas {k, x} vs numba {k2, x2}")
    total = sum(k for k, _ in ref.values())
    if not np.isclose(grid.kwh.sum(), total, rtol=1e-9):
        raise AssertionError(f"total energy: numba {grid.kwh.sum()} vs pandas {total}")


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@dataclass(frozen=True)
class BenchResult:
    readings: int
    numba_s: float
    pandas_s: float

    @property
    def ratio(self) -> float:
        return self.pandas_s / self.numba_s


def run(meters: int = 200, readings_per_meter: int = 2_880, repeat: int = 3) -> BenchResult:
    f = synthetic(meters, readings_per_meter)
    gap = BUCKET_MS
    check_equal(rollup_numba(f, gap), rollup_pandas(f, gap))  # also compiles/warms both paths
    numba_s = best_of(lambda: rollup_numba(f, gap), repeat)
    pandas_s = best_of(lambda: rollup_pandas(f, gap), repeat)
    return BenchResult(len(f.ts), numba_s, pandas_s)


# --- ``scopemeter bench rebuild``: ``compute rebuild`` against raw binary COPY-out of its rows ---

YEAR_15MIN: Final = 365 * 96  # 35,040 readings per meter: a year of 15-minute data


def rebuild_fleet_toml(sites: int, meters_per_site: int) -> str:
    parts = ['[[suppliers]]\nid = "bench"\nname = "Bench"\n']
    for s in range(sites):
        parts.append(
            f'[[sites]]\nid = "s{s}"\nsupplier = "bench"\nname = "Site {s}"\n'
            'grid_region = "CN"\ntimezone = "Asia/Shanghai"\n'
        )
        parts += [
            f'[[meters]]\nid = "s{s}-m{m}"\nsite = "s{s}"\ncarrier = "electricity"\n'
            'model = "eastron_sdm630"\n'
            for m in range(meters_per_site)
        ]
    return "\n".join(parts)


def load_year(
    conn: psycopg.Connection[Any], dsn: str, sites: int, meters_per_site: int, readings: int
) -> int:
    """``readings`` 15-minute counter readings per meter (a few seconds of jitter), COPYed in."""
    rng = np.random.default_rng(7)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    step = np.full(readings, 900.0)
    conn.execute(
        "SELECT scopemeter_ensure_partitions(%s, %s)", (t0, t0 + timedelta(seconds=900 * readings + 60))
    )
    n = 0
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
            " FROM STDIN (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["text", "text", "timestamptz", "float8", "int4", "text", "text", "int8"])
        for s in range(sites):
            for m in range(meters_per_site):
                offsets = np.cumsum(step) + rng.uniform(0, 5, readings)
                values = 1000.0 + np.cumsum(rng.uniform(0, 50, readings))
                mid, site = f"s{s}-m{m}", f"s{s}"
                for off, v in zip(offsets.tolist(), values.tolist(), strict=True):
                    copy.write_row(
                        (mid, "energy_import_kwh", t0 + timedelta(seconds=off), v, 0, site, "gw", 0)
                    )
                n += readings
    conn.commit()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("VACUUM ANALYZE readings")
    return n


def copy_out_seconds(conn: psycopg.Connection[Any]) -> tuple[float, int]:
    """Binary COPY-out of the counter readings a rebuild reads, to the client: the ceiling."""
    from compute.recompute import copy_out  # the reader the rebuild itself uses

    started = time.perf_counter()
    with conn.cursor() as cur:
        size = len(
            copy_out(
                cur,
                "COPY (SELECT meter_id, quantity, ts, value, quality FROM readings"
                " WHERE quantity = 'energy_import_kwh') TO STDOUT (FORMAT BINARY)",
            )
        )
    conn.commit()
    return time.perf_counter() - started, size


def copy_in_seconds(conn: psycopg.Connection[Any]) -> float:
    """Binary COPY-in of the rebuild's meter rows into a table created in the same transaction (no
    key; with ``wal_level = minimal`` not WAL-logged, as the rebuild's own COPY): the floor of
    writing them. Rolled back."""
    from compute.recompute import copy_out

    with conn.cursor() as cur:
        data = copy_out(cur, "COPY meter_energy_15m TO STDOUT (FORMAT BINARY)")
        cur.execute("CREATE TABLE bench_copy_in (LIKE meter_energy_15m)")
        started = time.perf_counter()
        with cur.copy("COPY bench_copy_in FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(data)
        elapsed = time.perf_counter() - started
    conn.rollback()
    return elapsed


@dataclass(frozen=True)
class RebuildBench:
    readings: int
    rebuild_s: list[float]  # meter rows unchanged (as after a factor change): compared, not written
    written_s: list[float]  # into an empty meter table: every meter row written
    copy_out_s: list[float]
    copy_in_s: list[float]
    buckets: int
    rollups: int
    phases: dict[str, float]  # of the last rebuild with unchanged meter rows: where its time went
    written_phases: dict[str, float]  # of the last rebuild that wrote every meter row

    @property
    def rebuild_rate(self) -> float:
        return self.readings / statistics.median(self.rebuild_s)

    @property
    def written_rate(self) -> float:
        return self.readings / statistics.median(self.written_s)

    @property
    def copy_out_rate(self) -> float:
        return self.readings / statistics.median(self.copy_out_s)

    @property
    def copy_in_rate(self) -> float:
        return self.readings / statistics.median(self.copy_in_s)


def run_rebuild(
    settings: Settings,
    *,
    sites: int = 10,
    meters_per_site: int = 10,
    readings: int = YEAR_15MIN,
    repeat: int = 3,
) -> RebuildBench:
    """A private database with ``sites × meters_per_site`` meters of ``readings`` each; then
    ``repeat`` rounds of (raw COPY-out of the readings, ``recompute_all`` into an empty meter
    table, raw COPY-in of its meter rows, ``recompute_all`` again with the meter rows unchanged),
    medians reported."""
    from compute.factors import apply_factors
    from compute.fleet import apply_fleet
    from compute.rebuild import recompute_all
    from compute.recompute import Params
    from ingest.db import drop_database, ensure_database, migrate
    from ops.settings import REPO_ROOT

    name = f"scopemeter_bench_rebuild_{uuid.uuid4().hex[:8]}"
    dsn = make_conninfo(settings.db.admin_dsn, dbname=name)
    ensure_database(dsn, settings.db.admin_dsn)
    try:
        migrate(dsn)
        with tempfile.TemporaryDirectory() as tmp, psycopg.connect(dsn) as conn:
            fleet = Path(tmp) / "fleet.toml"
            fleet.write_text(rebuild_fleet_toml(sites, meters_per_site))
            apply_fleet(conn, fleet)
            apply_factors(conn, REPO_ROOT / "config" / "factors.toml")
            n = load_year(conn, dsn, sites, meters_per_site, readings)
            params = Params.from_settings(settings.compute)
            rebuild_s, written_s, copy_s, copy_in_s = [], [], [], []
            result = written = None
            for _ in range(repeat):
                copy_s.append(copy_out_seconds(conn)[0])
                conn.execute("TRUNCATE meter_energy_15m")
                conn.commit()
                started = time.perf_counter()
                written = recompute_all(conn, params)
                written_s.append(time.perf_counter() - started)
                copy_in_s.append(copy_in_seconds(conn))
                started = time.perf_counter()
                result = recompute_all(conn, params)
                rebuild_s.append(time.perf_counter() - started)
            assert result is not None and written is not None and result.readings == written.readings == n
            return RebuildBench(
                n, rebuild_s, written_s, copy_s, copy_in_s, result.buckets, result.rollups, result.phases,
                written.phases,
            )  # fmt: skip
    finally:
        drop_database(name, settings.db.admin_dsn)
