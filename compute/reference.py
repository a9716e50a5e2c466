"""Plain-Python reference of ``compute.kernels``: slow, obvious, and the oracle for the tests.

Same rules as the kernels (see their module doc): negative delta → 0 kWh and flagged; linear
apportionment with the last touched bucket taking the remainder; buckets cover the readings' hull.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from compute.kernels import BUCKET_MS


def bucket_energy_ref(
    ts: Sequence[int], value: Sequence[float], bucket_ms: int = BUCKET_MS
) -> tuple[list[int], list[float], int]:
    """Return (bucket starts, kWh per bucket, number of negative deltas)."""
    if len(ts) != len(value):
        raise ValueError("ts and value must have the same length")
    if any(b < a for a, b in itertools.pairwise(ts)):
        raise ValueError("ts must be sorted")
    if len(ts) < 2:
        return [], [], 0
    first = ts[0] // bucket_ms * bucket_ms
    last = -(-ts[-1] // bucket_ms) * bucket_ms
    starts = list(range(first, last, bucket_ms))
    energy = {b: 0.0 for b in starts}
    negatives = 0
    for i in range(len(ts) - 1):
        s, e = int(ts[i]), int(ts[i + 1])
        d = float(value[i + 1]) - float(value[i])
        if d < 0:
            negatives += 1
            d = 0.0
        b = s // bucket_ms * bucket_ms
        if e == s:
            energy[b] += d
            continue
        given = 0.0
        while True:
            b_end = b + bucket_ms
            if e <= b_end:
                energy[b] += d - given
                break
            part = d * float(b_end - max(s, b)) / float(e - s)
            energy[b] += part
            given += part
            b = b_end
    return starts, [energy[b] for b in starts], negatives
