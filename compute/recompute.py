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
steam and cooling from the ``energy_import_kwh`` counter; Scope 1 ``direct`` for fuels from the
counter of the unit the meter counts in (``QUANTITY_OF_UNIT``: natural gas in m3 from ``gas_m3``
or in kWh from ``energy_import_kwh``, diesel/LPG in litres from ``fuel_l`` or kg from ``fuel_kg``,
coal in kg), with CO2, CH4 and N2O kept apart. Rollups are per activity class: carrier, unit, CV
basis (kWh gas), reference conditions (m3 gas) and fuel type (coal type). Counter handling
follows ``compute.kernels``: the meter's ``counter_max`` undoes wraps, quality bits mark
resets/replacements, intervals longer than the meter's ``max_gap_s`` (default: settings) are
estimated energy. Rollups keep ``kwh_estimated`` apart and carry ``coverage`` (measured
meter-time / registered meters of the class × 15 min). Scope 2 changes also rebuild the affected
hours of market-based Scope 2 (``compute.market``).

Factors: Scope 2 uses the ``emission_factors`` row for the site's ``grid_region`` + carrier in the
site's ``factor_series`` (default: settings); Scope 1 the site's ``fuel_series`` (default:
settings), the site's region first, then its country (``CN`` for ``CN-North``), else ``GLOBAL``;
unit, CV basis (kWh only), reference conditions and fuel type must match the meter's; validity
(site-local calendar dates) must cover the bucket; newest vintage, then highest version first.
Where none does, ``kg_co2e`` is NULL and ``refusal`` says what was missing (view
``site_refusals``), e.g. cooling without a factor source: statements must not go Final. Meters
missing from the registry get ``meter_energy_15m`` rows (as electricity) but no rollup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import psycopg

from compute.config import SCOPE2_CARRIERS, Carrier
from compute.fleet import METER_UNITS
from compute.kernels import BUCKET_MS, bucket_energy, ceil_bucket, event_counts, floor_bucket
from compute.market import rebuild_market, recompute_market
from compute.quarantine import record as record_quarantine
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
    scope: int
    method: str


# The counter a meter's readings must carry, by the unit the meter counts in (compute.fleet).
QUANTITY_OF_UNIT: Final[dict[str, str]] = {
    "kWh": COUNTER,
    "m3": Quantity.GAS_M3.value,
    "l": Quantity.FUEL_L.value,
    "kg": Quantity.FUEL_KG.value,
}
CARRIERS: Final[dict[str, CarrierRule]] = {
    c.value: CarrierRule(2, "location") if c in SCOPE2_CARRIERS else CarrierRule(1, "direct") for c in Carrier
}
_RULE_COLUMNS = {
    "r_carrier": list(CARRIERS),
    "r_unit": [METER_UNITS[Carrier(c)][0] for c in CARRIERS],
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
# The one factor lookup (Scope 2: the site's region and factor series; Scope 1: its fuel series,
# region, then country, then GLOBAL; newest vintage, then highest version). Factors applied before
# migration 0004 (no gases, no data year: not disclosure-grade, possibly open-ended) stay in the
# table for the rollups that cite them but are never chosen again. Needs ``e`` (carrier,
# unit, cv_basis, refc, fuel_type, scope) and ``s`` (a sites row); ``{day}`` is the site-local date.
FACTOR_LOOKUP: Final = """
    SELECT ef.factor_id, ef.kg_co2e_per_unit, ef.kg_co2_per_unit, ef.kg_ch4_per_unit, ef.kg_n2o_per_unit
    FROM emission_factors ef
    WHERE ef.carrier = e.carrier AND ef.unit = e.unit
      AND ef.gases IS NOT NULL AND ef.data_year IS NOT NULL
      AND ef.reference_conditions = e.refc AND ef.fuel_type = e.fuel_type
      AND (e.scope = 2 OR e.unit <> 'kWh' OR ef.cv_basis = e.cv_basis)
      AND CASE WHEN e.scope = 2
               THEN ef.region = s.grid_region AND ef.series = coalesce(s.factor_series, %(series)s)
               ELSE ef.region IN (s.grid_region, split_part(s.grid_region, '-', 1), 'GLOBAL')
                    AND ef.series = coalesce(s.fuel_series, %(fuel_series)s) END
      AND ef.valid_from <= {day} AND {day} < ef.valid_to
    ORDER BY (ef.region = s.grid_region) DESC, (ef.region = split_part(s.grid_region, '-', 1)) DESC,
             ef.data_year DESC NULLS LAST, ef.version DESC, ef.factor_id
    LIMIT 1
"""

_INSERT_ROLLUPS = """
INSERT INTO site_rollups_15m (site_id, bucket, carrier, scope, method, activity_unit, cv_basis,
                              reference_conditions, fuel_type, kwh, kwh_estimated, coverage, kg_co2e,
                              kg_co2, kg_ch4, kg_n2o, factor_id, refusal)
SELECT e.site_id, e.bucket, e.carrier, e.scope, e.method, e.unit, e.cv_basis, e.refc, e.fuel_type, e.kwh,
       e.est, e.measured_ms::float8 / (n.meters * %(bucket_ms)s),
       e.kwh * f.kg_co2e_per_unit, e.kwh * f.kg_co2_per_unit, e.kwh * f.kg_ch4_per_unit,
       e.kwh * f.kg_n2o_per_unit, f.factor_id,
       CASE WHEN f.factor_id IS NULL THEN
           format('no emission factor for %%s per %%s%%s%%s%%s in series %%L for region %%L on this date',
                  e.carrier, e.unit, nullif(' (' || e.cv_basis || ' CV)', ' ( CV)'),
                  nullif(' at ' || e.refc, ' at '), nullif(', type ' || e.fuel_type, ', type '),
                  CASE WHEN e.scope = 2 THEN coalesce(s.factor_series, %(series)s)
                       ELSE coalesce(s.fuel_series, %(fuel_series)s) END, s.grid_region)
       END
FROM (
    SELECT m.site_id, me.bucket, m.carrier, coalesce(m.activity_unit, r.unit) AS unit,
           m.cv_basis, m.reference_conditions AS refc, m.fuel_type, r.scope, r.method,
           sum(me.kwh ORDER BY me.meter_id) AS kwh, sum(me.kwh_estimated ORDER BY me.meter_id) AS est,
           sum(me.measured_ms) AS measured_ms
    FROM meter_energy_15m me JOIN meters m USING (meter_id)
    JOIN unnest(%(r_carrier)s::text[], %(r_unit)s::text[], %(r_scope)s::int[], %(r_method)s::text[])
         AS r(carrier, unit, scope, method) ON r.carrier = m.carrier
    WHERE (%(site)s::text IS NULL OR m.site_id = %(site)s)
      AND (%(b0)s::timestamptz IS NULL OR me.bucket >= %(b0)s)
      AND (%(b1)s::timestamptz IS NULL OR me.bucket < %(b1)s)
    GROUP BY m.site_id, me.bucket, m.carrier, coalesce(m.activity_unit, r.unit), m.cv_basis,
             m.reference_conditions, m.fuel_type, r.scope, r.method
) e
JOIN sites s ON s.site_id = e.site_id
CROSS JOIN LATERAL (
    SELECT count(*) AS meters FROM meters mm
    JOIN unnest(%(r_carrier)s::text[], %(r_unit)s::text[]) AS r(carrier, unit) ON r.carrier = mm.carrier
    WHERE mm.site_id = e.site_id AND mm.carrier = e.carrier AND coalesce(mm.activity_unit, r.unit) = e.unit
      AND mm.cv_basis = e.cv_basis AND mm.reference_conditions = e.refc AND mm.fuel_type = e.fuel_type
) n
LEFT JOIN LATERAL ({lookup}) f ON true
""".format(lookup=FACTOR_LOOKUP.format(day="(e.bucket AT TIME ZONE s.timezone)::date"))


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
    unit: str  # what the counter measures (compute.fleet.METER_UNITS)
    max_kw: float = 0.0  # per-meter plausibility bound (compute.quarantine); 0 = none

    @property
    def quantity(self) -> str:
        return QUANTITY_OF_UNIT[self.unit]


def _meter(cur: psycopg.Cursor[Any], meter_id: str, site_hint: str, params: Params) -> _Meter:
    row = cur.execute(
        "SELECT site_id, carrier, counter_max, max_gap_s, activity_unit, max_kw FROM meters"
        " WHERE meter_id = %s",
        (meter_id,),
    ).fetchone()
    if row is None:
        return _Meter(site_hint, Carrier.ELECTRICITY.value, 0.0, round(params.max_gap_s * 1000), False, "kWh")
    gap = row[3] if row[3] is not None else params.max_gap_s
    unit = row[4] or METER_UNITS[Carrier(row[1])][0]
    return _Meter(row[0], row[1], float(row[2] or 0.0), round(gap * 1000), True, unit, float(row[5] or 0.0))


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
        rule = CARRIERS[meter.carrier]
        if meter.quantity != q:
            return RecomputeResult(
                meter_id,
                meter.site_id,
                None,
                None,
                registered=meter.registered,
                skipped=f"quantity {q} is not computed for {meter.carrier} meters counting in {meter.unit}",
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
        energy = bucket_energy(
            ts,
            value,
            quality,
            counter_max=meter.counter_max,
            max_gap_ms=meter.max_gap_ms,
            max_kw=meter.max_kw,
        )
        record_quarantine(cur, meter_id, q, ts, value, energy.interval_flags, meter.max_kw)
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
            (sorted(set(QUANTITY_OF_UNIT.values())),),
        ).fetchall()
        cur.execute("DELETE FROM meter_energy_15m")
        cur.execute("DELETE FROM quarantined_readings")
        meters = 0
        for meter_id, q in pairs:
            meter = _meter(cur, meter_id, "", params)
            if meter.quantity != q:
                continue
            ts, value, quality = _load(cur, _LOAD_ALL, (meter_id, q))
            energy = bucket_energy(
                ts,
                value,
                quality,
                counter_max=meter.counter_max,
                max_gap_ms=meter.max_gap_ms,
                max_kw=meter.max_kw,
            )
            record_quarantine(cur, meter_id, q, ts, value, energy.interval_flags, meter.max_kw, whole=True)
            _write_energy(cur, meter_id, energy)
            meters += 1
            buckets += len(energy.starts)
            for k, v in event_counts(energy.interval_flags).items():
                events[k] = events.get(k, 0) + v
        _rollup(cur, None, None, None, params)
        rollups = cur.rowcount
        rebuild_market(cur)
    return RebuildResult(meters, buckets, rollups, events)
