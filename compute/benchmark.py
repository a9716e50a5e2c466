"""``scopemeter bench compute``: the numba rollup vs. the same rollup in pandas, in one run.

Both turn the cumulative counters of many meters into per-site 15-minute energy (total and the
estimated part from gaps) with linear apportionment across bucket boundaries. pandas does it the
idiomatic vectorised way: ``groupby().diff()`` for deltas, one row per (interval, bucket) piece via
``np.repeat``, then ``groupby().sum()``. Results are checked equal before any time is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from compute.kernels import BUCKET_MS, rollup_sites

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
