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
- the site sum is ``sum(kwh ORDER BY meter_id COLLATE "C")``, independent of physical row order
  and of the database's collation; the rebuild folds the same sums in numba in the same
  (code-point) order (``kernels.ordered_group_sums``), so both paths are bit-identical;
- where new readings only append to a series, the first bucket's fold is continued from its
  stored row instead of re-reading the bucket, only after checking that the row is bit for bit the
  fold through the reading before them (``_continued``): the same additions in the same order;
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

import functools
import logging
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from compute.config import SCOPE2_CARRIERS, Carrier
from compute.fleet import METER_UNITS
from compute.kernels import (
    BUCKET_MS,
    EVENT_NAMES,
    Seeds,
    window_order,
)
from compute.kernels import (
    bucket_energy_many as bucket_energy_many,  # re-exported: tests count its calls here
)
from compute.market import recompute_market_set
from compute.quarantine import Series, record_many
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


# Per-connection temporary tables, emptied at every commit: the poll's windows (one per meter and
# counter: the buckets B = [b0, b1) to rewrite and the readings [lo, hi] that determine them).
_TEMP_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS compute_windows (i bigint PRIMARY KEY, meter_id text NOT NULL,"
    " quantity text NOT NULL, b0 timestamptz NOT NULL, b1 timestamptz NOT NULL, lo timestamptz NOT NULL,"
    " hi timestamptz NOT NULL, prev_ts timestamptz, has_next boolean) ON COMMIT DELETE ROWS"
)
# One query for the whole poll: B from the neighbours of every dirty range (see the module doc),
# then the readings just outside B that bound its intervals. Epoch-ms arithmetic as in ``to_ms``.
_WINDOWS = f"""
INSERT INTO compute_windows (i, meter_id, quantity, b0, b1, lo, hi, prev_ts, has_next)
SELECT i, meter_id, quantity, b0, b1,
       coalesce((SELECT x.ts FROM readings x WHERE x.meter_id = w.meter_id AND x.quantity = w.quantity
                 AND x.ts <= w.b0 ORDER BY x.ts DESC LIMIT 1), w.b0),
       -- nothing after the range: its last reading t_max is the series' end, at most 1 ms past b1
       -- (b1 is reckoned in whole ms, readings are stored to the µs)
       CASE WHEN next_ts IS NULL THEN greatest(w.b1, w.t_max)
            ELSE coalesce((SELECT x.ts FROM readings x WHERE x.meter_id = w.meter_id
                           AND x.quantity = w.quantity AND x.ts >= w.b1 ORDER BY x.ts LIMIT 1), w.b1) END,
       prev_ts, next_ts IS NOT NULL
FROM (
    SELECT i, meter_id, quantity, t_max, prev_ts, next_ts,
           to_timestamp((floor(extract(epoch FROM coalesce(prev_ts, t_min)) * 1000)::bigint
                         / {BUCKET_MS} * {BUCKET_MS})::float8 / 1000) AS b0,
           to_timestamp(((floor(extract(epoch FROM coalesce(next_ts, t_max)) * 1000)::bigint
                          + {BUCKET_MS - 1}) / {BUCKET_MS} * {BUCKET_MS})::float8 / 1000) AS b1
    FROM (
        SELECT r.i, r.meter_id, r.quantity, r.t_min, r.t_max,
               (SELECT x.ts FROM readings x WHERE x.meter_id = r.meter_id AND x.quantity = r.quantity
                AND x.ts < r.t_min ORDER BY x.ts DESC LIMIT 1) AS prev_ts,
               (SELECT x.ts FROM readings x WHERE x.meter_id = r.meter_id AND x.quantity = r.quantity
                AND x.ts > r.t_max ORDER BY x.ts LIMIT 1) AS next_ts
        FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
             AS r(i, meter_id, quantity, t_min, t_max)
        OFFSET 0  -- not pulled up: each neighbour query runs once, not once per reference
    ) p
) w
WHERE b1 > b0
"""
# Every reading of every window as fixed-width binary rows, unordered: numpy sorts them by window
# and time faster than PostgreSQL does (and the rebuild's plan becomes a plain scan).
# Each window is one primary-key range scan (the LATERAL subquery is kept apart by OFFSET 0), so
# the cost follows the rows loaded: joined by hash, a poll read every reading of the table.
_LOAD_WINDOWS = """
COPY (SELECT w.i, x.ts, x.value, x.quality
      FROM compute_windows w CROSS JOIN LATERAL (
          SELECT r.ts, r.value, r.quality FROM readings r
          WHERE r.meter_id = w.meter_id AND r.quantity = w.quantity AND r.ts >= w.lo AND r.ts <= w.hi
          OFFSET 0) x)
TO STDOUT (FORMAT BINARY)
"""
# JIT compiling these plans costs more than running them (hundreds of ms per poll).
_NO_JIT: Final = "SET LOCAL jit = off"
_DELETE_WINDOWS = (
    "DELETE FROM meter_energy_15m me USING compute_windows w"
    " WHERE me.meter_id = w.meter_id AND me.bucket >= w.b0 AND me.bucket < w.b1"
)
_COPY_ENERGY = (
    "COPY meter_energy_15m (meter_id, bucket, kwh, kwh_estimated, measured_ms, flags)"
    " FROM STDIN (FORMAT BINARY)"
)
_SITE_RANGES = (
    "unnest(%(sr_site)s::text[], %(sr_b0)s::timestamptz[], %(sr_b1)s::timestamptz[]) AS sr(site_id, b0, b1)"
)
# Only the poll's merged site ranges: each (site, bucket) is deleted and rebuilt once per poll.
_DELETE_ROLLUPS = (
    "DELETE FROM site_rollups_15m r USING " + _SITE_RANGES + " WHERE r.method IN ('location', 'direct')"
    " AND r.site_id = sr.site_id AND r.bucket >= sr.b0 AND r.bucket < sr.b1"
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

# Site rollups, set-based in three statements over staging tables (ANALYZEd, so the planner joins
# them by hash): (1) meter rows summed per site, bucket and activity class; (2) the factor looked
# up once per (site, class, site-local day), not per bucket; (3) one INSERT joining them with the
# registered meters per class (coverage) into ``site_rollups_15m``.
_ROLLUP_TEMP_DDL: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS compute_rollup_stage (k text, site_id text, bucket timestamptz,"
    " day date, carrier text, unit text, cv_basis text, refc text, fuel_type text, scope int, method text,"
    " kwh float8, est float8, measured_ms bigint) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS compute_factor_days (k text, site_id text, day date, carrier text,"
    " unit text, cv_basis text, refc text, fuel_type text, scope int, factor_id text,"
    " kg_co2e_per_unit float8, kg_co2_per_unit float8, kg_ch4_per_unit float8,"
    " kg_n2o_per_unit float8) ON COMMIT DELETE ROWS",
)
# (site, activity class) as ONE join key: the planner misjudges a join on seven columns whose
# values repeat ('' for most) as matching one row, and would nest loops over the staged rows.
_CLASS_KEY: Final = (
    "concat_ws(chr(31), m.site_id, m.carrier, coalesce(m.activity_unit, r.unit), m.cv_basis,"
    " m.reference_conditions, m.fuel_type, r.scope::text)"
)
_STAGE_ROLLUPS = """
INSERT INTO compute_rollup_stage
SELECT {key}, m.site_id, me.bucket, (me.bucket AT TIME ZONE s.timezone)::date, m.carrier,
       coalesce(m.activity_unit, r.unit), m.cv_basis, m.reference_conditions, m.fuel_type, r.scope, r.method,
       sum(me.kwh ORDER BY me.meter_id COLLATE "C"), sum(me.kwh_estimated ORDER BY me.meter_id COLLATE "C"),
       sum(me.measured_ms)
FROM {source}
JOIN sites s ON s.site_id = m.site_id
JOIN unnest(%(r_carrier)s::text[], %(r_unit)s::text[], %(r_scope)s::int[], %(r_method)s::text[])
     AS r(carrier, unit, scope, method) ON r.carrier = m.carrier
GROUP BY m.site_id, me.bucket, s.timezone, m.carrier, coalesce(m.activity_unit, r.unit), m.cv_basis,
         m.reference_conditions, m.fuel_type, r.scope, r.method
"""
_STAGE_FACTORS = """
INSERT INTO compute_factor_days
SELECT e.k, e.site_id, e.day, e.carrier, e.unit, e.cv_basis, e.refc, e.fuel_type, e.scope, f.*
FROM (SELECT DISTINCT k, site_id, day, carrier, unit, cv_basis, refc, fuel_type, scope
      FROM compute_rollup_stage) e
JOIN sites s ON s.site_id = e.site_id
LEFT JOIN LATERAL ({lookup}) f ON true
""".format(lookup=FACTOR_LOOKUP.format(day="e.day"))
_MERGE_ROLLUPS = f"""
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
FROM compute_rollup_stage e
JOIN sites s ON s.site_id = e.site_id
JOIN (
    SELECT {_CLASS_KEY} AS k, count(*) AS meters
    FROM meters m
    JOIN unnest(%(r_carrier)s::text[], %(r_unit)s::text[], %(r_scope)s::int[]) AS r(carrier, unit, scope)
      ON r.carrier = m.carrier
    GROUP BY 1
) n ON n.k = e.k
JOIN compute_factor_days f ON f.k = e.k AND f.day = e.day
"""
_ROLLUP_SOURCE = (
    _SITE_RANGES + " JOIN meters m ON m.site_id = sr.site_id"
    " JOIN meter_energy_15m me ON me.meter_id = m.meter_id AND me.bucket >= sr.b0 AND me.bucket < sr.b1"
)
_STAGE_ROLLUPS_SET = _STAGE_ROLLUPS.format(source=_ROLLUP_SOURCE, key=_CLASS_KEY)


def _write_rollups(cur: psycopg.Cursor[Any], stage_sql: str, args: dict[str, Any]) -> int:
    """Stage, look factors up, merge (the caller deleted the rollups being replaced)."""
    for ddl in _ROLLUP_TEMP_DDL:
        cur.execute(ddl)
    cur.execute("TRUNCATE compute_rollup_stage, compute_factor_days")
    cur.execute(stage_sql, args)
    cur.execute("ANALYZE compute_rollup_stage")
    cur.execute(_STAGE_FACTORS, args)
    cur.execute("ANALYZE compute_factor_days")
    cur.execute(_MERGE_ROLLUPS, args)
    return cur.rowcount


def _lock_sites(cur: psycopg.Cursor[Any], sites: list[str]) -> None:
    """Advisory locks of the poll's sites, always taken in one order (no deadlock between workers)."""
    keys = sorted({_site_key(cur, s) for s in sites})
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext('scopemeter.compute'), k) FROM unnest(%s::int[]) AS k",
        (keys,),
    )


def lock_site(cur: psycopg.Cursor[Any], site_id: str) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('scopemeter.compute'), hashtext(%s))", (site_id,))


def _site_key(cur: psycopg.Cursor[Any], site: str) -> int:
    return _SITE_KEYS.get(site) or _SITE_KEYS.setdefault(site, _hashtext(cur, site))


_SITE_KEYS: dict[str, int] = {}


def _hashtext(cur: psycopg.Cursor[Any], text: str) -> int:
    row = cur.execute("SELECT hashtext(%s)", (text,)).fetchone()
    assert row is not None
    return int(row[0])


def _rollup_args(params: Params) -> dict[str, Any]:
    return {
        "series": params.factor_series,
        "fuel_series": params.fuel_series,
        "bucket_ms": BUCKET_MS,
        **_RULE_COLUMNS,
    }


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


def _meters(cur: psycopg.Cursor[Any], meter_ids: list[str], params: Params) -> dict[str, _Meter]:
    """The registry rows of all given meters in one query; unregistered ones are absent."""
    out = {}
    for mid, site, carrier, cmax, gap, unit, max_kw in cur.execute(
        "SELECT meter_id, site_id, carrier, counter_max, max_gap_s, activity_unit, max_kw FROM meters"
        " WHERE meter_id = ANY(%s)",
        (meter_ids,),
    ).fetchall():
        gap = gap if gap is not None else params.max_gap_s
        out[mid] = _Meter(
            site,
            carrier,
            float(cmax or 0.0),
            round(gap * 1000),
            True,
            unit or METER_UNITS[Carrier(carrier)][0],
            float(max_kw or 0.0),
        )
    return out


def _unregistered(site_hint: str, params: Params) -> _Meter:
    return _Meter(site_hint, Carrier.ELECTRICITY.value, 0.0, round(params.max_gap_s * 1000), False, "kWh")


# PostgreSQL binary COPY framing (protocol docs, "COPY … Binary Format"): a 19-byte header, per
# tuple an int16 field count then (int32 length, bytes) per field, an int16 -1 trailer.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"
# (window bigint, ts timestamptz = int64 µs since 2000-01-01, value float8, quality int4)
_LOADED = np.dtype(
    [
        ("n", ">i2"),
        ("l0", ">i4"),
        ("i", ">i8"),
        ("l1", ">i4"),
        ("ts", ">i8"),
        ("l2", ">i4"),
        ("v", ">f8"),
        ("l3", ">i4"),
        ("q", ">i4"),
    ]
)
_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 in Unix microseconds: binary timestamptz origin


def copy_out(cur: psycopg.Cursor[Any], sql: str) -> bytearray:
    """The whole output of ``COPY (…) TO STDOUT`` as one buffer, read with libpq directly.

    psycopg's ``Copy`` iterator costs one Python generator round and one ``wait()`` per row (about
    3 µs: more than PostgreSQL spends producing it); this loop is ``PQgetCopyData`` (blocking) and
    one ``bytearray.extend`` per row. ``Connection.pgconn`` is psycopg's documented low-level
    handle; the connection lock is held so nothing else uses the connection meanwhile, and the
    connection is left idle in the caller's transaction (or in error, which raises here).

    Sent by the extended protocol, which runs exactly one statement (the server refuses more; by
    the simple protocol a second COPY would leave libpq repeating its COPY_OUT result forever),
    in the connection's client encoding (read before: an aborted transaction reverts a SET of it).
    """
    conn = cur.connection
    pg = conn.pgconn
    encoding = conn.info.encoding
    buf = bytearray()
    with conn.lock:
        pg.send_query_params(sql.encode(encoding), None)
        while pg.flush():  # non-blocking connection: send the rest of the query
            select.select([], [pg.socket], [])
        result = pg.get_result()
        if result is not None and result.status == pq.ExecStatus.COPY_OUT:
            get, extend = pg.get_copy_data, buf.extend
            while True:
                n, data = get(0)
                if n < 0:
                    break
                extend(data)
        # Then the statement's end (COMMAND_OK, or the error that stopped it) and, in autocommit, an
        # error ending its implicit transaction (a deferred constraint): the last one is its outcome.
        while (extra := pg.get_result()) is not None:
            result = extra
    assert result is not None  # libpq returns a result for the statement sent
    if result.status == pq.ExecStatus.FATAL_ERROR:
        raise pg_errors.error_from_result(result, encoding=encoding)
    if result.status != pq.ExecStatus.COMMAND_OK:
        status = pq.ExecStatus(result.status).name
        raise psycopg.OperationalError(f"COPY TO STDOUT ended with {status}, not a COPY's COMMAND_OK")
    return buf


def _copy_out(cur: psycopg.Cursor[Any], sql: str) -> np.ndarray:
    """Run a binary ``COPY (…) TO STDOUT`` of (bigint, timestamptz, float8, int4) rows into numpy."""
    data = copy_out(cur, sql)
    if not data.startswith(_COPY_HEADER) or not data.endswith(_COPY_TRAILER):
        raise RuntimeError("unexpected COPY BINARY framing from PostgreSQL")
    n = (len(data) - len(_COPY_HEADER) - len(_COPY_TRAILER)) // _LOADED.itemsize
    rows = np.frombuffer(data, dtype=_LOADED, count=n, offset=len(_COPY_HEADER))
    if len(data) - len(_COPY_HEADER) - len(_COPY_TRAILER) != n * _LOADED.itemsize or (
        n and not (rows["n"] == 4).all()
    ):
        raise RuntimeError("COPY BINARY rows are not the expected four non-NULL columns")
    return rows


def _energy_copy(
    meter_ids: list[str],
    seg: np.ndarray,
    starts: np.ndarray,
    kwh: np.ndarray,
    est: np.ndarray,
    mms: np.ndarray,
    flags: np.ndarray,
) -> bytes:
    """Binary COPY data for ``meter_energy_15m`` built with numpy, one block per meter."""
    parts = [_COPY_HEADER]
    cuts = np.searchsorted(seg, np.arange(len(meter_ids) + 1))
    for g, mid in enumerate(meter_ids):
        a, b = int(cuts[g]), int(cuts[g + 1])
        if a == b:
            continue
        name = mid.encode()
        block = np.empty(b - a, dtype=_energy_row(len(name)))
        block["n"], block["l0"], block["m"] = 6, len(name), name
        block["l1"], block["l2"], block["l3"], block["l4"], block["l5"] = 8, 8, 8, 8, 4
        block["b"] = starts[a:b] * 1000 - _PG_EPOCH_US
        block["k"], block["e"], block["ms"], block["f"] = kwh[a:b], est[a:b], mms[a:b], flags[a:b]
        parts.append(block.tobytes())
    parts.append(_COPY_TRAILER)
    return b"".join(parts)


@functools.cache
def _energy_row(name_len: int) -> np.dtype[Any]:
    """One ``meter_energy_15m`` binary COPY tuple for a meter id of ``name_len`` bytes."""
    return np.dtype(
        [
            ("n", ">i2"),
            ("l0", ">i4"),
            ("m", f"S{name_len}"),
            ("l1", ">i4"),
            ("b", ">i8"),
            ("l2", ">i4"),
            ("k", ">f8"),
            ("l3", ">i4"),
            ("e", ">f8"),
            ("l4", ">i4"),
            ("ms", ">i8"),
            ("l5", ">i4"),
            ("f", ">i4"),
        ]
    )


@dataclass(frozen=True)
class _Computed:
    loaded: np.ndarray  # readings per window
    written: np.ndarray  # meter buckets per window
    events: np.ndarray  # [window, EVENT_BITS]
    seg: np.ndarray  # the meter rows written: window, bucket start (epoch ms), kwh, estimated, ms
    starts: np.ndarray
    kwh: np.ndarray
    est: np.ndarray
    mms: np.ndarray
    flags: np.ndarray
    last_us: np.ndarray  # per window: its last loaded reading (PostgreSQL µs), -1 if none


def _lap(phases: dict[str, float] | None, name: str, since: float) -> None:
    if phases is not None:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - since


def _compute_windows(
    cur: psycopg.Cursor[Any],
    meter_ids: list[str],
    quantities: list[str],
    meters: list[_Meter],
    keep: tuple[np.ndarray, np.ndarray],
    phases: dict[str, float] | None = None,
    copy_sql: str | None = _COPY_ENERGY,
    *,
    whole: bool = False,
    seeds: Seeds | None = None,
) -> _Computed:
    """Load every reading of the staged windows (one COPY), run ONE kernel call over all of them,
    record their quarantine (two statements) and COPY the meter rows into ``meter_energy_15m``
    (their windows are deleted already; ``copy_sql=None``: the caller writes them)."""
    t = time.perf_counter()
    raw = _copy_out(cur, _LOAD_WINDOWS)
    _lap(phases, "load (COPY out)", t)
    t = time.perf_counter()
    g_n = len(meter_ids)
    ts_raw = raw["ts"].astype(np.int64)
    order, bounds = window_order(raw["i"].astype(np.int64), ts_raw, g_n)  # by window, then time
    ts_us = ts_raw[order]
    ts = (ts_us + _PG_EPOCH_US) // 1000  # epoch ms, floored as ``to_ms``
    last_us = np.full(g_n, -1, dtype=np.int64)
    filled = np.flatnonzero(bounds[1:] > bounds[:-1])
    last_us[filled] = ts_us[bounds[filled + 1] - 1]
    value = raw["v"][order].astype(np.float64)
    quality = raw["q"][order].astype(np.int64)
    del raw, ts_raw, order, ts_us
    _lap(phases, "sort", t)
    t = time.perf_counter()
    max_kw = np.array([m.max_kw for m in meters], dtype=np.float64)
    seg, starts, kwh, est, mms, flags, events, iflags = bucket_energy_many(
        bounds,
        ts,
        value,
        quality,
        np.array([m.counter_max for m in meters], dtype=np.float64),
        np.array([m.max_gap_ms for m in meters], dtype=np.int64),
        keep[0],
        keep[1],
        BUCKET_MS,
        max_kw,
        seeds,
    )
    _lap(phases, "kernel", t)
    t = time.perf_counter()
    series = [  # compute.quarantine
        Series(mid, q, int(bounds[g]), int(bounds[g + 1]), float(max_kw[g]))
        for g, (mid, q) in enumerate(zip(meter_ids, quantities, strict=True))
    ]
    record_many(cur, series, ts, value, iflags, whole=whole)
    _lap(phases, "quarantine", t)
    if copy_sql is not None:  # recompute_set's meter rows (the rebuild writes and times its own)
        with cur.copy(copy_sql) as copy:
            copy.write(_energy_copy(meter_ids, seg, starts, kwh, est, mms, flags))
    return _Computed(
        np.diff(bounds), np.bincount(seg, minlength=g_n), events, seg, starts, kwh, est, mms, flags, last_us
    )


def _merge_ranges(ranges: list[tuple[str, datetime, datetime]]) -> list[tuple[str, datetime, datetime]]:
    """Per site, overlapping or touching [b0, b1) ranges joined: each bucket appears once."""
    out: list[tuple[str, datetime, datetime]] = []
    for site, b0, b1 in sorted(ranges):
        if out and out[-1][0] == site and b0 <= out[-1][2]:
            out[-1] = (site, out[-1][1], max(out[-1][2], b1))
        else:
            out.append((site, b0, b1))
    return out


def _params(params: Params | None, factor_series: str | None) -> Params:
    params = params or Params()
    return replace(params, factor_series=factor_series) if factor_series else params


def coalesce(ranges: Iterable[DirtyRange]) -> list[DirtyRange]:
    """One range per (meter, quantity) spanning all given ones; first-seen order."""
    merged: dict[tuple[str, str], DirtyRange] = {}
    for r in ranges:
        key = (r.meter_id, r.quantity)
        m = merged.get(key)
        merged[key] = (
            r
            if m is None
            else DirtyRange(
                site_id=r.site_id,
                meter_id=r.meter_id,
                quantity=r.quantity,
                t_min=min(m.t_min, r.t_min),
                t_max=max(m.t_max, r.t_max),
                rows=m.rows + r.rows,
            )
        )
    return list(merged.values())


def recompute(
    conn: psycopg.Connection[Any],
    dirty: DirtyRange,
    params: Params | None = None,
    *,
    factor_series: str | None = None,
) -> RecomputeResult:
    """Recompute the buckets one dirty range can have changed; commits its own transaction.
    ``factor_series`` overrides ``params.factor_series``."""
    (result,) = recompute_set(conn, [dirty], _params(params, factor_series))
    return result


def recompute_set(
    conn: psycopg.Connection[Any], ranges: Iterable[DirtyRange], params: Params | None = None
) -> list[RecomputeResult]:
    """Recompute a whole poll's dirty ranges set-based, in ONE transaction: the ranges are
    coalesced per (meter, counter), their windows found and their readings loaded by one query
    each, one kernel call computes every meter, meter rows are replaced by one DELETE and one
    binary COPY, and each affected (site, bucket) is rebuilt once by one DELETE and one INSERT.
    Returns one result per coalesced range."""
    params = params or Params()
    spans = coalesce(ranges)
    if not spans:
        return []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_TEMP_DDL)
        cur.execute(
            "TRUNCATE compute_windows"
        )  # a caller's outer transaction may hold rows of an earlier call
        cur.execute(_NO_JIT)
        known = _meters(cur, sorted({d.meter_id for d in spans}), params)
        results: dict[int, RecomputeResult] = {}
        todo: list[tuple[int, DirtyRange, _Meter]] = []
        for k, d in enumerate(spans):
            meter = known.get(d.meter_id) or _unregistered(d.site_id, params)
            if meter.quantity != d.quantity:
                results[k] = RecomputeResult(
                    d.meter_id,
                    meter.site_id,
                    None,
                    None,
                    registered=meter.registered,
                    skipped=f"quantity {d.quantity} is not computed for {meter.carrier} meters"
                    f" counting in {meter.unit}",
                )
                continue
            if not meter.registered:
                log.warning(
                    "meter %s (site %s) is not in the fleet registry: no rollup", d.meter_id, meter.site_id
                )
            todo.append((k, d, meter))
        if todo:
            _lock_sites(cur, [m.site_id for _, _, m in todo])
            cur.execute(
                _WINDOWS,
                (
                    list(range(len(todo))),
                    [d.meter_id for _, d, _ in todo],
                    [d.quantity for _, d, _ in todo],
                    [d.t_min for _, d, _ in todo],
                    [d.t_max for _, d, _ in todo],
                ),
            )
            cur.execute("ANALYZE compute_windows")  # a few rows: index scans per window, not a hash
            rows = cur.execute("SELECT i, b0, b1, prev_ts, has_next FROM compute_windows").fetchall()
            windows = {int(i): (b0, b1) for i, b0, b1, _, _ in rows}
            # Whether a window loads its series' last reading: nothing follows the range, or what
            # follows lies before b1 (the first reading at or after b1 is loaded when there is one).
            tails = {int(i): (not has_next, to_ms(b1)) for i, _, b1, _, has_next in rows}
            seeds = _continued(cur, todo, rows)
            keep_from = np.array([to_ms(windows[g][0]) if g in windows else 0 for g in range(len(todo))])
            keep_to = np.array([to_ms(windows[g][1]) if g in windows else 0 for g in range(len(todo))])
            cur.execute(_DELETE_WINDOWS)
            done = _compute_windows(
                cur,
                [d.meter_id for _, d, _ in todo],
                [d.quantity for _, d, _ in todo],
                [m for _, _, m in todo],
                (keep_from, keep_to),
                seeds=seeds,
            )
            new_tails = _tails_after(todo, tails, done)
            site_ranges = _merge_ranges(
                [
                    (m.site_id, *windows[g])
                    for g, (_, _, m) in enumerate(todo)
                    if g in windows and m.registered
                ]
            )
            if site_ranges:
                args = {
                    **_rollup_args(params),
                    "sr_site": [r[0] for r in site_ranges],
                    "sr_b0": [r[1] for r in site_ranges],
                    "sr_b1": [r[2] for r in site_ranges],
                }
                cur.execute(_DELETE_ROLLUPS, args)
                _write_rollups(cur, _STAGE_ROLLUPS_SET, args)
            scope2 = {
                m.site_id
                for g, (_, _, m) in enumerate(todo)
                if g in windows and m.registered and CARRIERS[m.carrier].scope == 2
            }
            recompute_market_set(cur, [r for r in site_ranges if r[0] in scope2])
            for g, (k, d, m) in enumerate(todo):
                if g not in windows:  # a lone reading on a boundary: no interval, nothing to change
                    results[k] = RecomputeResult(
                        d.meter_id, m.site_id, None, None, registered=m.registered, skipped="no interval"
                    )
                    continue
                results[k] = RecomputeResult(
                    d.meter_id,
                    m.site_id,
                    windows[g][0],
                    windows[g][1],
                    int(done.loaded[g]),
                    int(done.written[g]),
                    dict(zip(EVENT_NAMES, (int(v) for v in done.events[g]), strict=True)),
                    registered=m.registered,
                )
        else:
            new_tails = {}
    _TAILS.update(new_tails)  # only once the recompute committed (or joined the caller's transaction)
    return [results[k] for k in range(len(spans))]


# The fold state at the end of each (meter, counter) series this process last recomputed: where
# new readings only APPEND to a series, its first bucket's fold is continued from the stored row
# instead of re-reading every reading of that bucket (``_continued``). A bucket holding n readings
# then costs O(new readings) per poll, not O(n).
@dataclass(frozen=True)
class _Tail:
    ts_us: int  # the series' last reading when the fold was computed (PostgreSQL µs)
    params: tuple[float, int, float]  # counter_max, max_gap_ms, max_kw it was computed with
    bucket_ms: int  # the bucket holding that reading (epoch ms)
    row: tuple[float, float, int, int] | None  # (kwh, kwh_estimated, measured_ms, flags); None: on a boundary


_TAILS: dict[tuple[str, str], _Tail] = {}
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


def _meter_params(m: _Meter) -> tuple[float, int, float]:
    return (m.counter_max, m.max_gap_ms, m.max_kw)


def _continued(
    cur: psycopg.Cursor[Any], todo: list[tuple[int, DirtyRange, _Meter]], rows: list[tuple[Any, ...]]
) -> Seeds:
    """Seeds for the windows that only append to their series, whose load then starts at the last
    reading before them (``lo = prev_ts``) instead of at the start of its bucket.

    A window continues when the reading just before its range is the one this process last
    folded the series to, with the same meter parameters, and the stored row of that reading's
    bucket is bit for bit the fold this process computed through it (no row when the reading lies
    on a bucket boundary). Then the stored sums are exactly the fold over every interval before
    it, and continuing it over every loaded reading from there (``kernels.apportion_from``; readings
    after the range, committed meanwhile, are loaded as before) gives what re-reading would.
    Anything else (another worker's or an uncommitted write, late data, a restart) fails a check,
    and the window is recomputed from its bucket."""
    g_n = len(todo)
    seeds = Seeds(np.zeros(g_n), np.zeros(g_n), np.zeros(g_n, dtype=np.int64), np.zeros(g_n, dtype=np.int64))
    candidates: dict[int, _Tail] = {}
    for i, b0, _, prev_ts, _ in rows:
        _, d, m = todo[int(i)]
        tail = _TAILS.get((d.meter_id, d.quantity))
        if (
            tail is not None
            and prev_ts is not None
            and tail.ts_us == (prev_ts - _PG_EPOCH) // _US
            and tail.params == _meter_params(m)
            and tail.bucket_ms == to_ms(b0)
        ):
            candidates[int(i)] = tail
    if not candidates:
        return seeds
    stored = {
        int(i): (kwh, est, ms, flags)
        for i, kwh, est, ms, flags in cur.execute(
            "SELECT w.i, me.kwh, me.kwh_estimated, me.measured_ms, me.flags FROM compute_windows w"
            " JOIN meter_energy_15m me ON me.meter_id = w.meter_id AND me.bucket = w.b0 WHERE w.i = ANY(%s)",
            (list(candidates),),
        ).fetchall()
    }
    confirmed = [i for i, tail in candidates.items() if stored.get(i) == tail.row]
    if confirmed:
        cur.execute("UPDATE compute_windows SET lo = prev_ts WHERE i = ANY(%s)", (confirmed,))
    for i in confirmed:
        row = candidates[i].row
        if row is not None:
            seeds.kwh[i], seeds.est[i], seeds.measured_ms[i], seeds.flags[i] = row
    return seeds


def _tails_after(
    todo: list[tuple[int, DirtyRange, _Meter]], tails: dict[int, tuple[bool, int]], done: _Computed
) -> dict[tuple[str, str], _Tail]:
    """The fold state at the end of every window that reached its series' last reading; the
    others' states are forgotten."""
    out: dict[tuple[str, str], _Tail] = {}
    cuts = np.searchsorted(done.seg, np.arange(len(todo) + 1))
    for g, (_, d, m) in enumerate(todo):
        key = (d.meter_id, d.quantity)
        _TAILS.pop(key, None)
        last_us = int(done.last_us[g])
        if g not in tails or last_us < 0:
            continue
        last_ms = (last_us + _PG_EPOCH_US) // 1000
        alone, b1_ms = tails[g]
        if not (alone or last_ms < b1_ms):  # a reading at or after b1 was loaded: not the series' end
            continue
        bucket = last_ms // BUCKET_MS * BUCKET_MS
        row = None
        if last_ms != bucket:  # else the fold continues in a bucket not started yet
            j = int(cuts[g + 1]) - 1
            if j < int(cuts[g]) or int(done.starts[j]) != bucket:
                continue
            row = (float(done.kwh[j]), float(done.est[j]), int(done.mms[j]), int(done.flags[j]))
        out[key] = _Tail(last_us, _meter_params(m), bucket, row)
    return out
