"""Numba kernels: cumulative counter readings of one meter → energy per 15-minute bucket.

Inputs are the readings of ONE meter and ONE counter quantity, sorted by time:
``ts`` int64 epoch milliseconds (non-decreasing), ``value`` float64 register readings.

1. ``interval_energy``: the energy of interval ``i`` (``ts[i]`` → ``ts[i+1]``) is
   ``value[i+1] - value[i]``. A NEGATIVE delta means the register went backwards: a reset, a wrap
   or a meter replacement. The skeleton cannot tell how much energy flowed across such a step, so
   that interval contributes 0 kWh and is flagged ``FLAG_NEGATIVE_DELTA`` (counted, not guessed).
   Wrap recovery from the register width and the ``Quality`` bits sent by the edge are later work.
2. ``apportion``: each interval's energy is spread linearly over time (uniform power between two
   readings) across the bucket boundaries it straddles. Every bucket but the last one an interval
   touches gets ``delta * overlap_ms / duration_ms``; the last gets the remainder, so an interval's
   pieces sum exactly to its delta (up to one rounding per piece). A zero-length interval (two
   readings in the same millisecond) puts its whole delta in the bucket containing it.
3. Buckets span ``[floor(ts[0]), ceil(ts[-1]))`` in steps of ``bucket_ms``: every bucket that overlaps
   the readings' time hull gets an entry, including 0 kWh ones. Per bucket, contributions are added
   in interval order starting from 0.0, so the result for a bucket depends only on the intervals
   overlapping it: recomputing a sub-range from the same readings is bit-identical.

The kernels are compiled once and cached on disk (``cache=True``).
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
from numba import njit

BUCKET_MS: Final = 15 * 60 * 1000
FLAG_NEGATIVE_DELTA: Final = 1

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]


def floor_bucket(t: int, bucket_ms: int = BUCKET_MS) -> int:
    return (t // bucket_ms) * bucket_ms


def ceil_bucket(t: int, bucket_ms: int = BUCKET_MS) -> int:
    return -((-t) // bucket_ms) * bucket_ms


@njit(cache=True)
def interval_energy(value: F64) -> tuple[F64, U8]:
    """Delta per interval (length ``n - 1``); negative deltas become 0 and are flagged."""
    n = value.shape[0]
    m = n - 1 if n > 0 else 0
    delta = np.zeros(m, dtype=np.float64)
    flags = np.zeros(m, dtype=np.uint8)
    for i in range(m):
        d = value[i + 1] - value[i]
        if d < 0.0:
            flags[i] = FLAG_NEGATIVE_DELTA
        else:
            delta[i] = d
    return delta, flags


@njit(cache=True)
def apportion(ts: I64, delta: F64, bucket_ms: int) -> tuple[I64, F64]:
    """Spread ``delta[i]`` (interval ``ts[i]`` → ``ts[i+1]``) linearly over buckets of ``bucket_ms``."""
    n = ts.shape[0]
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    first = (ts[0] // bucket_ms) * bucket_ms
    last = -((-ts[n - 1]) // bucket_ms) * bucket_ms
    nb = (last - first) // bucket_ms
    starts = np.empty(nb, dtype=np.int64)
    for k in range(nb):
        starts[k] = first + k * bucket_ms
    energy = np.zeros(nb, dtype=np.float64)
    for i in range(n - 1):
        s = ts[i]
        e = ts[i + 1]
        d = delta[i]
        k = (s - first) // bucket_ms
        dur = e - s
        if dur <= 0:
            energy[k] += d
            continue
        given = 0.0
        while True:
            b_end = first + (k + 1) * bucket_ms
            if e <= b_end:
                energy[k] += d - given
                break
            overlap = b_end - max(s, b_end - bucket_ms)
            part = d * float(overlap) / float(dur)
            energy[k] += part
            given += part
            k += 1
    return starts, energy


class BucketEnergy(NamedTuple):
    starts: I64  # bucket start, epoch ms, multiples of bucket_ms
    kwh: F64  # energy per bucket
    negative_deltas: int  # intervals that went backwards and contributed 0


def bucket_energy(ts: I64, value: F64, bucket_ms: int = BUCKET_MS) -> BucketEnergy:
    """Readings of one counter → energy per bucket (see module doc)."""
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    value = np.ascontiguousarray(value, dtype=np.float64)
    if ts.shape != value.shape or ts.ndim != 1:
        raise ValueError("ts and value must be 1-d arrays of the same length")
    if ts.shape[0] > 1 and bool(np.any(np.diff(ts) < 0)):
        raise ValueError("ts must be sorted")
    delta, flags = interval_energy(value)
    starts, kwh = apportion(ts, delta, bucket_ms)
    return BucketEnergy(starts, kwh, int(np.count_nonzero(flags)))
