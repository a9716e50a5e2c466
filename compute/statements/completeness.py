"""Is a supplier's month complete enough to be signed "Final"? The reasons it is not.

A statement is Final only when every figure in it is backed by data (DESIGN: "A statement is signed
only when its month is complete, or it says PROVISIONAL on every page"). Refused when:

- a site's month has not ended yet;
- a registered meter has measured less of the month than ``min_meter_coverage`` (statements.toml);
- an interval has no emission factor (location/direct rollups, or market-based hours);
- a meter's carrier cannot be computed (no compute rule, or none of its readings is the quantity
  its carrier is computed from, e.g. a gas meter that only sends kWh);
- readings were quarantined: counter drops the compute engine refused to count
  (``compute.kernels.F_DROP``, intervals that contribute no energy).

A supplier with no reading from any registered meter in the month has no activity to state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from compute.kernels import F_DROP
from compute.recompute import CARRIERS
from compute.statements.figures import month_bounds


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
SELECT m.meter_id, m.site_id, m.carrier, w.t0, w.t1,
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
  AND r.bucket >= w.t0 AND r.bucket < w.t1 WHERE r.kg_co2e IS NULL AND r.method <> 'market' GROUP BY 1, 2, 3
UNION ALL
SELECT m.site_id, m.carrier, 'market', count(*) FROM site_market_1h m JOIN w ON m.site_id = w.site_id
  AND m.bucket >= w.t0 AND m.bucket < w.t1 WHERE m.kg_co2e IS NULL GROUP BY 1, 2
ORDER BY 1, 2, 3
"""


def check(
    conn: psycopg.Connection[Any], supplier: str, month: str, *, now: datetime, min_meter_coverage: float
) -> Completeness:
    first, nxt = month_bounds(month)
    p = {"supplier": supplier, "first": first, "next": nxt, "drop": F_DROP}
    meters = conn.execute(_METERS, p).fetchall()
    active = any(r[7] for r in meters)
    if not active:
        return Completeness(False, ["no registered meter has a reading in the month"])
    reasons: list[str] = []
    ends = {r[1]: r[4] for r in meters}
    if any(now < t1 for t1 in ends.values()):
        reasons.append(f"the month has not ended at every site (last ends {max(ends.values()).isoformat()})")
    for meter, site, carrier, t0, t1, measured_ms, drops, quantities in meters:
        rule = CARRIERS.get(carrier)
        if rule is None:
            reasons.append(f"meter {meter} (site {site}): carrier {carrier} cannot be computed")
            continue
        if quantities and rule.quantity not in quantities:
            reasons.append(
                f"meter {meter} (site {site}): {carrier} is computed from {rule.quantity},"
                f" but it sent only {', '.join(sorted(quantities))}"
            )
            continue
        share = measured_ms / ((t1 - t0).total_seconds() * 1000)
        if share < min_meter_coverage:
            reasons.append(
                f"meter {meter} (site {site}): {share:.1%} of the month measured,"
                f" below the {min_meter_coverage:.1%} threshold"
            )
        if drops:
            reasons.append(
                f"meter {meter} (site {site}): quarantined (dropped) readings in {drops} 15-minute intervals"
            )
    for site, carrier, method, n in conn.execute(_NO_FACTOR, p).fetchall():
        unit = "hours" if method == "market" else "15-minute intervals"
        reasons.append(f"site {site}: {n} {unit} of {carrier} ({method}) have no emission factor")
    return Completeness(True, reasons)
