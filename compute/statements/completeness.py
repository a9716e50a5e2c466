"""Is a supplier's month complete enough to be signed "Final"? The reasons it is not.

A statement is Final only when every figure in it is backed by data (DESIGN: "A statement is signed
only when its month is complete, or it says PROVISIONAL on every page"). Refused when:

- a site's month has not ended yet;
- a registered meter has measured less of the month than ``min_meter_coverage`` (statements.toml);
- an interval has no emission factor (location/direct rollups, or market-based hours);
- a meter's carrier cannot be computed (no compute rule, or none of its readings is the quantity
  its unit is computed from, e.g. a gas meter registered in m3 that only sends kWh);
- the compute engine refused a carrier (view ``site_refusals``: no factor source for it, e.g.
  cooling, or activity after the newest vintage), or a non-metered record has no factor
  (``activity_records.refusal``): issue 14 asks for "an explicit refusal that blocks Final";
- readings were quarantined: counter drops the compute engine refused to count
  (``compute.kernels.F_DROP``, intervals that contribute no energy).

A supplier with no reading from any registered meter in the month has no activity to state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from compute import quarantine
from compute.config import Carrier
from compute.fleet import METER_UNITS
from compute.kernels import F_DROP
from compute.recompute import CARRIERS, QUANTITY_OF_UNIT
from compute.statements.figures import is_year, month_bounds


@dataclass(frozen=True)
class Completeness:
    active: bool  # any registered meter has a reading in the month
    reasons: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.active and not self.reasons


_METERS = """
WITH w AS (
    SELECT s.site_id, (%(first)s::date::timestamp AT TIME ZONE s.timezone) AS t0,
           (%(next)s::date::timestamp AT TIME ZONE s.timezone) AS t1
    FROM sites s WHERE s.supplier_id = %(supplier)s
)
SELECT m.meter_id, m.site_id, m.carrier, m.activity_unit, w.t0, w.t1,
       (SELECT coalesce(sum(e.measured_ms), 0)::float8 FROM meter_energy_15m e
        WHERE e.meter_id = m.meter_id AND e.bucket >= w.t0 AND e.bucket < w.t1),
       (SELECT count(*) FROM meter_energy_15m e
        WHERE e.meter_id = m.meter_id AND e.bucket >= w.t0 AND e.bucket < w.t1 AND e.flags & %(drop)s <> 0),
       coalesce((SELECT array_agg(DISTINCT r.quantity) FROM readings r
        WHERE r.meter_id = m.meter_id AND r.ts >= w.t0 AND r.ts < w.t1), '{}')
FROM meters m JOIN w USING (site_id) ORDER BY m.meter_id
"""

_NO_FACTOR = """
WITH w AS (
    SELECT s.site_id, (%(first)s::date::timestamp AT TIME ZONE s.timezone) AS t0,
           (%(next)s::date::timestamp AT TIME ZONE s.timezone) AS t1
    FROM sites s WHERE s.supplier_id = %(supplier)s
)
SELECT r.site_id, r.carrier, r.method, count(*) FROM site_rollups_15m r JOIN w ON r.site_id = w.site_id
  AND r.bucket >= w.t0 AND r.bucket < w.t1 WHERE r.kg_co2e IS NULL AND r.method <> 'market'
  AND r.refusal IS NULL GROUP BY 1, 2, 3
UNION ALL
SELECT m.site_id, m.carrier, 'market', count(*) FROM site_market_1h m JOIN w ON m.site_id = w.site_id
  AND m.bucket >= w.t0 AND m.bucket < w.t1 WHERE m.kg_co2e IS NULL
  -- an hour whose location-based rows were refused is already named by that refusal (_REFUSED)
  AND NOT EXISTS (SELECT 1 FROM site_rollups_15m r WHERE r.site_id = m.site_id AND r.carrier = m.carrier
                  AND r.scope = 2 AND r.method = 'location' AND r.refusal IS NOT NULL
                  AND r.bucket >= m.bucket AND r.bucket < m.bucket + interval '1 hour')
  GROUP BY 1, 2
ORDER BY 1, 2, 3
"""

# What the compute engine refused: the view of migration 0004 names each refused activity class
# (site, carrier, unit, basis, fuel type) and why; its buckets are counted inside the site's month.
_REFUSED = """
WITH w AS (
    SELECT s.site_id, (%(first)s::date::timestamp AT TIME ZONE s.timezone) AS t0,
           (%(next)s::date::timestamp AT TIME ZONE s.timezone) AS t1
    FROM sites s WHERE s.supplier_id = %(supplier)s
)
SELECT f.site_id, f.carrier, f.activity_unit, f.refusal, n.buckets, n.activity
FROM site_refusals f JOIN w USING (site_id)
CROSS JOIN LATERAL (
    SELECT count(*) AS buckets, coalesce(sum(r.kwh ORDER BY r.bucket), 0) AS activity
    FROM site_rollups_15m r
    WHERE r.site_id = f.site_id AND r.carrier = f.carrier AND r.scope = f.scope
      AND r.activity_unit = f.activity_unit AND r.cv_basis = f.cv_basis
      AND r.reference_conditions = f.reference_conditions AND r.fuel_type = f.fuel_type
      AND r.refusal = f.refusal AND r.bucket >= w.t0 AND r.bucket < w.t1
) n
WHERE f.first_bucket < w.t1 AND f.last_bucket >= w.t0 AND n.buckets > 0
ORDER BY 1, 2, 3, 4
"""

_ACTIVITY_REFUSED = """
SELECT a.site_id, a.record_id, a.kind, a.refusal FROM activity_records a JOIN sites s USING (site_id)
WHERE s.supplier_id = %(supplier)s AND a.refusal IS NOT NULL
  AND a.period_start < %(next)s AND a.period_end > %(first)s
ORDER BY 1, 2
"""


def check(
    conn: psycopg.Connection[Any], supplier: str, month: str, *, now: datetime, min_meter_coverage: float
) -> Completeness:
    first, nxt = month_bounds(month)
    period = "year" if is_year(month) else "month"
    p = {"supplier": supplier, "first": first, "next": nxt, "drop": F_DROP}
    meters = conn.execute(_METERS, p).fetchall()
    active = any(r[8] for r in meters)
    if not active:
        return Completeness(False, [f"no registered meter has a reading in the {period}"])
    reasons: list[str] = []
    ends = {r[1]: r[5] for r in meters}
    if any(now < t1 for t1 in ends.values()):
        last = max(ends.values()).isoformat()
        reasons.append(f"the {period} has not ended at every site (last ends {last})")
    for meter, site, carrier, unit, t0, t1, measured_ms, drops, quantities in meters:
        if carrier not in CARRIERS:
            reasons.append(f"meter {meter} (site {site}): carrier {carrier} cannot be computed")
            continue
        quantity = QUANTITY_OF_UNIT[unit or METER_UNITS[Carrier(carrier)][0]]
        if quantities and quantity not in quantities:
            reasons.append(
                f"meter {meter} (site {site}): {carrier} is computed from {quantity},"
                f" but it sent only {', '.join(sorted(quantities))}"
            )
            continue
        share = measured_ms / ((t1 - t0).total_seconds() * 1000)
        if share < min_meter_coverage:
            reasons.append(
                f"meter {meter} (site {site}): {share:.1%} of the {period} measured,"
                f" below the {min_meter_coverage:.1%} threshold"
            )
        if drops:
            reasons.append(
                f"meter {meter} (site {site}): quarantined (dropped) readings in {drops} 15-minute intervals"
            )
    # Readings held back as implausible (a spike beyond the meter's max_kw, NaN, Infinity).
    reasons += quarantine.reasons(quarantine.quarantined(conn, supplier, month))
    for site, carrier, method, n in conn.execute(_NO_FACTOR, p).fetchall():
        unit = "hours" if method == "market" else "15-minute intervals"
        reasons.append(f"site {site}: {n} {unit} of {carrier} ({method}) have no emission factor")
    for site, carrier, unit, why, n, amount in conn.execute(_REFUSED, p).fetchall():
        reasons.append(
            f"site {site}: {carrier} refused ({why}): {n} 15-minute intervals, {amount:,.3f} {unit} in total"
        )
    for site, record, kind, why in conn.execute(_ACTIVITY_REFUSED, p).fetchall():
        reasons.append(f"site {site}: non-metered {kind} record {record} refused ({why})")
    return Completeness(True, reasons)
