"""Read-side summaries of the rollups (what the demo prints)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg


@dataclass(frozen=True)
class SiteTotal:
    site_id: str
    carrier: str
    scope: int
    method: str
    kwh: float
    kg_co2e: float  # over the buckets that had a factor
    buckets: int
    buckets_without_factor: int  # their kWh is in ``kwh`` but not in ``kg_co2e``
    factor_ids: tuple[str, ...]  # every factor used, sorted


def site_totals(conn: psycopg.Connection[Any], t0: datetime, t1: datetime) -> list[SiteTotal]:
    """Totals per site/carrier/scope/method over buckets starting in ``[t0, t1)``."""
    rows = conn.execute(
        "SELECT site_id, carrier, scope, method, sum(kwh ORDER BY bucket),"
        " coalesce(sum(kg_co2e ORDER BY bucket), 0), count(*), count(*) FILTER (WHERE kg_co2e IS NULL),"
        " coalesce(array_agg(DISTINCT factor_id) FILTER (WHERE factor_id IS NOT NULL), '{}')"
        " FROM site_rollups_15m WHERE bucket >= %s AND bucket < %s"
        " GROUP BY site_id, carrier, scope, method ORDER BY site_id, carrier, scope, method",
        (t0, t1),
    ).fetchall()
    return [SiteTotal(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], tuple(sorted(r[8]))) for r in rows]
