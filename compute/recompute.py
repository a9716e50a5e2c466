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

What is computed, per meter carrier (``CARRIERS``): Scope 2 location-based for electricity, heat,
steam and cooling from the ``energy_import_kwh`` counter; Scope 1 ``direct`` for natural gas from
the ``gas_m3`` counter, diesel from ``fuel_l`` (litres), LPG and coal from ``fuel_kg``, with CO2,
CH4 and N2O kept apart. Counter handling follows ``compute.kernels``: the
meter's ``counter_max`` undoes wraps, quality bits mark resets/replacements, intervals longer
than the meter's ``max_gap_s`` (default: settings) are estimated energy. Rollups keep
``kwh_estimated`` apart and carry ``coverage`` (measured meter-time / registered meters × 15 min).
Scope 2 changes also rebuild the affected hours of market-based Scope 2 (``compute.market``).

Factors: Scope 2 uses the ``emission_factors`` row for the site's ``grid_region`` + carrier in the
site's ``factor_series`` (default: settings); Scope 1 the fuel series, the site's region first,
else ``GLOBAL``; unit must match the counter's; validity (site-local calendar dates) must cover
the bucket; highest version first. ``kg_co2e`` is NULL where none does. Meters missing from the
registry get ``meter_energy_15m`` rows (as electricity) but no rollup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import psycopg

from compute.config import Carrier
from compute.kernels import BUCKET_MS, bucket_energy, ceil_bucket, event_counts, floor_bucket
from compute.market import rebuild_market, recompute_market
from edge.wire import Quantity
from ingest.events import DirtyRange
from ops.settings import ComputeSettings

log = logging.getLogger("scopemeter.compute")

COUNTER: Final = Quantity.ENERGY_IMPORT_KWH.value
DEFAULT_FACTOR_SERIES: Final = "national-power-average"
DEFAULT_FUEL_SERIES: Final = "ipcc-2006-default"
DEFAULT_MAX_GAP_S: Final = 900.0


@dataclass(frozen=True)
class CarrierRule:
    quantity: str  # the counter computed for meters of this carrier
    unit: str  # its unit, which the factor's unit must equal
    scope: int
    method: str


_S2 = (COUNTER, "kWh", 2, "location")
CARRIERS: Final[dict[str, CarrierRule]] = {
    Carrier.ELECTRICITY.value: CarrierRule(*_S2),
    Carrier.HEAT.value: CarrierRule(*_S2),
    Carrier.STEAM.value: CarrierRule(*_S2),
    Carrier.COOLING.value: CarrierRule(*_S2),
    Carrier.NATURAL_GAS.value: CarrierRule(Quantity.GAS_M3.value, "m3", 1, "direct"),
    # Diesel is metered by volume (flow totalisers on gensets and boilers); LPG and coal by mass
    # (weighed cylinders, weighbridges), which is also the unit their IPCC factors are given in.
    Carrier.DIESEL.value: CarrierRule(Quantity.FUEL_L.value, "l", 1, "direct"),
    Carrier.LPG.value: CarrierRule(Quantity.FUEL_KG.value, "kg", 1, "direct"),
    Carrier.COAL.value: CarrierRule(Quantity.FUEL_KG.value, "kg", 1, "direct"),
}
_RULE_COLUMNS = {
    "r_carrier": list(CARRIERS),
    "r_unit": [r.unit for r in CARRIERS.values()],
    "r_scope": [r.scope for r in CARRIERS.values()],
    "r_method": [r.method for r in CARRIERS.values()],
}


@dataclass(frozen=True)
class Params:
    """What a recompute needs besides the data (from settings)."""

    factor_series: str = DEFAULT_FACTOR_SERIES
    fuel_series: str = DEFAULT_FUEL_SERIES
    max_gap_s: float = DEFAULT_MAX_GAP_S

    @classmethod
    def from_settings(cls, c: ComputeSettings) -> Params:
        return cls(c.factor_series, c.fuel_factor_series, c.max_gap_s)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


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
    events: dict[str, int] = field(default_factory=dict)  # wraps, resets, drops, gaps, … (kernels)
    registered: bool = True  # meter found in the fleet registry
    skipped: str | None = None


_LAST_BEFORE = (
    "SELECT ts FROM readings WHERE meter_id = %s AND quantity = %s AND ts {op} %s ORDER BY ts DESC LIMIT 1"
)
_FIRST_AFTER = (
    "SELECT ts FROM readings WHERE meter_id = %s AND quantity = %s AND ts {op} %s ORDER BY ts LIMIT 1"
)
_LOAD = (
    "SELECT floor(extract(epoch FROM ts) * 1000)::bigint, value, quality FROM readings"
    " WHERE meter_id = %s AND quantity = %s AND ts >= %s AND ts <= %s ORDER BY ts"
)
_LOAD_ALL = (
    "SELECT floor(extract(epoch FROM ts) * 1000)::bigint, value, quality FROM readings"
    " WHERE meter_id = %s AND quantity = %s ORDER BY ts"
)
_INSERT_ENERGY = (
    "INSERT INTO meter_energy_15m (meter_id, bucket, kwh, kwh_estimated, measured_ms, flags)"
    " SELECT %s, to_timestamp(b::float8 / 1000), k, e, ms, f"
    " FROM unnest(%s::bigint[], %s::float8[], %s::float8[], %s::bigint[], %s::int[]) AS u(b, k, e, ms, f)"
)
# Bounds are optional: NULL means unbounded (the full rebuild).
_DELETE_ROLLUPS = (
    "DELETE FROM site_rollups_15m WHERE method IN ('location', 'direct')"
    " AND (%(site)s::text IS NULL OR site_id = %(site)s)"
    " AND (%(b0)s::timestamptz IS NULL OR bucket >= %(b0)s)"
    " AND (%(b1)s::timestamptz IS NULL OR bucket < %(b1)s)"
)
_INSERT_ROLLUPS = """
INSERT INTO site_rollups_15m (site_id, bucket, carrier, scope, method, activity_unit, kwh, kwh_estimated,
                              coverage, kg_co2e, kg_co2, kg_ch4, kg_n2o, factor_id)
SELECT e.site_id, e.bucket, e.carrier, e.scope, e.method, e.unit, e.kwh, e.est,
       e.measured_ms::float8 / (n.meters * %(bucket_ms)s),
       e.kwh * f.kg_co2e_per_unit, e.kwh * f.kg_co2_per_unit, e.kwh * f.kg_ch4_per_unit,
       e.kwh * f.kg_n2o_per_unit, f.factor_id
FROM (
    SELECT m.site_id, me.bucket, m.carrier, r.unit, r.scope, r.method,
           sum(me.kwh ORDER BY me.meter_id) AS kwh, sum(me.kwh_estimated ORDER BY me.meter_id) AS est,
           sum(me.measured_ms) AS measured_ms
    FROM meter_energy_15m me JOIN meters m USING (meter_id)
    JOIN unnest(%(r_carrier)s::text[], %(r_unit)s::text[], %(r_scope)s::int[], %(r_method)s::text[])
         AS r(carrier, unit, scope, method) ON r.carrier = m.carrier
    WHERE (%(site)s::text IS NULL OR m.site_id = %(site)s)
      AND (%(b0)s::timestamptz IS NULL OR me.bucket >= %(b0)s)
      AND (%(b1)s::timestamptz IS NULL OR me.bucket < %(b1)s)
    GROUP BY m.site_id, me.bucket, m.carrier, r.unit, r.scope, r.method
) e
JOIN sites s ON s.site_id = e.site_id
CROSS JOIN LATERAL (
    SELECT count(*) AS meters FROM meters WHERE site_id = e.site_id AND carrier = e.carrier
) n
LEFT JOIN LATERAL (
    SELECT ef.factor_id, ef.kg_co2e_per_unit, ef.kg_co2_per_unit, ef.kg_ch4_per_unit, ef.kg_n2o_per_unit
    FROM emission_factors ef
    WHERE ef.carrier = e.carrier AND ef.unit = e.unit
      AND CASE WHEN e.scope = 2
               THEN ef.region = s.grid_region AND ef.series = coalesce(s.factor_series, %(series)s)
               ELSE ef.region IN (s.grid_region, 'GLOBAL') AND ef.series = %(fuel_series)s END
      AND ef.valid_from <= (e.bucket AT TIME ZONE s.timezone)::date
      AND (e.bucket AT TIME ZONE s.timezone)::date < ef.valid_to
    ORDER BY (ef.region = s.grid_region) DESC, ef.version DESC, ef.factor_id
    LIMIT 1
) f ON true
"""


def _one(cur: psycopg.Cursor[Any], sql: str, params: tuple[Any, ...]) -> Any:
    row = cur.execute(sql, params).fetchone()
    return row[0] if row else None


def lock_site(cur: psycopg.Cursor[Any], site_id: str) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('scopemeter.compute'), hashtext(%s))", (site_id,))


def _rollup(
    cur: psycopg.Cursor[Any], site: str | None, b0: datetime | None, b1: datetime | None, params: Params
) -> None:
    args = {
        "site": site,
        "b0": b0,
        "b1": b1,
        "series": params.factor_series,
        "fuel_series": params.fuel_series,
        "bucket_ms": BUCKET_MS,
        **_RULE_COLUMNS,
    }
    cur.execute(_DELETE_ROLLUPS, args)
    cur.execute(_INSERT_ROLLUPS, args)


def _load(
    cur: psycopg.Cursor[Any], sql: str, params: tuple[Any, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = cur.execute(sql, params).fetchall()
    ts = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    value = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    quality = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
    return ts, value, quality


@dataclass(frozen=True)
class _Meter:
    site_id: str
    carrier: str
    counter_max: float
    max_gap_ms: int
    registered: bool


def _meter(cur: psycopg.Cursor[Any], meter_id: str, site_hint: str, params: Params) -> _Meter:
    row = cur.execute(
        "SELECT site_id, carrier, counter_max, max_gap_s FROM meters WHERE meter_id = %s", (meter_id,)
    ).fetchone()
    if row is None:
        return _Meter(site_hint, Carrier.ELECTRICITY.value, 0.0, round(params.max_gap_s * 1000), False)
    gap = row[3] if row[3] is not None else params.max_gap_s
    return _Meter(row[0], row[1], float(row[2] or 0.0), round(gap * 1000), True)


def _write_energy(cur: psycopg.Cursor[Any], meter_id: str, e: Any) -> None:
    cur.execute(
        _INSERT_ENERGY,
        (
            meter_id,
            e.starts.tolist(),
            e.kwh.tolist(),
            e.kwh_estimated.tolist(),
            e.measured_ms.tolist(),
            e.flags.tolist(),
        ),
    )


def _params(params: Params | None, factor_series: str | None) -> Params:
    params = params or Params()
    return replace(params, factor_series=factor_series) if factor_series else params


def recompute(
    conn: psycopg.Connection[Any],
    dirty: DirtyRange,
    params: Params | None = None,
    *,
    factor_series: str | None = None,
) -> RecomputeResult:
    """Recompute the buckets a dirty range can have changed; commits its own transaction.
    ``factor_series`` overrides ``params.factor_series``."""
    params = _params(params, factor_series)
    meter_id, q = dirty.meter_id, dirty.quantity
    with conn.transaction(), conn.cursor() as cur:
        meter = _meter(cur, meter_id, dirty.site_id, params)
        rule = CARRIERS.get(meter.carrier)
        if rule is None or rule.quantity != q:
            return RecomputeResult(
                meter_id,
                meter.site_id,
                None,
                None,
                registered=meter.registered,
                skipped=f"quantity {q} is not computed for {meter.carrier} meters",
            )
        if not meter.registered:
            log.warning("meter %s (site %s) is not in the fleet registry: no rollup", meter_id, meter.site_id)
        lock_site(cur, meter.site_id)
        prev = _one(cur, _LAST_BEFORE.format(op="<"), (meter_id, q, dirty.t_min))
        nxt = _one(cur, _FIRST_AFTER.format(op=">"), (meter_id, q, dirty.t_max))
        b0 = from_ms(floor_bucket(to_ms(prev or dirty.t_min)))
        b1 = from_ms(ceil_bucket(to_ms(nxt or dirty.t_max)))
        if b1 <= b0:  # a lone reading on a boundary: no interval, nothing to change
            return RecomputeResult(
                meter_id, meter.site_id, None, None, registered=meter.registered, skipped="no interval"
            )
        lo = _one(cur, _LAST_BEFORE.format(op="<="), (meter_id, q, b0)) or b0
        hi = _one(cur, _FIRST_AFTER.format(op=">="), (meter_id, q, b1)) or b1
        ts, value, quality = _load(cur, _LOAD, (meter_id, q, lo, hi))
        energy = bucket_energy(ts, value, quality, counter_max=meter.counter_max, max_gap_ms=meter.max_gap_ms)
        keep = (energy.starts >= to_ms(b0)) & (energy.starts < to_ms(b1))
        kept = energy._replace(
            starts=energy.starts[keep],
            kwh=energy.kwh[keep],
            kwh_estimated=energy.kwh_estimated[keep],
            measured_ms=energy.measured_ms[keep],
            flags=energy.flags[keep],
        )
        cur.execute(
            "DELETE FROM meter_energy_15m WHERE meter_id = %s AND bucket >= %s AND bucket < %s",
            (meter_id, b0, b1),
        )
        _write_energy(cur, meter_id, kept)
        if meter.registered:
            _rollup(cur, meter.site_id, b0, b1, params)
            if rule.scope == 2:
                recompute_market(cur, meter.site_id, b0, b1)
    return RecomputeResult(
        meter_id,
        meter.site_id,
        b0,
        b1,
        len(ts),
        len(kept.starts),
        event_counts(energy.interval_flags),
        registered=meter.registered,
    )


@dataclass(frozen=True)
class RebuildResult:
    meters: int
    buckets: int
    rollups: int
    events: dict[str, int]


def recompute_all(
    conn: psycopg.Connection[Any], params: Params | None = None, *, factor_series: str | None = None
) -> RebuildResult:
    """Rebuild both 15-minute tables from every reading, in one transaction (e.g. after the factor
    library or the fleet registry changed). Incremental recomputes wait for it."""
    params = _params(params, factor_series)
    buckets = 0
    events: dict[str, int] = {}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("LOCK TABLE meter_energy_15m, site_rollups_15m IN EXCLUSIVE MODE")
        pairs = cur.execute(
            "SELECT DISTINCT meter_id, quantity FROM readings WHERE quantity = ANY(%s) ORDER BY 1, 2",
            (sorted({r.quantity for r in CARRIERS.values()}),),
        ).fetchall()
        cur.execute("DELETE FROM meter_energy_15m")
        meters = 0
        for meter_id, q in pairs:
            meter = _meter(cur, meter_id, "", params)
            rule = CARRIERS.get(meter.carrier)
            if rule is None or rule.quantity != q:
                continue
            ts, value, quality = _load(cur, _LOAD_ALL, (meter_id, q))
            energy = bucket_energy(
                ts, value, quality, counter_max=meter.counter_max, max_gap_ms=meter.max_gap_ms
            )
            _write_energy(cur, meter_id, energy)
            meters += 1
            buckets += len(energy.starts)
            for k, v in event_counts(energy.interval_flags).items():
                events[k] = events.get(k, 0) + v
        _rollup(cur, None, None, None, params)
        rollups = cur.rowcount
        rebuild_market(cur)
    return RebuildResult(meters, buckets, rollups, events)
