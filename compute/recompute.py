"""Deterministic recompute from the source of truth (``readings``) into the 15-minute tables.

For a dirty range of one meter's energy counter, the intervals that can have changed all lie
between ``prev`` (last reading strictly before ``t_min``) and ``next`` (first reading strictly after
``t_max``): readings are only ever added, and both neighbours predate the write. So the affected
buckets are ``B = [floor15(prev or t_min), ceil15(next or t_max))``. Every reading whose interval
overlaps ``B`` is loaded, the kernel runs over them, and in ONE transaction the meter's
``meter_energy_15m`` rows in ``B`` are replaced and the site's rollups over ``B`` are rebuilt from
all its meters.

Why replays, duplicates, out-of-order and late data give exactly a clean run's result:
- a bucket's energy depends only on the intervals overlapping it, added in time order from 0.0
  (see ``compute.kernels``), so a sub-range recompute is bit-identical to a full one;
- the site sum is ``sum(kwh ORDER BY meter_id)``, independent of physical row order;
- every change to a meter's rows in a bucket is followed, in the same transaction, by rebuilding
  that bucket's site rollup; recomputes of one site are serialised by an advisory lock, so the last
  rollup of a bucket always sees every meter's final rows.

Scope: Scope 2, location-based, for the Scope 2 carriers (electricity, heat, steam, cooling) from
the ``energy_import_kwh`` counter. The factor is the ``emission_factors`` row for the site's
``grid_region`` + carrier in the configured series whose validity (site-local calendar dates)
covers the bucket, highest version first; ``kg_co2e`` is NULL where none does. Meters missing from
the registry get ``meter_energy_15m`` rows but no rollup (no site/carrier to attribute them to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import psycopg

from compute.config import SCOPE2_CARRIERS
from compute.kernels import bucket_energy, ceil_bucket, floor_bucket
from edge.wire import Quantity
from ingest.events import DirtyRange

log = logging.getLogger("scopemeter.compute")

COUNTER: Final = Quantity.ENERGY_IMPORT_KWH.value
DEFAULT_FACTOR_SERIES: Final = "national-power-average"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_SCOPE2: Final = sorted(c.value for c in SCOPE2_CARRIERS)


def to_ms(ts: datetime) -> int:
    """Epoch milliseconds, floored (exact integer arithmetic)."""
    return (ts - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


@dataclass(frozen=True)
class RecomputeResult:
    meter_id: str
    site_id: str
    bucket_from: datetime | None  # B; None when nothing was recomputed
    bucket_to: datetime | None
    readings: int = 0  # readings loaded
    buckets: int = 0  # meter buckets written
    negative_deltas: int = 0  # intervals that went backwards (reset/replacement): counted as 0 kWh
    registered: bool = True  # meter found in the fleet registry
    skipped: str | None = None


_LAST_BEFORE = (
    "SELECT ts FROM readings WHERE meter_id = %s AND quantity = %s AND ts {op} %s ORDER BY ts DESC LIMIT 1"
)
_FIRST_AFTER = (
    "SELECT ts FROM readings WHERE meter_id = %s AND quantity = %s AND ts {op} %s ORDER BY ts LIMIT 1"
)
_LOAD = (
    "SELECT floor(extract(epoch FROM ts) * 1000)::bigint, value FROM readings"
    " WHERE meter_id = %s AND quantity = %s AND ts >= %s AND ts <= %s ORDER BY ts"
)
_LOAD_ALL = (
    "SELECT floor(extract(epoch FROM ts) * 1000)::bigint, value FROM readings"
    " WHERE meter_id = %s AND quantity = %s ORDER BY ts"
)
_INSERT_ENERGY = (
    "INSERT INTO meter_energy_15m (meter_id, bucket, kwh)"
    " SELECT %s, to_timestamp(b::float8 / 1000), k FROM unnest(%s::bigint[], %s::float8[]) AS u(b, k)"
)
# Bounds are optional: NULL means unbounded (the full rebuild).
_DELETE_ROLLUPS = (
    "DELETE FROM site_rollups_15m WHERE scope = 2 AND method = 'location'"
    " AND (%(site)s::text IS NULL OR site_id = %(site)s)"
    " AND (%(b0)s::timestamptz IS NULL OR bucket >= %(b0)s)"
    " AND (%(b1)s::timestamptz IS NULL OR bucket < %(b1)s)"
)
_INSERT_ROLLUPS = """
INSERT INTO site_rollups_15m (site_id, bucket, carrier, scope, method, kwh, kg_co2e, factor_id)
SELECT e.site_id, e.bucket, e.carrier, 2, 'location', e.kwh, e.kwh * f.kg_co2e_per_unit, f.factor_id
FROM (
    SELECT m.site_id, me.bucket, m.carrier, sum(me.kwh ORDER BY me.meter_id) AS kwh
    FROM meter_energy_15m me JOIN meters m USING (meter_id)
    WHERE m.carrier = ANY(%(carriers)s)
      AND (%(site)s::text IS NULL OR m.site_id = %(site)s)
      AND (%(b0)s::timestamptz IS NULL OR me.bucket >= %(b0)s)
      AND (%(b1)s::timestamptz IS NULL OR me.bucket < %(b1)s)
    GROUP BY m.site_id, me.bucket, m.carrier
) e
JOIN sites s ON s.site_id = e.site_id
LEFT JOIN LATERAL (
    SELECT ef.factor_id, ef.kg_co2e_per_unit FROM emission_factors ef
    WHERE ef.region = s.grid_region AND ef.carrier = e.carrier AND ef.series = %(series)s
      AND ef.valid_from <= (e.bucket AT TIME ZONE s.timezone)::date
      AND (e.bucket AT TIME ZONE s.timezone)::date < ef.valid_to
    ORDER BY ef.version DESC, ef.factor_id
    LIMIT 1
) f ON true
"""


def _one(cur: psycopg.Cursor[Any], sql: str, params: tuple[Any, ...]) -> Any:
    row = cur.execute(sql, params).fetchone()
    return row[0] if row else None


def _lock_site(cur: psycopg.Cursor[Any], site_id: str) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('scopemeter.compute'), hashtext(%s))", (site_id,))


def _rollup(
    cur: psycopg.Cursor[Any], site: str | None, b0: datetime | None, b1: datetime | None, series: str
) -> None:
    params = {"site": site, "b0": b0, "b1": b1, "series": series, "carriers": _SCOPE2}
    cur.execute(_DELETE_ROLLUPS, params)
    cur.execute(_INSERT_ROLLUPS, params)


def _load(cur: psycopg.Cursor[Any], sql: str, params: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
    rows = cur.execute(sql, params).fetchall()
    ts = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    value = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    return ts, value


def recompute(
    conn: psycopg.Connection[Any], dirty: DirtyRange, *, factor_series: str = DEFAULT_FACTOR_SERIES
) -> RecomputeResult:
    """Recompute the buckets a dirty range can have changed; commits its own transaction."""
    meter, q = dirty.meter_id, dirty.quantity
    if q != COUNTER:
        return RecomputeResult(meter, dirty.site_id, None, None, skipped=f"quantity {q} is not computed")
    with conn.transaction(), conn.cursor() as cur:
        site = _one(cur, "SELECT site_id FROM meters WHERE meter_id = %s", (meter,))
        registered = site is not None
        if site is None:
            site = dirty.site_id
            log.warning("meter %s (site %s) is not in the fleet registry: no rollup", meter, site)
        _lock_site(cur, site)
        prev = _one(cur, _LAST_BEFORE.format(op="<"), (meter, q, dirty.t_min))
        nxt = _one(cur, _FIRST_AFTER.format(op=">"), (meter, q, dirty.t_max))
        b0 = from_ms(floor_bucket(to_ms(prev or dirty.t_min)))
        b1 = from_ms(ceil_bucket(to_ms(nxt or dirty.t_max)))
        if b1 <= b0:  # a lone reading on a boundary: no interval, nothing to change
            return RecomputeResult(meter, site, None, None, registered=registered, skipped="no interval")
        lo = _one(cur, _LAST_BEFORE.format(op="<="), (meter, q, b0)) or b0
        hi = _one(cur, _FIRST_AFTER.format(op=">="), (meter, q, b1)) or b1
        ts, value = _load(cur, _LOAD, (meter, q, lo, hi))
        energy = bucket_energy(ts, value)
        keep = (energy.starts >= to_ms(b0)) & (energy.starts < to_ms(b1))
        starts, kwh = energy.starts[keep], energy.kwh[keep]
        cur.execute(
            "DELETE FROM meter_energy_15m WHERE meter_id = %s AND bucket >= %s AND bucket < %s",
            (meter, b0, b1),
        )
        cur.execute(_INSERT_ENERGY, (meter, starts.tolist(), kwh.tolist()))
        if registered:
            _rollup(cur, site, b0, b1, factor_series)
    return RecomputeResult(
        meter, site, b0, b1, len(ts), len(starts), energy.negative_deltas, registered=registered
    )


@dataclass(frozen=True)
class RebuildResult:
    meters: int
    buckets: int
    rollups: int
    negative_deltas: int


def recompute_all(
    conn: psycopg.Connection[Any], *, factor_series: str = DEFAULT_FACTOR_SERIES
) -> RebuildResult:
    """Rebuild both 15-minute tables from every reading, in one transaction (e.g. after the factor
    library or the fleet registry changed). Incremental recomputes wait for it."""
    buckets = negatives = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("LOCK TABLE meter_energy_15m, site_rollups_15m IN EXCLUSIVE MODE")
        meters = [
            r[0]
            for r in cur.execute(
                "SELECT DISTINCT meter_id FROM readings WHERE quantity = %s ORDER BY meter_id", (COUNTER,)
            ).fetchall()
        ]
        cur.execute("DELETE FROM meter_energy_15m")
        for meter in meters:
            energy = bucket_energy(*_load(cur, _LOAD_ALL, (meter, COUNTER)))
            cur.execute(_INSERT_ENERGY, (meter, energy.starts.tolist(), energy.kwh.tolist()))
            buckets += len(energy.starts)
            negatives += energy.negative_deltas
        _rollup(cur, None, None, None, factor_series)
        rollups = cur.rowcount
    return RebuildResult(len(meters), buckets, rollups, negatives)
