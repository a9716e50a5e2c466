"""The figures of one supplier's month (what a statement states), read from the compute tables.

The month is each site's LOCAL calendar month (a Shenzhen site's November starts at 16:00 UTC on
31 October). Location-based Scope 2 and Scope 1 come from ``site_rollups_15m``, read generically
(whatever (scope, method) rows the compute engine wrote are grouped and reported); market-based
Scope 2 comes from ``site_market_1h`` (``compute.market``: the one place instruments are allocated)
and is presented as scope 2 / method ``market`` lines. Hours are whole UTC hours, so a site whose
UTC offset is not a whole number of hours has its market month shifted by that fraction.

GHG Protocol rules applied here:
- energy is counted once per site and carrier, from one method's rows (``location`` for Scope 2,
  ``direct`` for Scope 1, else the first method alphabetically): methods differ in emissions only;
- market-based Scope 2 equals location-based for a site without market rows; the statement lists
  the sites that fell back to location factors (no contractual instrument and no residual factor
  in the month), per site the kWh of each residual basis (``market_residual_basis``: residual-mix,
  excl-market-nonfossil or location; ``compute.market``) and the instruments with the MWh each
  claimed in the month (``instruments``, from the claims ledger);
- renewable share = electricity kWh covered by contractual instruments (GEC, I-REC, PPA, green
  tariff: ``kwh_instruments``) / all electricity kWh;
- coverage = measured kWh / all kWh, where the rollups carry a measured/estimated split
  (``kwh_estimated`` or ``kwh_measured`` column); otherwise all kWh is measured and coverage also
  reports the share of the month's 15-minute buckets that have data.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Any

import psycopg

from compute.market import FALLBACKS
from ops.errors import UserError

BUCKET = timedelta(minutes=15)
ENERGY_METHOD_PREFERENCE = ("location", "direct")


def month_bounds(month: str) -> tuple[date, date]:
    """``YYYY-MM`` → (first day, first day of the next month)."""
    try:
        first = datetime.strptime(month, "%Y-%m").date()
    except ValueError:
        raise UserError(f"month must be YYYY-MM, not {month!r}") from None
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, nxt


def previous_month(month: str) -> str:
    first, _ = month_bounds(month)
    return (first - timedelta(days=1)).strftime("%Y-%m")


# Each site's local month as a UTC window; every query below joins it.
_WINDOWS = """
WITH w AS (
    SELECT s.site_id, s.timezone,
           (%(first)s::date::timestamp AT TIME ZONE s.timezone) AS t0,
           (%(next)s::date::timestamp AT TIME ZONE s.timezone) AS t1
    FROM sites s WHERE s.supplier_id = %(supplier)s
)
"""


def _columns(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'site_rollups_15m'"
        " AND table_schema = current_schema()"
    ).fetchall()
    return {r[0] for r in rows}


def _unit_expr(columns: set[str]) -> str:
    return "r.activity_unit" if "activity_unit" in columns else "'kWh'::text"


def _estimated_expr(columns: set[str]) -> str:
    if "kwh_estimated" in columns:
        return "sum(r.kwh_estimated ORDER BY r.bucket)"
    if "kwh_measured" in columns:
        return "sum((r.kwh - r.kwh_measured) ORDER BY r.bucket)"
    return "0::float8"


def energy_method(scope: int, methods: set[str]) -> str:
    """The one method whose kWh counts as the carrier's energy (see module doc)."""
    for m in ENERGY_METHOD_PREFERENCE:
        if m in methods:
            return m
    return sorted(methods)[0]


def supplier_name(conn: psycopg.Connection[Any], supplier: str) -> str:
    row = conn.execute("SELECT name FROM suppliers WHERE supplier_id = %s", (supplier,)).fetchone()
    if row is None:
        raise UserError(f"unknown supplier {supplier!r} (apply the fleet with `scopemeter fleet apply`)")
    return str(row[0])


def month_figures(conn: psycopg.Connection[Any], supplier: str, month: str) -> dict[str, Any]:
    """Everything a statement reports for ``supplier`` in ``month``, as JSON-ready values.

    Reads only; the caller owns the transaction (one snapshot for figures and inputs)."""
    first, nxt = month_bounds(month)
    name = supplier_name(conn, supplier)
    p = {"supplier": supplier, "first": first, "next": nxt}
    columns = _columns(conn)

    sites = conn.execute(
        _WINDOWS + "SELECT s.site_id, s.name, s.grid_region, s.timezone, w.t0, w.t1,"
        " (SELECT count(*) FROM meters m WHERE m.site_id = s.site_id),"
        " coalesce((SELECT array_agg(DISTINCT m.carrier ORDER BY m.carrier) FROM meters m"
        "           WHERE m.site_id = s.site_id), '{}')"
        " FROM sites s JOIN w USING (site_id) ORDER BY s.site_id",
        p,
    ).fetchall()
    boundary = [
        {
            "site_id": r[0],
            "name": r[1],
            "grid_region": r[2],
            "timezone": r[3],
            "window_utc": [r[4].isoformat(), r[5].isoformat()],
            "meters": r[6],
            "carriers": list(r[7]),
        }
        for r in sites
    ]
    buckets_in_month = {r[0]: int((r[5] - r[4]) / BUCKET) for r in sites}

    # Market-based rows live in site_market_1h only; 'market' rows in site_rollups_15m are ignored
    # so that nothing is counted twice.
    rollup_lines = conn.execute(
        _WINDOWS + "SELECT r.site_id, r.carrier, r.scope, r.method, sum(r.kwh ORDER BY r.bucket),"
        f" {_estimated_expr(columns)},"
        " coalesce(sum(r.kg_co2e ORDER BY r.bucket), 0), count(*),"
        " count(*) FILTER (WHERE r.kg_co2e IS NULL), 0::float8,"
        " coalesce(array_agg(DISTINCT r.factor_id) FILTER (WHERE r.factor_id IS NOT NULL), '{}'),"
        f" min({_unit_expr(columns)})"
        " FROM site_rollups_15m r JOIN w ON r.site_id = w.site_id"
        " AND r.bucket >= w.t0 AND r.bucket < w.t1 WHERE r.method <> 'market'"
        " GROUP BY r.site_id, r.carrier, r.scope, r.method",
        p,
    ).fetchall()
    market_lines = conn.execute(
        _WINDOWS + "SELECT m.site_id, m.carrier, 2, 'market', sum(m.kwh ORDER BY m.bucket), 0::float8,"
        " coalesce(sum(m.kg_co2e ORDER BY m.bucket), 0), count(*),"
        " count(*) FILTER (WHERE m.kg_co2e IS NULL), sum(m.kwh_instruments ORDER BY m.bucket),"
        " coalesce(array_agg(DISTINCT m.residual_factor_id)"
        "          FILTER (WHERE m.residual_factor_id IS NOT NULL), '{}'), 'kWh'"
        " FROM site_market_1h m JOIN w ON m.site_id = w.site_id AND m.bucket >= w.t0 AND m.bucket < w.t1"
        " GROUP BY m.site_id, m.carrier",
        p,
    ).fetchall()
    lines = [
        {
            "site_id": r[0],
            "carrier": r[1],
            "scope": r[2],
            "method": r[3],
            "kwh": r[4],
            "kwh_estimated": r[5] or 0.0,
            "kg_co2e": r[6],
            "buckets": r[7],
            "buckets_without_factor": r[8],
            "instrument_kwh": r[9],
            "factor_ids": sorted(r[10]),
            "unit": r[11],
        }
        for r in sorted(rollup_lines + market_lines, key=lambda r: (r[0], r[1], r[2], r[3]))
    ]

    daily_rows = conn.execute(
        _WINDOWS + "SELECT r.site_id, (r.bucket AT TIME ZONE w.timezone)::date, r.scope, r.method,"
        " r.carrier, coalesce(sum(r.kg_co2e ORDER BY r.bucket), 0)"
        " FROM site_rollups_15m r JOIN w ON r.site_id = w.site_id AND r.bucket >= w.t0 AND r.bucket < w.t1"
        " WHERE r.method <> 'market' GROUP BY 1, 2, 3, 4, 5"
        " UNION ALL SELECT m.site_id, (m.bucket AT TIME ZONE w.timezone)::date, 2, 'market', m.carrier,"
        " coalesce(sum(m.kg_co2e ORDER BY m.bucket), 0)"
        " FROM site_market_1h m JOIN w ON m.site_id = w.site_id AND m.bucket >= w.t0 AND m.bucket < w.t1"
        " GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
        p,
    ).fetchall()

    # What each instrument covered in THIS month (its claims), not its whole volume.
    instruments = [
        {
            "instrument_id": r[0],
            "site_id": r[1],
            "kind": r[2],
            "carrier": r[3],
            "mwh": r[4],
            "claimed_mwh": r[5] / 1000.0,
            "period_start": r[6].isoformat(),
            "period_end": r[7].isoformat(),
            "kg_co2e_per_kwh": r[8],
            "hourly": r[9],
            "reference": r[10],
            "serials": None if r[11] is None else f"{r[11]} {r[12]}..{r[13]}",
            "market_boundary": r[14],
            "evidence": r[15],
        }
        for r in conn.execute(
            _WINDOWS + "SELECT i.instrument_id, c.site_id, i.kind, i.carrier, i.mwh,"
            " sum(c.kwh ORDER BY c.bucket), i.period_start, i.period_end, i.kg_co2e_per_kwh, i.hourly,"
            " i.reference, i.serial_prefix, i.serial_first, i.serial_last, i.market_boundary, i.evidence"
            " FROM instrument_claims c JOIN w ON c.site_id = w.site_id AND c.bucket >= w.t0"
            " AND c.bucket < w.t1 JOIN contractual_instruments i USING (instrument_id)"
            " GROUP BY i.instrument_id, c.site_id ORDER BY i.instrument_id, c.site_id",
            p,
        ).fetchall()
    ]
    # Which factor the uncovered rest of each site's market-based Scope 2 used (GHG Protocol Scope 2
    # Guidance, Table 7.1 criterion 8: residual mix, or disclose its absence).
    market_basis: dict[str, dict[str, float]] = defaultdict(dict)
    for site, basis, kwh in conn.execute(
        _WINDOWS + "SELECT m.site_id, coalesce(m.residual_basis, 'none'),"
        " sum((m.kwh - m.kwh_instruments) ORDER BY m.bucket) FROM site_market_1h m"
        " JOIN w ON m.site_id = w.site_id AND m.bucket >= w.t0 AND m.bucket < w.t1"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        p,
    ).fetchall():
        market_basis[site][basis] = kwh

    factor_ids = sorted({f for line in lines for f in line["factor_ids"]})
    factors = [
        {
            "factor_id": r[0],
            "publisher": r[1],
            "series": r[2],
            "region": r[3],
            "carrier": r[4],
            "valid_from": r[5].isoformat(),
            "valid_to": r[6].isoformat(),
            "kg_co2e_per_unit": r[7],
            "unit": r[8],
            "version": r[9],
            "source": r[10],
        }
        for r in conn.execute(
            "SELECT factor_id, publisher, series, region, carrier, valid_from, valid_to,"
            " kg_co2e_per_unit, unit, version, source FROM emission_factors"
            " WHERE factor_id = ANY(%s) ORDER BY factor_id",
            (factor_ids,),
        ).fetchall()
    ]
    residual = {f["factor_id"] for f in factors if f["series"] in {series for _, series in FALLBACKS}}
    return {
        "supplier": {"id": supplier, "name": name},
        "month": month,
        "boundary": boundary,
        "lines": lines,
        **_summarise(lines, daily_rows, buckets_in_month, residual, first, nxt),
        "factors": factors,
        "instruments": instruments,
        "market_residual_basis": {site: dict(v) for site, v in sorted(market_basis.items())},
    }


def _summarise(
    lines: list[dict[str, Any]],
    daily_rows: list[tuple[Any, ...]],
    buckets_in_month: dict[str, int],
    residual_factors: set[str],
    first: date,
    nxt: date,
) -> dict[str, Any]:
    methods: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for line in lines:
        methods[(line["site_id"], line["carrier"], line["scope"])].add(line["method"])
    chosen = {key: energy_method(key[2], ms) for key, ms in methods.items()}

    def is_energy(line: dict[str, Any]) -> bool:
        return bool(line["method"] == chosen[(line["site_id"], line["carrier"], line["scope"])])

    energy: dict[str, dict[str, Any]] = {}
    scope1: dict[str, float] = defaultdict(float)
    per_site: dict[str, dict[str, float]] = {
        s: {"scope1": 0.0, "scope2_location": 0.0, "scope2_market": 0.0} for s in buckets_in_month
    }
    market = [ln for ln in lines if ln["scope"] == 2 and ln["method"] == "market"]
    has_market = {ln["site_id"] for ln in market}
    contractual = {
        ln["site_id"] for ln in market if ln["instrument_kwh"] > 0 or residual_factors & set(ln["factor_ids"])
    }
    coverage: list[dict[str, Any]] = []
    renewable = electricity = 0.0
    missing_factor = 0
    for line in lines:
        site, scope, method = line["site_id"], line["scope"], line["method"]
        if is_energy(line):
            e = energy.setdefault(line["carrier"], {"amount": 0.0, "estimated": 0.0, "unit": line["unit"]})
            e["amount"] += line["kwh"]
            e["estimated"] += line["kwh_estimated"]
            missing_factor += line["buckets_without_factor"]
            expected = buckets_in_month.get(site, 0)
            coverage.append(
                {
                    "site_id": site,
                    "carrier": line["carrier"],
                    "unit": line["unit"],
                    "measured": line["kwh"] - line["kwh_estimated"],
                    "estimated": line["kwh_estimated"],
                    "buckets_with_data": line["buckets"],
                    "buckets_in_month": expected,
                }
            )
            if line["carrier"] == "electricity":
                electricity += line["kwh"]
        if scope == 1 and is_energy(line):
            scope1[line["carrier"]] += line["kg_co2e"]
            per_site[site]["scope1"] += line["kg_co2e"]
        elif scope == 2 and method == "location":
            per_site[site]["scope2_location"] += line["kg_co2e"]
            if site not in has_market:
                per_site[site]["scope2_market"] += line["kg_co2e"]
        elif scope == 2 and method == "market":
            per_site[site]["scope2_market"] += line["kg_co2e"]
            if line["carrier"] == "electricity":
                renewable += line["instrument_kwh"]

    s1 = sum(scope1.values())
    s2l = sum(v["scope2_location"] for v in per_site.values())
    s2m = sum(v["scope2_market"] for v in per_site.values())
    # Fuels metered in other units (m3, litres) are reported per carrier but not summed into kWh.
    total_kwh = sum(e["amount"] for e in energy.values() if e["unit"] == "kWh")
    estimated_kwh = sum(e["estimated"] for e in energy.values() if e["unit"] == "kWh")
    expected_total = sum(c["buckets_in_month"] for c in coverage)
    return {
        "energy_by_carrier": dict(sorted(energy.items())),
        "scope1_by_fuel": dict(sorted(scope1.items())),
        "per_site": per_site,
        "totals": {
            "scope1": s1,
            "scope2_location": s2l,
            "scope2_market": s2m,
            "total_location": s1 + s2l,
            "total_market": s1 + s2m,
            "energy_kwh": total_kwh,
        },
        "market_fallback_sites": sorted(
            {ln["site_id"] for ln in lines if ln["scope"] == 2 and ln["method"] == "location"} - contractual
        ),
        "renewable_share": renewable / electricity if electricity else 0.0,
        "coverage": {
            "measured_share": (total_kwh - estimated_kwh) / total_kwh if total_kwh else 0.0,
            "bucket_share": (sum(c["buckets_with_data"] for c in coverage) / expected_total)
            if expected_total
            else 0.0,
            "buckets_without_factor": missing_factor,
            "by_site_carrier": coverage,
        },
        "daily": _daily(daily_rows, chosen, has_market, first, nxt),
    }


def _daily(
    rows: list[tuple[Any, ...]],
    chosen: dict[tuple[str, str, int], str],
    has_market: set[str],
    first: date,
    nxt: date,
) -> list[dict[str, Any]]:
    """kg CO2e per site-local day: Scope 1, Scope 2 location, Scope 2 market (with fallback)."""
    days: dict[date, dict[str, float]] = {
        first + timedelta(days=i): {"scope1": 0.0, "scope2_location": 0.0, "scope2_market": 0.0}
        for i in range((nxt - first).days)
    }
    for site, day, scope, method, carrier, kg in rows:
        d = days.get(day)
        if d is None:
            continue
        if scope == 1 and chosen.get((site, carrier, 1)) == method:
            d["scope1"] += kg
        elif scope == 2 and method == "location":
            d["scope2_location"] += kg
            if site not in has_market:
                d["scope2_market"] += kg
        elif scope == 2 and method == "market":
            d["scope2_market"] += kg
    return [{"date": day.isoformat(), **v} for day, v in sorted(days.items())]
