"""Plain-Python reference of ``compute.kernels``: slow, obvious, and the oracle for the tests.

Same rules as the kernels (see their module doc), written as directly as possible; it shares only
the constants with them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from compute.kernels import (
    BUCKET_MS,
    COUNTER_RESOLUTION,
    F_DROP,
    F_ESTIMATED,
    F_GAP,
    F_IMPLAUSIBLE,
    F_REPLACED,
    F_RESET,
    F_WRAP,
    WRAP_BAND,
)
from edge.wire import Quality


@dataclass
class RefResult:
    starts: list[int] = field(default_factory=list)
    kwh: list[float] = field(default_factory=list)
    kwh_estimated: list[float] = field(default_factory=list)
    measured_ms: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)
    interval_flags: list[int] = field(default_factory=list)


def interval_ref(
    a: float,
    b: float,
    qa: int,
    qb: int,
    duration_ms: int,
    counter_max: float,
    max_gap_ms: int,
    max_kw: float = 0.0,
) -> tuple[float, int]:
    """(energy, flags) of one interval from reading (a, qa) to reading (b, qb)."""
    energy, flag = _interval(a, b, qa, qb, duration_ms, counter_max, max_gap_ms)
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(energy)):
        return 0.0, F_IMPLAUSIBLE
    excess = energy - abs(b) * COUNTER_RESOLUTION
    if max_kw > 0 and not flag & (F_REPLACED | F_DROP) and excess * 3_600_000.0 > max_kw * duration_ms:
        return 0.0, F_IMPLAUSIBLE
    return energy, flag


def _interval(
    a: float, b: float, qa: int, qb: int, duration_ms: int, counter_max: float, max_gap_ms: int
) -> tuple[float, int]:
    if qb & Quality.METER_REPLACED:
        return 0.0, F_REPLACED
    if qb & Quality.COUNTER_RESET:
        energy, flag = (b, F_RESET) if b >= 0 else (0.0, F_DROP)
    elif qb & Quality.COUNTER_WRAP or (
        b < a and counter_max > 0 and a >= (1 - WRAP_BAND) * counter_max and b < WRAP_BAND * counter_max
    ):
        wrapped = counter_max - a + b
        energy, flag = (wrapped, F_WRAP) if counter_max > 0 and wrapped >= 0 else (0.0, F_DROP)
    elif b < a:
        energy, flag = 0.0, F_DROP
    else:
        energy, flag = b - a, 0
    if flag == F_DROP:
        return 0.0, F_DROP
    if max_gap_ms > 0 and duration_ms > max_gap_ms:
        flag |= F_GAP
    if (qa | qb) & Quality.ESTIMATED:
        flag |= F_ESTIMATED
    return energy, flag


def bucket_energy_ref(
    ts: Sequence[int],
    value: Sequence[float],
    quality: Sequence[int] | None = None,
    *,
    bucket_ms: int = BUCKET_MS,
    counter_max: float = 0.0,
    max_gap_ms: int = 0,
    max_kw: float = 0.0,
) -> RefResult:
    q = list(quality) if quality is not None else [0] * len(ts)
    if not len(ts) == len(value) == len(q):
        raise ValueError("ts, value and quality must have the same length")
    if any(b < a for a, b in itertools.pairwise(ts)):
        raise ValueError("ts must be sorted")
    out = RefResult()
    if len(ts) < 2:
        return out
    first = ts[0] // bucket_ms * bucket_ms
    last = -(-ts[-1] // bucket_ms) * bucket_ms
    out.starts = list(range(first, last, bucket_ms))
    kwh = {b: 0.0 for b in out.starts}
    est = {b: 0.0 for b in out.starts}
    mms = {b: 0 for b in out.starts}
    bfl = {b: 0 for b in out.starts}
    for i in range(len(ts) - 1):
        s, e = int(ts[i]), int(ts[i + 1])
        d, f = interval_ref(
            float(value[i]), float(value[i + 1]), q[i], q[i + 1], e - s, counter_max, max_gap_ms, max_kw
        )
        out.interval_flags.append(f)
        is_est = bool(f & (F_GAP | F_ESTIMATED))
        counted = not f & (F_REPLACED | F_DROP | F_IMPLAUSIBLE)
        b = s // bucket_ms * bucket_ms
        if e == s:
            kwh[b] += d
            est[b] += d if is_est else 0.0
            bfl[b] |= f
            continue
        given = 0.0
        while True:
            b_end = b + bucket_ms
            overlap = min(e, b_end) - max(s, b)
            part = d - given if e <= b_end else d * float(overlap) / float(e - s)
            kwh[b] += part
            if is_est:
                est[b] += part
            elif counted:
                mms[b] += overlap
            bfl[b] |= f
            if e <= b_end:
                break
            given += part
            b = b_end
    out.kwh = [kwh[b] for b in out.starts]
    out.kwh_estimated = [est[b] for b in out.starts]
    out.measured_ms = [mms[b] for b in out.starts]
    out.flags = [bfl[b] for b in out.starts]
    return out
