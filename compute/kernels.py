"""Numba kernels: cumulative counter readings of one meter → energy per bucket (15 min, 1 h, …).

Inputs are the readings of ONE meter and ONE counter quantity, sorted by time: ``ts`` int64 epoch
milliseconds (non-decreasing), ``value`` float64 register readings, ``quality`` int64
``edge.wire.Quality`` bits. A quality bit describes what happened just BEFORE its reading, so the
bits of reading ``i + 1`` classify interval ``i`` (``ts[i]`` → ``ts[i+1]``).

1. ``interval_energy`` — the energy of interval ``i`` and its flags:
   - ``METER_REPLACED`` on the later reading: the new meter's starting value is unknown, so the
     interval contributes 0 and is unmeasured (``F_REPLACED``);
   - ``COUNTER_RESET``: the register restarted from 0, energy = the later value (``F_RESET``);
   - ``COUNTER_WRAP`` (or, without bits, a drop from the top ``WRAP_BAND`` of ``counter_max`` into
     its bottom band): energy = ``counter_max - v[i] + v[i+1]`` (``F_WRAP``); without a known
     ``counter_max`` the wrap cannot be undone and the interval counts as a drop;
   - any other backwards step (no bits): unexplained reset/replacement, 0 and unmeasured (``F_DROP``);
   - otherwise ``v[i+1] - v[i]``.
   An interval longer than ``max_gap_ms`` (> 0) is a gap (``F_GAP``): its energy is real (the
   counter advanced) but when it flowed is not known, so it is apportioned as ESTIMATED energy. An
   interval touching a reading marked ``ESTIMATED`` is estimated too (``F_ESTIMATED``).
   ``quarantine_intervals`` then marks an interval IMPLAUSIBLE (``F_IMPLAUSIBLE``: 0 and
   unmeasured, its later reading is quarantined by ``compute.quarantine``) when either reading is
   NaN or ±Infinity, or when it counts more than the meter's maximum power allows: energy >
   ``max_kw`` × duration (the counter's unit per hour, kW for kWh) + one float32 step of the
   reading (``COUNTER_RESOLUTION``). So no NaN or Infinity reaches
   a bucket, and a jump (a spike, a corrupted register) is held back instead of being counted.
2. ``apportion`` — each interval's energy is spread linearly over time (uniform power) across the
   bucket boundaries it straddles. Every bucket but the last one an interval touches gets
   ``delta * overlap_ms / duration_ms``; the last gets the remainder, so an interval's pieces sum
   exactly to its delta (up to one rounding per piece). A zero-length interval puts its whole delta
   in the bucket containing it. Per bucket it returns total energy, the estimated part of it, the
   milliseconds covered by measured intervals (coverage) and the OR of the interval flags.
3. Buckets span ``[floor(ts[0]), ceil(ts[-1]))`` in steps of ``bucket_ms``: every bucket that
   overlaps the readings' hull gets an entry, including 0 kWh ones. Per bucket, contributions are
   added in interval order starting from 0.0, so a bucket depends only on the intervals overlapping
   it: recomputing a sub-range from the same readings is bit-identical (what recompute relies on).

``compute.reference`` is the plain-Python oracle of all this. Kernels are cached on disk.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
from numba import njit

from edge.wire import Quality

BUCKET_MS: Final = 15 * 60 * 1000
HOUR_MS: Final = 60 * 60 * 1000
# A drop from above (1 - WRAP_BAND) * counter_max to below WRAP_BAND * counter_max is a wrap.
WRAP_BAND: Final = 0.1

# Interval flags (also OR-ed per bucket and stored with the meter's bucket rows).
F_WRAP: Final = 1
F_RESET: Final = 2
F_REPLACED: Final = 4
F_DROP: Final = 8
F_GAP: Final = 16
F_ESTIMATED: Final = 32
F_IMPLAUSIBLE: Final = 64  # non-finite reading or a jump beyond max_kw × duration (quarantined)
# A counter step may exceed max_kw × duration by one float32 step of the reading (most meters
# hold their counters in IEEE 754 float32, e.g. the SDM630): at 1e7 kWh one tick is 1 kWh.
COUNTER_RESOLUTION: Final = 2.0**-23
F_UNMEASURED: Final = F_REPLACED | F_DROP | F_IMPLAUSIBLE  # contributes no energy at all
F_TO_ESTIMATED: Final = F_GAP | F_ESTIMATED  # energy counted as estimated

_Q_ESTIMATED: Final = int(Quality.ESTIMATED)
_Q_WRAP: Final = int(Quality.COUNTER_WRAP)
_Q_RESET: Final = int(Quality.COUNTER_RESET)
_Q_REPLACED: Final = int(Quality.METER_REPLACED)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]


def floor_bucket(t: int, bucket_ms: int = BUCKET_MS) -> int:
    return (t // bucket_ms) * bucket_ms


def ceil_bucket(t: int, bucket_ms: int = BUCKET_MS) -> int:
    return -((-t) // bucket_ms) * bucket_ms


@njit(cache=True)
def interval_energy(
    ts: I64, value: F64, quality: I64, counter_max: float, max_gap_ms: int
) -> tuple[F64, I32]:
    """Energy and flags per interval (length ``n - 1``); see the module doc for the rules."""
    n = value.shape[0]
    m = n - 1 if n > 0 else 0
    delta = np.zeros(m, dtype=np.float64)
    flags = np.zeros(m, dtype=np.int32)
    for i in range(m):
        a = value[i]
        b = value[i + 1]
        q = quality[i + 1]
        f = 0
        d = 0.0
        if q & _Q_REPLACED:
            f = F_REPLACED
        elif q & _Q_RESET:
            if b >= 0.0:
                f = F_RESET
                d = b
            else:
                f = F_DROP
        elif q & _Q_WRAP or (
            b < a
            and counter_max > 0.0
            and a >= (1.0 - WRAP_BAND) * counter_max
            and b < WRAP_BAND * counter_max
        ):
            w = counter_max - a + b
            if counter_max > 0.0 and w >= 0.0:
                f = F_WRAP
                d = w
            else:
                f = F_DROP
        elif b < a:
            f = F_DROP
        else:
            d = b - a
        if (f & F_UNMEASURED) == 0:
            if max_gap_ms > 0 and ts[i + 1] - ts[i] > max_gap_ms:
                f |= F_GAP
            if (quality[i] | q) & _Q_ESTIMATED:
                f |= F_ESTIMATED
        delta[i] = d
        flags[i] = f
    return delta, flags


@njit(cache=True)
def quarantine_intervals(ts: I64, value: F64, delta: F64, flags: I32, max_kw: float) -> None:
    """In place: intervals touching a non-finite reading, or (``max_kw`` > 0) counting more than
    ``max_kw`` × their duration, become ``F_IMPLAUSIBLE`` with no energy."""
    for i in range(delta.shape[0]):
        bad = not (np.isfinite(value[i]) and np.isfinite(value[i + 1]) and np.isfinite(delta[i]))
        if not bad and max_kw > 0.0 and (flags[i] & F_UNMEASURED) == 0:
            excess = delta[i] - abs(value[i + 1]) * COUNTER_RESOLUTION
            bad = excess * 3_600_000.0 > max_kw * float(ts[i + 1] - ts[i])
        if bad:
            delta[i] = 0.0
            flags[i] = F_IMPLAUSIBLE


@njit(cache=True)
def apportion(ts: I64, delta: F64, flags: I32, bucket_ms: int) -> tuple[I64, F64, F64, I64, I32]:
    """Spread ``delta[i]`` linearly over buckets: (starts, kwh, kwh_estimated, measured_ms, flags)."""
    return apportion_from(ts, delta, flags, bucket_ms, 0.0, 0.0, 0, 0)


@njit(cache=True)
def apportion_from(
    ts: I64, delta: F64, flags: I32, bucket_ms: int, kwh0: float, est0: float, ms0: int, flags0: int
) -> tuple[I64, F64, F64, I64, I32]:
    """``apportion`` with the first bucket's sums starting from (``kwh0``, ``est0``, ``ms0``,
    ``flags0``) instead of zero: the first bucket's fold CONTINUED. Given that bucket's stored sums
    over every interval before ``ts[0]``, the result is bit-identical to apportioning all of them
    (the same additions in the same order); zeros give ``apportion`` exactly (0.0 + x == x)."""
    n = ts.shape[0]
    if n < 2:
        z = np.zeros(0, dtype=np.float64)
        return (
            np.zeros(0, dtype=np.int64),
            z,
            z.copy(),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.int32),
        )
    first = (ts[0] // bucket_ms) * bucket_ms
    last = -((-ts[n - 1]) // bucket_ms) * bucket_ms
    nb = (last - first) // bucket_ms
    starts = np.empty(nb, dtype=np.int64)
    for k in range(nb):
        starts[k] = first + k * bucket_ms
    energy = np.zeros(nb, dtype=np.float64)
    estimated = np.zeros(nb, dtype=np.float64)
    measured_ms = np.zeros(nb, dtype=np.int64)
    bflags = np.zeros(nb, dtype=np.int32)
    if nb > 0:
        energy[0] = kwh0
        estimated[0] = est0
        measured_ms[0] = ms0
        bflags[0] = flags0
    for i in range(n - 1):
        s = ts[i]
        e = ts[i + 1]
        d = delta[i]
        f = flags[i]
        est = (f & F_TO_ESTIMATED) != 0
        counted = (f & F_UNMEASURED) == 0
        k = (s - first) // bucket_ms
        dur = e - s
        if dur <= 0:
            energy[k] += d
            if est:
                estimated[k] += d
            bflags[k] |= f
            continue
        given = 0.0
        while True:
            b_start = first + k * bucket_ms
            b_end = b_start + bucket_ms
            overlap = min(e, b_end) - max(s, b_start)
            part = d - given if e <= b_end else d * float(overlap) / float(dur)
            energy[k] += part
            if est:
                estimated[k] += part
            elif counted:
                measured_ms[k] += overlap
            bflags[k] |= f
            if e <= b_end:
                break
            given += part
            k += 1
    return starts, energy, estimated, measured_ms, bflags


@njit(cache=True)
def rollup_sites(
    bounds: I64,
    site_of_meter: I64,
    n_sites: int,
    ts: I64,
    value: F64,
    quality: I64,
    counter_max: F64,
    max_gap_ms: I64,
    bucket_ms: int,
    first: int,
    nb: int,
    max_kw: F64,
) -> tuple[F64, F64]:
    """Many meters at once → per-site grids ``[site, bucket]`` of (kwh, kwh_estimated).

    Meter ``m``'s readings are ``ts[bounds[m]:bounds[m+1]]`` (sorted); buckets start at ``first``
    (a multiple of ``bucket_ms``) and must cover every reading. Meters are added in index order,
    so the site sums are deterministic. This is the batch path (full rebuilds, the benchmark)."""
    kwh = np.zeros((n_sites, nb), dtype=np.float64)
    est = np.zeros((n_sites, nb), dtype=np.float64)
    for m in range(bounds.shape[0] - 1):
        a = bounds[m]
        b = bounds[m + 1]
        if b - a < 2:
            continue
        t = ts[a:b]
        d, f = interval_energy(t, value[a:b], quality[a:b], counter_max[m], max_gap_ms[m])
        quarantine_intervals(t, value[a:b], d, f, max_kw[m])
        starts, e, x, _, _ = apportion(t, d, f, bucket_ms)
        off = (starts[0] - first) // bucket_ms
        s = site_of_meter[m]
        for k in range(starts.shape[0]):
            kwh[s, off + k] += e[k]
            est[s, off + k] += x[k]
    return kwh, est


# Interval flag bits counted per segment by ``bucket_energy_many`` (columns of its ``events``).
EVENT_BITS: Final = (F_WRAP, F_RESET, F_REPLACED, F_DROP, F_GAP, F_ESTIMATED, F_IMPLAUSIBLE)
EVENT_NAMES: Final = ("wraps", "resets", "replacements", "drops", "gaps", "estimated", "implausible")


class Seeds(NamedTuple):
    """Per segment: the stored sums its first bucket's fold continues from (``apportion_from``)."""

    kwh: F64
    est: F64
    measured_ms: I64
    flags: I64


def bucket_energy_many(
    bounds: I64,
    ts: I64,
    value: F64,
    quality: I64,
    counter_max: F64,
    max_gap_ms: I64,
    keep_from: I64,
    keep_to: I64,
    bucket_ms: int,
    max_kw: F64,
    seeds: Seeds | None = None,
) -> tuple[I64, I64, F64, F64, I64, I32, I64, I32]:
    """See ``_bucket_energy_many``; ``seeds`` (default: zeros) continue each segment's first bucket."""
    g_n = bounds.shape[0] - 1
    if seeds is None:
        seeds = Seeds(
            np.zeros(g_n), np.zeros(g_n), np.zeros(g_n, dtype=np.int64), np.zeros(g_n, dtype=np.int64)
        )
    return _bucket_energy_many(
        bounds, ts, value, quality, counter_max, max_gap_ms, keep_from, keep_to, bucket_ms, max_kw, *seeds
    )


@njit(cache=True)
def _bucket_energy_many(
    bounds: I64,
    ts: I64,
    value: F64,
    quality: I64,
    counter_max: F64,
    max_gap_ms: I64,
    keep_from: I64,
    keep_to: I64,
    bucket_ms: int,
    max_kw: F64,
    seed_kwh: F64,
    seed_est: F64,
    seed_ms: I64,
    seed_flags: I64,
) -> tuple[I64, I64, F64, F64, I64, I32, I64, I32]:
    """Many counter series in ONE call (the set-based recompute): segment ``g`` is
    ``ts[bounds[g]:bounds[g+1]]`` (sorted) with its own ``counter_max`` and ``max_gap_ms``; of its
    buckets only those starting in ``[keep_from[g], keep_to[g])`` are returned; ``max_kw[g]`` is
    its plausibility bound (``quarantine_intervals``).

    Returns (segment, starts, kwh, kwh_estimated, measured_ms, flags) concatenated in segment
    order, ``events[g, j]`` = intervals of segment ``g`` carrying ``EVENT_BITS[j]``, and the
    interval flags in reading positions (interval ``i`` of segment ``g`` at ``bounds[g] + i``).
    Each segment goes through exactly ``interval_energy``, ``quarantine_intervals`` and
    ``apportion``, so its rows are bit-identical to ``bucket_energy`` of that segment alone."""
    g_n = bounds.shape[0] - 1
    sizes = np.zeros(g_n, dtype=np.int64)
    for g in range(g_n):
        a = bounds[g]
        b = bounds[g + 1]
        if b - a < 2:
            continue
        first = (ts[a] // bucket_ms) * bucket_ms
        last = -((-ts[b - 1]) // bucket_ms) * bucket_ms
        lo = max(first, keep_from[g])
        hi = min(last, keep_to[g])
        if hi > lo:  # bucket starts first + k * bucket_ms with lo <= start < hi
            sizes[g] = -((first - hi) // bucket_ms) + ((first - lo) // bucket_ms)
    total = 0
    for g in range(g_n):
        total += sizes[g]
    seg = np.empty(total, dtype=np.int64)
    starts = np.empty(total, dtype=np.int64)
    kwh = np.empty(total, dtype=np.float64)
    est = np.empty(total, dtype=np.float64)
    mms = np.empty(total, dtype=np.int64)
    flags = np.empty(total, dtype=np.int32)
    n_events = len(EVENT_BITS)
    events = np.zeros((g_n, n_events), dtype=np.int64)
    iflags = np.zeros(ts.shape[0], dtype=np.int32)
    out = 0
    for g in range(g_n):
        a = bounds[g]
        b = bounds[g + 1]
        if b - a < 2:
            continue
        t = ts[a:b]
        d, f = interval_energy(t, value[a:b], quality[a:b], counter_max[g], max_gap_ms[g])
        quarantine_intervals(t, value[a:b], d, f, max_kw[g])
        for i in range(f.shape[0]):
            iflags[a + i] = f[i]
            for j in range(n_events):
                if f[i] & EVENT_BITS[j]:
                    events[g, j] += 1
        s, e, x, ms, bf = apportion_from(
            t, d, f, bucket_ms, seed_kwh[g], seed_est[g], seed_ms[g], seed_flags[g]
        )
        for k in range(s.shape[0]):
            if keep_from[g] <= s[k] < keep_to[g]:
                seg[out] = g
                starts[out] = s[k]
                kwh[out] = e[k]
                est[out] = x[k]
                mms[out] = ms[k]
                flags[out] = bf[k]
                out += 1
    return seg, starts, kwh, est, mms, flags, events, iflags


@njit(cache=True)
def window_order(win: I64, ts: I64, n_windows: int) -> tuple[I64, I64]:
    """Rows loaded in any order → (permutation sorting them by window, then time; window offsets).
    A stable counting sort by window, then only a window whose rows are out of time order is
    sorted (a scan of a time-partitioned table already yields each series in order)."""
    n = win.shape[0]
    bounds = np.zeros(n_windows + 1, dtype=np.int64)
    for r in range(n):
        bounds[win[r] + 1] += 1
    for g in range(n_windows):
        bounds[g + 1] += bounds[g]
    pos = bounds[:-1].copy()
    perm = np.empty(n, dtype=np.int64)
    for r in range(n):
        perm[pos[win[r]]] = r
        pos[win[r]] += 1
    for g in range(n_windows):
        a = bounds[g]
        b = bounds[g + 1]
        for k in range(a + 1, b):
            if ts[perm[k]] < ts[perm[k - 1]]:
                sub = perm[a:b].copy()
                perm[a:b] = sub[np.argsort(ts[sub], kind="mergesort")]
                break
    return perm, bounds


@njit(cache=True)
def ordered_group_sums(key: I64, kwh: F64, est: F64, mms: I64) -> tuple[I64, F64, F64, I64]:
    """Rows sorted by ``key`` → per run of equal keys: (first row, sum of kwh, of est, of mms).
    Each sum is a left fold in row order starting from the run's first value, exactly what
    PostgreSQL's ``sum(float8 ORDER BY …)`` computes (``float8pl`` with a NULL initial state), so
    sums folded here and sums folded by the database in the same order are bit-identical."""
    n = key.shape[0]
    runs = 0
    for r in range(n):
        if r == 0 or key[r] != key[r - 1]:
            runs += 1
    first = np.empty(runs, dtype=np.int64)
    s_kwh = np.empty(runs, dtype=np.float64)
    s_est = np.empty(runs, dtype=np.float64)
    s_mms = np.empty(runs, dtype=np.int64)
    g = -1
    for r in range(n):
        if r == 0 or key[r] != key[r - 1]:
            g += 1
            first[g] = r
            s_kwh[g] = kwh[r]
            s_est[g] = est[r]
            s_mms[g] = mms[r]
        else:
            s_kwh[g] += kwh[r]
            s_est[g] += est[r]
            s_mms[g] += mms[r]
    return first, s_kwh, s_est, s_mms


class BucketEnergy(NamedTuple):
    starts: I64  # bucket start, epoch ms, multiples of bucket_ms
    kwh: F64  # energy per bucket, measured + estimated (counter units: kWh, m3, …)
    kwh_estimated: F64  # the part of ``kwh`` from gaps and estimated readings
    measured_ms: I64  # time of the bucket covered by measured intervals
    flags: I32  # OR of the flags of the intervals overlapping the bucket
    interval_flags: I32  # per interval, for counting events


def _count(flags: I32, bit: int) -> int:
    return int(np.count_nonzero(flags & bit))


def bucket_energy(
    ts: I64,
    value: F64,
    quality: I64 | None = None,
    *,
    bucket_ms: int = BUCKET_MS,
    counter_max: float = 0.0,
    max_gap_ms: int = 0,
    max_kw: float = 0.0,
) -> BucketEnergy:
    """Readings of one counter → energy per bucket (see module doc). ``counter_max`` 0 = unknown,
    ``max_gap_ms`` 0 = no gap limit, ``max_kw`` 0 = no per-meter bound (non-finite readings are
    always implausible)."""
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    value = np.ascontiguousarray(value, dtype=np.float64)
    q = (
        np.zeros(ts.shape, dtype=np.int64)
        if quality is None
        else np.ascontiguousarray(quality, dtype=np.int64)
    )
    if ts.shape != value.shape or ts.shape != q.shape or ts.ndim != 1:
        raise ValueError("ts, value and quality must be 1-d arrays of the same length")
    if ts.shape[0] > 1 and bool(np.any(np.diff(ts) < 0)):
        raise ValueError("ts must be sorted")
    if bucket_ms <= 0 or counter_max < 0 or max_gap_ms < 0 or not max_kw >= 0:
        raise ValueError("bucket_ms must be > 0, counter_max, max_gap_ms and max_kw >= 0")
    delta, flags = interval_energy(ts, value, q, float(counter_max), int(max_gap_ms))
    quarantine_intervals(ts, value, delta, flags, float(max_kw))
    starts, kwh, est, mms, bflags = apportion(ts, delta, flags, int(bucket_ms))
    return BucketEnergy(starts, kwh, est, mms, bflags, flags)


def event_counts(flags: I32) -> dict[str, int]:
    """How many intervals carry each flag (for logs and results)."""
    return {
        "wraps": _count(flags, F_WRAP),
        "resets": _count(flags, F_RESET),
        "replacements": _count(flags, F_REPLACED),
        "drops": _count(flags, F_DROP),
        "gaps": _count(flags, F_GAP),
        "estimated": _count(flags, F_ESTIMATED),
        "implausible": _count(flags, F_IMPLAUSIBLE),
    }
