"""Quarantined readings: kept as received, flagged with why, left out of every figure.

The kernels mark an interval ``F_IMPLAUSIBLE`` when a reading of it is NaN or ±Infinity, or when
the counter stepped more than the meter's ``max_kw`` (fleet registry) × the interval allows; such
an interval counts no energy and no coverage (``compute.kernels``). This module names the readings
to blame and keeps them in ``quarantined_readings`` (migration 0009):

- ``non_finite_value``: the reading itself is NaN or ±Infinity;
- ``implausible_jump``: the later reading of a finite interval beyond ``max_kw`` × duration.

The reading stays in ``readings`` (nothing a gateway sent is deleted); every recompute rebuilds
the quarantine rows of the range it loaded, so late data or a corrected ``max_kw`` lifts them.
Statements list them in their data-quality section, and a month with any is not Final
(``quarantined``: what the completeness check needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import numpy as np
import psycopg

from compute.kernels import F_IMPLAUSIBLE

NON_FINITE: Final = "non_finite_value"
JUMP: Final = "implausible_jump"


@dataclass(frozen=True)
class Held:
    index: int  # into the loaded readings
    reason: str
    detail: str


def held_readings(ts: np.ndarray, value: np.ndarray, interval_flags: np.ndarray, max_kw: float) -> list[Held]:
    """The readings to quarantine, given the kernel's interval flags (one reading per cause).
    Only the flagged positions are visited (numpy finds them), not every loaded reading."""
    held: dict[int, Held] = {}
    for j in np.flatnonzero(~np.isfinite(value)).tolist():
        held[j] = Held(j, NON_FINITE, f"value {float(value[j])} is not a finite number")
    for i in np.flatnonzero(interval_flags & F_IMPLAUSIBLE).tolist():
        if i in held or i + 1 in held:
            continue  # a non-finite neighbour already explains it
        a, b = float(value[i]), float(value[i + 1])
        seconds = (int(ts[i + 1]) - int(ts[i])) / 1000
        held[i + 1] = Held(
            i + 1,
            JUMP,
            f"counter went from {a:.10g} to {b:.10g} in {seconds:g} s; max_kw {max_kw:g}"
            f" allows at most {max_kw * seconds / 3600:.6g} per interval",
        )
    return [held[k] for k in sorted(held)]


_DELETE = (
    "DELETE FROM quarantined_readings WHERE meter_id = %s AND quantity = %s"
    " AND (%s::bigint IS NULL OR ts >= to_timestamp(%s::float8 / 1000) + interval '1 millisecond')"
    " AND (%s::bigint IS NULL OR ts < to_timestamp(%s::float8 / 1000) + interval '1 millisecond')"
)
# ``ts`` from the kernels is floored to milliseconds: the exact row is taken from ``readings``.
_INSERT = """
INSERT INTO quarantined_readings (meter_id, quantity, ts, value, reason, detail)
SELECT r.meter_id, r.quantity, r.ts, r.value, h.reason, h.detail
FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS h(ms, reason, detail)
JOIN readings r ON r.meter_id = %s AND r.quantity = %s
 AND r.ts >= to_timestamp(h.ms::float8 / 1000)
 AND r.ts < to_timestamp(h.ms::float8 / 1000) + interval '1 millisecond'
ON CONFLICT (meter_id, quantity, ts) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail
"""


def record(
    cur: psycopg.Cursor[Any],
    meter_id: str,
    quantity: str,
    ts: np.ndarray,
    value: np.ndarray,
    interval_flags: np.ndarray,
    max_kw: float,
    *,
    whole: bool = False,
) -> int:
    """Rebuild the quarantine rows of the loaded readings ``ts`` (epoch ms, sorted); returns how
    many are held. The first loaded reading's interval before it was not loaded, so its row is
    only ever added (non-finite stays non-finite); ``whole``: these are all the meter's readings."""
    if len(ts) == 0:
        return 0
    first, last = (None, None) if whole else (int(ts[0]), int(ts[-1]))
    cur.execute(_DELETE, (meter_id, quantity, first, first, last, last))
    held = held_readings(ts, value, interval_flags, max_kw)
    if held:
        cur.execute(
            _INSERT,
            (
                [int(ts[h.index]) for h in held],
                [h.reason for h in held],
                [h.detail for h in held],
                meter_id,
                quantity,
            ),
        )
    return len(held)


# The same, for many series at once (the set-based recompute): one DELETE, one INSERT.
_DELETE_MANY = """
DELETE FROM quarantined_readings q
USING unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[]) AS w(meter_id, quantity, first_ms, last_ms)
WHERE q.meter_id = w.meter_id AND q.quantity = w.quantity
  AND (w.first_ms IS NULL OR q.ts >= to_timestamp(w.first_ms::float8 / 1000) + interval '1 millisecond')
  AND (w.last_ms IS NULL OR q.ts < to_timestamp(w.last_ms::float8 / 1000) + interval '1 millisecond')
"""
_INSERT_MANY = """
INSERT INTO quarantined_readings (meter_id, quantity, ts, value, reason, detail)
SELECT DISTINCT ON (r.meter_id, r.quantity, r.ts) r.meter_id, r.quantity, r.ts, r.value, h.reason, h.detail
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[])
     AS h(meter_id, quantity, ms, reason, detail)
JOIN readings r ON r.meter_id = h.meter_id AND r.quantity = h.quantity
 AND r.ts >= to_timestamp(h.ms::float8 / 1000)
 AND r.ts < to_timestamp(h.ms::float8 / 1000) + interval '1 millisecond'
ORDER BY r.meter_id, r.quantity, r.ts
ON CONFLICT (meter_id, quantity, ts) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail
"""


@dataclass(frozen=True)
class Series:
    """One loaded series for ``record_many``: its readings ``ts[a:b]`` of a shared array."""

    meter_id: str
    quantity: str
    a: int
    b: int
    max_kw: float


def record_many(
    cur: psycopg.Cursor[Any],
    series: list[Series],
    ts: np.ndarray,
    value: np.ndarray,
    interval_flags: np.ndarray,
    *,
    whole: bool = False,
) -> int:
    """``record`` for many series in two statements. ``interval_flags[i]`` is interval ``i`` of
    the series holding reading ``i`` (``compute.kernels.bucket_energy_many``). ``whole``: these
    are all the series' readings and the caller emptied the table already (the rebuild)."""
    series = [s for s in series if s.b > s.a]
    if not whole and series:
        cur.execute(
            _DELETE_MANY,
            (
                [s.meter_id for s in series],
                [s.quantity for s in series],
                [int(ts[s.a]) for s in series],
                [int(ts[s.b - 1]) for s in series],
            ),
        )
    hits = np.flatnonzero(~np.isfinite(value) | ((interval_flags & F_IMPLAUSIBLE) != 0))
    rows: list[tuple[str, str, int, str, str]] = []
    for s in series:
        lo, hi = np.searchsorted(hits, [s.a, s.b])
        if lo == hi:
            continue
        for h in held_readings(ts[s.a : s.b], value[s.a : s.b], interval_flags[s.a : s.b - 1], s.max_kw):
            rows.append((s.meter_id, s.quantity, int(ts[s.a + h.index]), h.reason, h.detail))
    if rows:
        cur.execute(_INSERT_MANY, tuple(list(c) for c in zip(*rows, strict=True)))
    return len(rows)


@dataclass(frozen=True)
class Quarantined:
    meter_id: str
    site_id: str
    quantity: str
    ts: datetime
    value: float
    reason: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe (NaN and Infinity are not JSON numbers: the value is given as text)."""
        return {
            "meter_id": self.meter_id,
            "site_id": self.site_id,
            "quantity": self.quantity,
            "ts": self.ts.isoformat(),
            "value": repr(self.value),
            "reason": self.reason,
            "detail": self.detail,
        }


_QUARANTINED = """
SELECT q.meter_id, m.site_id, q.quantity, q.ts, q.value, q.reason, q.detail
FROM quarantined_readings q JOIN meters m USING (meter_id) JOIN sites s USING (site_id)
WHERE s.supplier_id = %(supplier)s
  AND q.ts >= (%(first)s::date::timestamp AT TIME ZONE s.timezone)
  AND q.ts < (%(next)s::date::timestamp AT TIME ZONE s.timezone)
ORDER BY q.meter_id, q.quantity, q.ts
"""


def quarantined(conn: psycopg.Connection[Any], supplier: str, month: str) -> list[Quarantined]:
    """The supplier's quarantined readings in ``month`` (YYYY-MM or YYYY, each site's local time).
    Any of them keeps the month from being Final."""
    from compute.statements.figures import month_bounds  # which imports this module

    first, nxt = month_bounds(month)
    rows = conn.execute(_QUARANTINED, {"supplier": supplier, "first": first, "next": nxt}).fetchall()
    return [Quarantined(*r) for r in rows]


def reasons(held: list[Quarantined]) -> list[str]:
    """One line per meter, for a completeness refusal: 'meter M (site S): 3 readings quarantined …'."""
    by_meter: dict[tuple[str, str], dict[str, int]] = {}
    for q in held:
        counts = by_meter.setdefault((q.meter_id, q.site_id), {})
        counts[q.reason] = counts.get(q.reason, 0) + 1
    return [
        f"meter {m} (site {s}): {sum(c.values())} readings quarantined"
        f" ({', '.join(f'{k}: {n}' for k, n in sorted(c.items()))})"
        for (m, s), c in sorted(by_meter.items())
    ]
