"""The figures of one supplier's month (what a statement states), read from the compute tables.

The month is each site's LOCAL calendar month (a Shenzhen site's November starts at 16:00 UTC on
31 October). Location-based Scope 2 and Scope 1 come from ``site_rollups_15m``, read generically
(whatever (scope, method) rows the compute engine wrote are grouped and reported); market-based
Scope 2 comes from ``site_market_1h`` (``compute.market``: the one place instruments are allocated)
and is presented as scope 2 / method ``market`` lines. Hours are whole UTC hours, so a site whose
UTC offset is not a whole number of hours has its market month shifted by that fraction.

GHG Protocol rules applied here:
- Scope 2 has two methods, location- and market-based (Scope 2 Guidance, chapter 7: dual
  reporting), and only Scope 2 has them: a Scope 2 row of another method, or a location or market
  row in another scope, would be in no total, so the month is refused, naming it (compute writes
  none; recompute keeps rows of methods it does not write);
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
  reports the share of the month's 15-minute buckets that have data;
- activity is reported per carrier AND unit (gas metered in m3 and in kWh are never added up);
- per-gas totals (kg of CO2, CH4, N2O) come from the factors' per-gas values; CO2-only factors
  (China's grid factors) cover CO2 alone, which ``by_gas`` states (``co2_only_factor_ids``);
- buckets the compute engine could not turn into emissions (no factor: ``refusal``) are listed in
  ``refusals``; a statement with refusals is incomplete;
- non-metered activity (``compute.activity``: refrigerant top-ups, fuel invoices, generation) is
  listed in ``not_metered``, prorated to the month by the days its period overlaps it; its Scope 1
  kg CO2e is part of ``totals.scope1`` (and of the site's) and shown apart as ``not_metered_kg``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Any

import psycopg

from compute.market import FALLBACKS
from compute.quarantine import quarantined
from ops.errors import UserError

BUCKET = timedelta(minutes=15)
ENERGY_METHOD_PREFERENCE = ("location", "direct")
SCOPE2_METHODS = ("location", "market")


def month_bounds(month: str) -> tuple[date, date]:
    """``YYYY-MM`` → (first day, first day of the next month); ``YYYY`` → the calendar year (an
    annual statement: the same queries over the year are exactly the sum of its months)."""
    if len(month) == 4 and month.isdigit():
        year = int(month)
        if not 1990 <= year <= 2100:
            raise UserError(f"year must be between 1990 and 2100, not {month!r}")
        return date(year, 1, 1), date(year + 1, 1, 1)
    try:
        first = datetime.strptime(month, "%Y-%m").date()
    except ValueError:
        raise UserError(f"month must be YYYY-MM (or a year YYYY), not {month!r}") from None
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, nxt


def is_year(period: str) -> bool:
    return len(period) == 4 and period.isdigit()


def previous_month(month: str) -> str:
    """The period before: the previous month, or the previous year for an annual period."""
    if is_year(month):
        return str(int(month) - 1)
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


def _gas_expr(columns: set[str]) -> str:
    if "kg_co2" not in columns:
        return "NULL::float8, NULL::float8, NULL::float8"
    return ", ".join(f"sum(r.{g} ORDER BY r.bucket)" for g in ("kg_co2", "kg_ch4", "kg_n2o"))


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
        "           WHERE m.site_id = s.site_id), '{}'), s.factor_series, s.fuel_series"
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
            # The published series the site's factors come from (None: the settings' default).
            "factor_series": r[8],
            "fuel_series": r[9],
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
        f" {_unit_expr(columns)}, {_gas_expr(columns)}"
        " FROM site_rollups_15m r JOIN w ON r.site_id = w.site_id"
        " AND r.bucket >= w.t0 AND r.bucket < w.t1 WHERE r.method <> 'market'"
        f" GROUP BY r.site_id, r.carrier, r.scope, r.method, {_unit_expr(columns)}",
        p,
    ).fetchall()
    market_lines = conn.execute(
        _WINDOWS + "SELECT m.site_id, m.carrier, 2, 'market', sum(m.kwh ORDER BY m.bucket), 0::float8,"
        " coalesce(sum(m.kg_co2e ORDER BY m.bucket), 0), count(*),"
        " count(*) FILTER (WHERE m.kg_co2e IS NULL), sum(m.kwh_instruments ORDER BY m.bucket),"
        " coalesce(array_agg(DISTINCT m.residual_factor_id)"
        "          FILTER (WHERE m.residual_factor_id IS NOT NULL), '{}'), 'kWh',"
        " NULL::float8, NULL::float8, NULL::float8"
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
            "kg_co2": r[12],
            "kg_ch4": r[13],
            "kg_n2o": r[14],
        }
        for r in sorted(rollup_lines + market_lines, key=lambda r: (r[0], r[1], r[2], r[3], r[11]))
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

    factor_ids = sorted(
        {f for line in lines for f in line["factor_ids"]} | set(_activity_factor_ids(conn, p, first, nxt))
    )
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
            **dict(zip(_FACTOR_DETAIL, r[11:], strict=True)),
        }
        for r in conn.execute(
            "SELECT factor_id, publisher, series, region, carrier, valid_from, valid_to,"
            f" kg_co2e_per_unit, unit, version, source, {', '.join(_factor_detail(conn))}"
            " FROM emission_factors"
            " WHERE factor_id = ANY(%s) ORDER BY factor_id",
            (factor_ids,),
        ).fetchall()
    ]
    residual = {f["factor_id"] for f in factors if f["series"] in {series for _, series in FALLBACKS}}
    refusals = [
        {
            "site_id": r[0],
            "carrier": r[1],
            "scope": r[2],
            "unit": r[3],
            "reason": r[4],
            "buckets": r[5],
            "activity": r[6],
            "first_bucket": r[7].isoformat(),
            "last_bucket": r[8].isoformat(),
        }
        for r in (
            conn.execute(
                _WINDOWS + "SELECT r.site_id, r.carrier, r.scope, r.activity_unit, r.refusal, count(*),"
                " sum(r.kwh ORDER BY r.bucket), min(r.bucket), max(r.bucket)"
                " FROM site_rollups_15m r JOIN w ON r.site_id = w.site_id"
                " AND r.bucket >= w.t0 AND r.bucket < w.t1 WHERE r.refusal IS NOT NULL"
                " GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
                p,
            ).fetchall()
            if "refusal" in columns
            else []
        )
    ]
    accuracy = (
        [
            {
                "site_id": r[0],
                "carrier": r[1],
                "unit": r[2],
                "worst_class_pct": r[3],
                "meters_without_class": r[4],
            }
            for r in conn.execute(
                "SELECT m.site_id, m.carrier, coalesce(m.activity_unit, 'kWh'), max(m.accuracy_class),"
                " count(*) FILTER (WHERE m.accuracy_class IS NULL)"
                " FROM meters m JOIN sites s USING (site_id) WHERE s.supplier_id = %(supplier)s"
                " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                p,
            ).fetchall()
        ]
        if "accuracy_class" in _meter_columns(conn)
        else []
    )
    not_metered = _not_metered(conn, p, first, nxt)
    summary = _summarise(lines, daily_rows, buckets_in_month, residual, first, nxt)
    extra = sum(r["kg_co2e"] or 0.0 for r in not_metered if r["scope"] == 1)
    for r in not_metered:
        if r["scope"] == 1 and r["kg_co2e"] is not None:
            summary["per_site"][r["site_id"]]["scope1"] += r["kg_co2e"]
    t = summary["totals"]
    t["scope1"] += extra
    t["total_location"] += extra
    t["total_market"] += extra
    return {
        "supplier": {"id": supplier, "name": name},
        "month": month,
        "period_kind": "year" if is_year(month) else "month",
        "boundary": boundary,
        "lines": lines,
        **summary,
        "not_metered": not_metered,
        "meter_accuracy": accuracy,
        "not_metered_kg": extra,
        "by_gas": _by_gas(lines, factors),
        "factors": factors,
        "instruments": instruments,
        "refusals": refusals,
        "market_residual_basis": {site: dict(v) for site, v in sorted(market_basis.items())},
        # Readings held back as implausible (compute.quarantine): the data-quality section.
        "quarantined": [q.as_dict() for q in quarantined(conn, supplier, month)],
    }


# Factor columns beyond the original ones (migrations 0003/0004), reported when present.
_FACTOR_DETAIL = (
    "data_year",
    "gases",
    "gwp_set",
    "kg_co2_per_unit",
    "kg_ch4_per_unit",
    "kg_n2o_per_unit",
    "cv_basis",
    "reference_conditions",
    "fuel_type",
    "ncv",
    "ncv_unit",
    "ncv_source",
)


def _factor_detail(conn: psycopg.Connection[Any]) -> list[str]:
    have = {
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'emission_factors'"
            " AND table_schema = current_schema()"
        ).fetchall()
    }
    return [c if c in have else f"NULL AS {c}" for c in _FACTOR_DETAIL]


def _meter_columns(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'meters'"
        " AND table_schema = current_schema()"
    ).fetchall()
    return {r[0] for r in rows}


def _activity_factor_ids(
    conn: psycopg.Connection[Any], p: dict[str, Any], first: date, nxt: date
) -> list[str]:
    return [r["factor_id"] for r in _not_metered(conn, p, first, nxt) if r["factor_id"]]


def _not_metered(
    conn: psycopg.Connection[Any], p: dict[str, Any], first: date, nxt: date
) -> list[dict[str, Any]]:
    """Activity records of the supplier's sites overlapping the month, prorated by days."""
    if conn.execute("SELECT to_regclass('activity_records')").fetchone() == (None,):
        return []
    rows = conn.execute(
        "SELECT a.record_id, a.site_id, a.kind, a.scope, a.carrier, a.gas, a.period_start, a.period_end,"
        " a.amount, a.unit, a.exported_kwh, a.gwp_set, a.kg_co2e, a.kg_hfc, a.factor_id, a.refusal,"
        " a.provenance FROM activity_records a JOIN sites s USING (site_id)"
        " WHERE s.supplier_id = %(supplier)s AND a.period_start < %(next)s AND a.period_end > %(first)s"
        " ORDER BY a.site_id, a.record_id",
        p,
    ).fetchall()
    out = []
    for r in rows:
        start, end = r[6], r[7]
        share = ((min(end, nxt) - max(start, first)).days) / (end - start).days

        def part(x: float | None, share: float = share) -> float | None:
            return None if x is None else x * share

        out.append(
            {
                "record_id": r[0],
                "site_id": r[1],
                "kind": r[2],
                "scope": r[3],
                "carrier": r[4],
                "gas": r[5],
                "period": [start.isoformat(), end.isoformat()],
                "share_in_month": share,
                "amount": r[8] * share,
                "unit": r[9],
                "exported_kwh": part(r[10]),
                "gwp_set": r[11],
                "kg_co2e": part(r[12]),
                "kg_hfc": part(r[13]),
                "factor_id": r[14],
                "refusal": r[15],
                "provenance": r[16],
                "metered": False,
            }
        )
    return out


def _by_gas(lines: list[dict[str, Any]], factors: list[dict[str, Any]]) -> dict[str, Any]:
    """kg of each gas per scope (Scope 1 direct, Scope 2 location), the GWP sets converting them to
    CO2e, and which factors cover CO2 only (their CH4/N2O are not in the figures)."""
    out: dict[str, Any] = {}
    for scope, method in ((1, "direct"), (2, "location")):
        rows = [ln for ln in lines if ln["scope"] == scope and ln["method"] == method]
        out[f"scope{scope}" if scope == 1 else "scope2_location"] = {
            gas: sum(ln[f"kg_{gas}"] or 0.0 for ln in rows) for gas in ("co2", "ch4", "n2o")
        }
    out["gwp_sets"] = sorted({f["gwp_set"] for f in factors if f.get("gwp_set") not in (None, "none")})
    out["co2_only_factor_ids"] = sorted(f["factor_id"] for f in factors if f.get("gases") == "CO2")
    return out


def _summarise(
    lines: list[dict[str, Any]],
    daily_rows: list[tuple[Any, ...]],
    buckets_in_month: dict[str, int],
    residual_factors: set[str],
    first: date,
    nxt: date,
) -> dict[str, Any]:
    for line in lines:
        # compute writes Scope 2 'location' and Scope 1 'direct' rows (market-based hours live in
        # site_market_1h), but recompute keeps rows of other methods that something else wrote.
        if (line["scope"] == 2) != (line["method"] in SCOPE2_METHODS):
            raise UserError(
                f"site_rollups_15m: site {line['site_id']!r} has {line['carrier']} rows of Scope"
                f" {line['scope']} method {line['method']!r}, which no total counts (Scope 2 is"
                " location- or market-based, and those methods are Scope 2 only; compute writes"
                " no such rows): delete them"
            )
    methods: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for line in lines:
        methods[(line["site_id"], line["carrier"], line["scope"])].add(line["method"])
    chosen = {key: energy_method(key[2], ms) for key, ms in methods.items()}
    # A carrier metered in more than one unit (gas in m3 and kWh) is reported per unit.
    units: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        units[line["carrier"]].add(line["unit"])

    def is_energy(line: dict[str, Any]) -> bool:
        return bool(line["method"] == chosen[(line["site_id"], line["carrier"], line["scope"])])

    energy: dict[str, dict[str, Any]] = {}
    scope1: dict[str, float] = defaultdict(float)
    per_site: dict[str, dict[str, float]] = {
        s: {"scope1": 0.0, "scope2_location": 0.0, "scope2_market": 0.0} for s in buckets_in_month
    }
    market = [ln for ln in lines if ln["method"] == "market"]  # Scope 2 (checked above)
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
            carrier = line["carrier"]
            key = carrier if len(units[carrier]) == 1 else f"{carrier} ({line['unit']})"
            e = energy.setdefault(key, {"amount": 0.0, "estimated": 0.0, "unit": line["unit"]})
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
        elif method == "location":
            per_site[site]["scope2_location"] += line["kg_co2e"]
            if site not in has_market:
                per_site[site]["scope2_market"] += line["kg_co2e"]
        elif method == "market":
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
            {ln["site_id"] for ln in lines if ln["method"] == "location"} - contractual
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
