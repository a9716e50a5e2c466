"""The month's figures, function by function: the mutation tests of ``compute/statements/figures.py``.

The summing rules (energy counted once per site and carrier, market-based fallback, renewable share,
coverage, daily values, per-gas totals) run on small in-memory lines whose expected results are
worked out by hand in the comments. ``month_figures`` itself runs once against a real PostgreSQL
with the fleet of ``test_statements_content`` (two sites in two time zones, gas in two units,
refused cooling, non-metered records); its boundary, windows, accuracy classes, refusals and
factors are checked against the fleet file, the time zones' rules and the published factors.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest

from compute.activity import apply_activity
from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.recompute import recompute
from compute.statements.figures import (
    _by_gas,
    _daily,
    _estimated_expr,
    _gas_expr,
    _summarise,
    _unit_expr,
    energy_method,
    is_year,
    month_bounds,
    month_figures,
    previous_month,
    supplier_name,
)
from ingest.writer import dirty_ranges
from ops.errors import UserError
from tests.test_compute_support import REPO, compute_dsn, insert_rows, reset
from tests.test_statements_content import ACTIVITY, FLEET, rows

__all__ = ["compute_dsn"]


# --- periods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "first", "nxt"),
    [
        ("2026-11", date(2026, 11, 1), date(2026, 12, 1)),
        ("2026-12", date(2026, 12, 1), date(2027, 1, 1)),
        ("2026-01", date(2026, 1, 1), date(2026, 2, 1)),
        ("2024-02", date(2024, 2, 1), date(2024, 3, 1)),
        ("2024", date(2024, 1, 1), date(2025, 1, 1)),
        ("1990", date(1990, 1, 1), date(1991, 1, 1)),
        ("2100", date(2100, 1, 1), date(2101, 1, 1)),
    ],
)
def test_month_bounds(period: str, first: date, nxt: date) -> None:
    assert month_bounds(period) == (first, nxt)


@pytest.mark.parametrize(
    ("period", "message"),
    [
        ("1989", "year must be between 1990 and 2100, not '1989'"),
        ("2101", "year must be between 1990 and 2100, not '2101'"),
        ("2026-13", "month must be YYYY-MM (or a year YYYY), not '2026-13'"),
        ("20261", "month must be YYYY-MM (or a year YYYY), not '20261'"),
        ("abcd", "month must be YYYY-MM (or a year YYYY), not 'abcd'"),
    ],
)
def test_bad_periods_are_named(period: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        month_bounds(period)
    assert str(e.value) == message


def test_periods_before() -> None:
    assert [is_year(p) for p in ("2024", "2024-01", "abcd", "20245", "202")] == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert previous_month("2026-01") == "2025-12"
    assert previous_month("2026-03") == "2026-02"
    assert previous_month("2024") == "2023"


def test_sql_for_each_rollup_layout() -> None:
    assert _unit_expr({"activity_unit"}) == "r.activity_unit"
    assert _unit_expr(set()) == "'kWh'::text"
    assert _gas_expr(set()) == "NULL::float8, NULL::float8, NULL::float8"
    assert _gas_expr({"kg_co2"}) == (
        "sum(r.kg_co2 ORDER BY r.bucket), sum(r.kg_ch4 ORDER BY r.bucket), sum(r.kg_n2o ORDER BY r.bucket)"
    )
    assert _estimated_expr({"kwh_estimated", "kwh_measured"}) == "sum(r.kwh_estimated ORDER BY r.bucket)"
    assert _estimated_expr({"kwh_measured"}) == "sum((r.kwh - r.kwh_measured) ORDER BY r.bucket)"
    assert _estimated_expr(set()) == "0::float8"


def test_the_energy_method() -> None:
    assert energy_method(2, {"market", "location"}) == "location"
    assert energy_method(1, {"direct", "aaa"}) == "direct"
    assert energy_method(1, {"direct", "location"}) == "location"  # the preference order
    assert energy_method(1, {"zz", "bb"}) == "bb"


# --- summing rules on lines ---------------------------------------------------------------------


def line(
    site: str, carrier: str, scope: int, method: str, kwh: float, kg: float, **kw: Any
) -> dict[str, Any]:
    return {
        "site_id": site,
        "carrier": carrier,
        "scope": scope,
        "method": method,
        "kwh": kwh,
        "kg_co2e": kg,
        "kwh_estimated": kw.get("est", 0.0),
        "buckets": kw.get("buckets", 96),
        "buckets_without_factor": kw.get("bwf", 0),
        "instrument_kwh": kw.get("instr", 0.0),
        "factor_ids": kw.get("ids", []),
        "unit": kw.get("unit", "kWh"),
    }


LINES = [
    # Site a: location and market Scope 2 (a GEC covers 40 kWh); gas under two methods.
    line("a", "electricity", 2, "location", 100, 50, est=10, buckets=90, bwf=1, ids=["loc"]),
    line("a", "electricity", 2, "market", 100, 30, buckets=25, bwf=2, instr=40),
    line("a", "natural_gas", 1, "direct", 200, 40, est=20, buckets=80, ids=["ng"]),
    line("a", "natural_gas", 1, "zz", 999, 7, buckets=1, bwf=5),  # not the energy method: ignored
    # Site b: no market rows (market = location); gas in m3.
    line("b", "electricity", 2, "location", 50, 20, bwf=3),
    line("b", "natural_gas", 1, "direct", 10, 3, unit="m3"),
    # Site c: market rows priced by a residual factor; site d: market rows without one.
    line("c", "electricity", 2, "location", 10, 4),
    line("c", "electricity", 2, "market", 10, 6, buckets=24, ids=["resid"]),
    line("d", "electricity", 2, "location", 20, 8, buckets=48),
    line("d", "electricity", 2, "market", 20, 9, buckets=12, ids=["other"]),
]
BUCKETS = {"a": 96, "b": 96, "c": 96, "d": 100, "e": 96}


def test_summary_counts_energy_once_and_falls_back_per_site() -> None:
    daily = [
        ("a", date(2026, 10, 31), 1, "direct", "natural_gas", 1000.0),  # before the month
        ("a", date(2026, 11, 1), 1, "direct", "natural_gas", 5.0),
        ("a", date(2026, 11, 1), 1, "zz", "natural_gas", 100.0),  # not the energy method
        ("a", date(2026, 11, 1), 2, "location", "electricity", 7.0),
        ("b", date(2026, 11, 2), 2, "location", "electricity", 11.0),  # no market rows: both
        ("a", date(2026, 11, 2), 2, "market", "electricity", 13.0),
        ("x", date(2026, 11, 2), 1, "direct", "electricity", 17.0),  # no such line
        ("a", date(2026, 11, 2), 2, "other", "electricity", 19.0),
        ("a", date(2026, 11, 3), 2, "location", "electricity", 1000.0),  # after the month
    ]
    s = _summarise(LINES, daily, BUCKETS, {"resid"}, date(2026, 11, 1), date(2026, 11, 3))
    # Energy: electricity from location lines 100 + 50 + 10 + 20; gas per unit, direct lines only.
    assert s["energy_by_carrier"] == {
        "electricity": {"amount": 180.0, "estimated": 10.0, "unit": "kWh"},
        "natural_gas (kWh)": {"amount": 200.0, "estimated": 20.0, "unit": "kWh"},
        "natural_gas (m3)": {"amount": 10.0, "estimated": 0.0, "unit": "m3"},
    }
    assert list(s["energy_by_carrier"]) == ["electricity", "natural_gas (kWh)", "natural_gas (m3)"]
    assert s["scope1_by_fuel"] == {"natural_gas": 43.0}
    # Market: a's own 30, b's location 20 (no market rows), c's 6, d's 9.
    assert s["per_site"] == {
        "a": {"scope1": 40.0, "scope2_location": 50.0, "scope2_market": 30.0},
        "b": {"scope1": 3.0, "scope2_location": 20.0, "scope2_market": 20.0},
        "c": {"scope1": 0.0, "scope2_location": 4.0, "scope2_market": 6.0},
        "d": {"scope1": 0.0, "scope2_location": 8.0, "scope2_market": 9.0},
        "e": {"scope1": 0.0, "scope2_location": 0.0, "scope2_market": 0.0},
    }
    assert s["totals"] == {
        "scope1": 43.0,
        "scope2_location": 82.0,
        "scope2_market": 65.0,
        "total_location": 125.0,
        "total_market": 108.0,
        "energy_kwh": 380.0,
    }
    # a holds an instrument, c a residual factor; b has no market rows, d's have neither.
    assert s["market_fallback_sites"] == ["b", "d"]
    assert s["renewable_share"] == pytest.approx(40 / 180, rel=1e-12)
    cov = s["coverage"]
    assert cov["measured_share"] == pytest.approx(350 / 380, rel=1e-12)
    assert cov["bucket_share"] == pytest.approx((90 + 80 + 96 + 96 + 96 + 48) / (5 * 96 + 100), rel=1e-12)
    assert cov["buckets_without_factor"] == 4  # 1 (a) + 3 (b): the energy lines only
    assert cov["by_site_carrier"] == [
        {
            "site_id": "a",
            "carrier": "electricity",
            "unit": "kWh",
            "measured": 90.0,
            "estimated": 10.0,
            "buckets_with_data": 90,
            "buckets_in_month": 96,
        },
        {
            "site_id": "a",
            "carrier": "natural_gas",
            "unit": "kWh",
            "measured": 180.0,
            "estimated": 20.0,
            "buckets_with_data": 80,
            "buckets_in_month": 96,
        },
        {
            "site_id": "b",
            "carrier": "electricity",
            "unit": "kWh",
            "measured": 50.0,
            "estimated": 0.0,
            "buckets_with_data": 96,
            "buckets_in_month": 96,
        },
        {
            "site_id": "b",
            "carrier": "natural_gas",
            "unit": "m3",
            "measured": 10.0,
            "estimated": 0.0,
            "buckets_with_data": 96,
            "buckets_in_month": 96,
        },
        {
            "site_id": "c",
            "carrier": "electricity",
            "unit": "kWh",
            "measured": 10.0,
            "estimated": 0.0,
            "buckets_with_data": 96,
            "buckets_in_month": 96,
        },
        {
            "site_id": "d",
            "carrier": "electricity",
            "unit": "kWh",
            "measured": 20.0,
            "estimated": 0.0,
            "buckets_with_data": 48,
            "buckets_in_month": 100,
        },
    ]
    assert s["daily"] == [
        {"date": "2026-11-01", "scope1": 5.0, "scope2_location": 7.0, "scope2_market": 0.0},
        {"date": "2026-11-02", "scope1": 0.0, "scope2_location": 11.0, "scope2_market": 24.0},
    ]


def test_an_empty_month_has_zero_shares() -> None:
    s = _summarise([], [], {"a": 96}, set(), date(2026, 11, 1), date(2026, 11, 2))
    assert (s["renewable_share"], s["coverage"]["measured_share"], s["coverage"]["bucket_share"]) == (
        0.0,
        0.0,
        0.0,
    )
    assert s["totals"]["energy_kwh"] == 0.0 and s["market_fallback_sites"] == []
    assert s["daily"] == [{"date": "2026-11-01", "scope1": 0.0, "scope2_location": 0.0, "scope2_market": 0.0}]


def test_a_market_only_site_is_not_a_fallback_and_gas_is_no_renewable() -> None:
    lines = [
        line("a", "electricity", 2, "market", 100, 30, instr=0.0, ids=["resid"]),
        line("a", "steam", 2, "market", 100, 30, instr=50.0),  # not electricity: no renewable share
        line("a", "electricity", 2, "location", 100, 50),
    ]
    s = _summarise(lines, [], {"a": 96}, {"resid"}, date(2026, 11, 1), date(2026, 11, 2))
    assert s["market_fallback_sites"] == []
    assert s["renewable_share"] == 0.0
    assert s["per_site"]["a"]["scope2_market"] == 60.0


def test_daily_values() -> None:
    chosen = {("a", "natural_gas", 1): "direct"}
    rows = [
        ("a", date(2026, 11, 1), 1, "direct", "natural_gas", 2.0),
        ("a", date(2026, 11, 1), 1, "direct", "natural_gas", 3.0),
        ("a", date(2026, 11, 1), 2, "location", "electricity", 4.0),
        ("a", date(2026, 11, 1), 2, "location", "electricity", 5.0),
        ("b", date(2026, 11, 1), 2, "market", "electricity", 6.0),
        ("b", date(2026, 11, 1), 2, "market", "electricity", 7.0),
    ]
    assert _daily(rows, chosen, {"a"}, date(2026, 11, 1), date(2026, 11, 2)) == [
        {"date": "2026-11-01", "scope1": 5.0, "scope2_location": 9.0, "scope2_market": 13.0}
    ]


def test_per_gas_totals() -> None:
    def gl(
        scope: int, method: str, co2: float | None, ch4: float | None, n2o: float | None
    ) -> dict[str, Any]:
        return {"scope": scope, "method": method, "kg_co2": co2, "kg_ch4": ch4, "kg_n2o": n2o}

    lines = [
        gl(1, "direct", 10.0, 1.0, None),
        gl(1, "direct", 2.0, None, 0.5),
        gl(1, "location", 300.0, 3.0, 3.0),  # neither direct Scope 1 nor location Scope 2
        gl(2, "location", 20.0, None, 0.5),
        gl(2, "location", 5.0, 2.0, 0.25),
        gl(2, "market", 1000.0, 10.0, 10.0),
        gl(2, "direct", 500.0, 5.0, 5.0),
    ]
    factors: list[dict[str, Any]] = [
        {"factor_id": "f3", "gwp_set": "AR5", "gases": "CO2e"},
        {"factor_id": "f2", "gwp_set": None, "gases": "CO2"},
        {"factor_id": "f1", "gwp_set": "none", "gases": "CO2"},
        {"factor_id": "f4", "gwp_set": "AR4"},
        {"factor_id": "f5", "gwp_set": "AR5", "gases": "CO2e"},
    ]
    assert _by_gas(lines, factors) == {
        "scope1": {"co2": 12.0, "ch4": 1.0, "n2o": 0.5},
        "scope2_location": {"co2": 25.0, "ch4": 2.0, "n2o": 0.75},
        "gwp_sets": ["AR4", "AR5"],
        "co2_only_factor_ids": ["f1", "f2"],
    }


# --- month_figures against the database ----------------------------------------------------------


# Two more records in March: an invoice spanning two factor vintages (refused: no kg CO2e) and
# generation (no scope, no emissions; its exported kWh is disclosed).
MORE_ACTIVITY = """
[[fuel_purchases]]
id = "diesel-old"
site = "uk"
period_start = 2023-12-15
period_end = 2024-03-15
carrier = "diesel"
amount = 500.0
provenance = "invoice 402"

[[generation]]
id = "pv-mar"
site = "uk"
period_start = 2024-03-01
period_end = 2024-04-01
source = "pv"
self_consumed_kwh = 300.0
exported_kwh = 62.0
provenance = "inverter log 3"
"""


# Shenzhen names a fuel series but no factor series (it has no fuel meter: no figure changes).
SZ_FUEL_SERIES = FLEET.replace(
    'timezone = "Asia/Shanghai"\n', 'timezone = "Asia/Shanghai"\nfuel_series = "ghg-conversion-factors"\n'
)
assert SZ_FUEL_SERIES != FLEET


@pytest.fixture(scope="module")
def march_db(compute_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """March 2024 of test_statements_content's fleet, computed (once per module)."""
    tmp = tmp_path_factory.mktemp("figures")
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        (tmp / "fleet.toml").write_text(SZ_FUEL_SERIES)
        apply_fleet(conn, tmp / "fleet.toml")
        apply_factors(conn, REPO / "config" / "factors.toml")
        data = rows()
        insert_rows(conn, data)
        for d in dirty_ranges(data):
            recompute(conn, d)
        (tmp / "activity.toml").write_text(ACTIVITY + MORE_ACTIVITY)
        apply_activity(conn, tmp / "activity.toml")
    return compute_dsn


@pytest.fixture
def march(march_db: str) -> dict[str, Any]:
    """Its figures, read anew for each test (so that each test runs ``month_figures`` itself: the
    mutation run only tries a function's mutants on the tests that call it)."""
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        return month_figures(conn, "acme", "2024-03")


def utc(y: int, m: int, d: int, h: int = 0, minute: int = 0) -> datetime:
    return datetime(y, m, d, h, minute, tzinfo=UTC)


def test_the_boundary_and_each_sites_local_month(march: dict[str, Any]) -> None:
    assert march["supplier"] == {"id": "acme", "name": "Acme"}
    assert (march["month"], march["period_kind"]) == ("2024-03", "month")
    [sz, uk] = march["boundary"]
    windows = [[datetime.fromisoformat(t) for t in s["window_utc"]] for s in (sz, uk)]
    # Shanghai is UTC+8 all year; London moves to BST at 01:00 UTC on 31 March 2024.
    assert windows == [[utc(2024, 2, 29, 16), utc(2024, 3, 31, 16)], [utc(2024, 3, 1), utc(2024, 3, 31, 23)]]
    assert {k: v for k, v in sz.items() if k != "window_utc"} == {
        "site_id": "sz",
        "name": "Shenzhen",
        "grid_region": "CN",
        "timezone": "Asia/Shanghai",
        "meters": 1,
        "carriers": ["electricity"],
        "factor_series": None,
        "fuel_series": "ghg-conversion-factors",
    }
    assert {k: v for k, v in uk.items() if k != "window_utc"} == {
        "site_id": "uk",
        "name": "Leeds",
        "grid_region": "GB",
        "timezone": "Europe/London",
        "meters": 4,
        "carriers": ["cooling", "electricity", "natural_gas"],
        "factor_series": "ghg-conversion-factors",
        "fuel_series": "ghg-conversion-factors",
    }
    # 744 hours in Shenzhen's March, 743 in Leeds' (the clocks went forward): 4 buckets an hour.
    by_site = {(c["site_id"], c["carrier"], c["unit"]): c for c in march["coverage"]["by_site_carrier"]}
    assert by_site[("sz", "electricity", "kWh")]["buckets_in_month"] == 744 * 4
    assert by_site[("uk", "natural_gas", "m3")]["buckets_in_month"] == 743 * 4


def test_lines_accuracy_refusals_and_quarantine(march: dict[str, Any]) -> None:
    lines = {
        (ln["site_id"], ln["carrier"], ln["scope"], ln["method"], ln["unit"]): ln for ln in march["lines"]
    }
    gas = lines[("uk", "natural_gas", 1, "direct", "m3")]
    # 1,000 m3 in 10:00-11:00 on 5 March: 4 buckets, DESNZ 2024 2.04542 kg CO2e/m3, CO2 2.0414 kg/m3.
    assert gas["kwh"] == pytest.approx(1000.0) and gas["kwh_estimated"] == 0.0
    assert gas["kg_co2e"] == pytest.approx(2045.42) and gas["kg_co2"] == pytest.approx(2041.4)
    assert gas["kg_ch4"] == pytest.approx(0.00307 * 1000 / 28) and gas["kg_n2o"] == pytest.approx(
        0.00095 * 1000 / 265
    )
    assert (gas["buckets"], gas["buckets_without_factor"], gas["factor_ids"]) == (
        4,
        0,
        ["gb-desnz-2024-natural-gas-m3-v1"],
    )
    market = lines[("sz", "electricity", 2, "market", "kWh")]
    # The market line: 2,000 kWh, no instrument, the excl-non-fossil factor 0.6096.
    assert (market["kwh"], market["instrument_kwh"], market["kg_co2"]) == (pytest.approx(2000.0), 0.0, None)
    assert market["kg_co2e"] == pytest.approx(2000 * 0.6096)
    assert market["factor_ids"] == ["cn-mee-stat-2023-national-excl-mkt-nonfossil-v1"]
    assert list(lines) == sorted(lines, key=lambda k: (k[0], k[1], k[2], k[3], k[4]))
    assert march["meter_accuracy"] == [
        {
            "site_id": "sz",
            "carrier": "electricity",
            "unit": "kWh",
            "worst_class_pct": 0.5,
            "meters_without_class": 0,
        },
        {
            "site_id": "uk",
            "carrier": "cooling",
            "unit": "kWh",
            "worst_class_pct": None,
            "meters_without_class": 1,
        },
        {
            "site_id": "uk",
            "carrier": "electricity",
            "unit": "kWh",
            "worst_class_pct": 1.0,
            "meters_without_class": 0,
        },
        {
            "site_id": "uk",
            "carrier": "natural_gas",
            "unit": "kWh",
            "worst_class_pct": 1.0,
            "meters_without_class": 0,
        },
        {
            "site_id": "uk",
            "carrier": "natural_gas",
            "unit": "m3",
            "worst_class_pct": 1.5,
            "meters_without_class": 0,
        },
    ]
    [refusal] = march["refusals"]
    assert {k: v for k, v in refusal.items() if k not in ("reason", "first_bucket", "last_bucket")} == {
        "site_id": "uk",
        "carrier": "cooling",
        "scope": 2,
        "unit": "kWh",
        "buckets": 4,
        "activity": pytest.approx(500.0),
    }
    assert refusal["reason"].startswith("no emission factor for cooling")
    assert datetime.fromisoformat(refusal["first_bucket"]) == utc(2024, 3, 5, 10)
    assert datetime.fromisoformat(refusal["last_bucket"]) == utc(2024, 3, 5, 10, 45)
    assert march["quarantined"] == [] and march["instruments"] == []
    # Shenzhen's rest is priced by a fallback series (excl. non-fossil); Leeds' by location factors.
    assert march["market_fallback_sites"] == ["uk"]
    # Leeds: no residual mix in the factors, so its 1,000 kWh of electricity is location-based; its
    # 500 kWh of cooling has no factor at all ("none").
    assert march["market_residual_basis"] == {
        "sz": {"excl-market-nonfossil": pytest.approx(2000.0)},
        "uk": {"location": pytest.approx(1000.0), "none": pytest.approx(500.0)},
    }


def test_factors_as_published(march: dict[str, Any]) -> None:
    by_id = {f["factor_id"]: f for f in march["factors"]}
    assert [f["factor_id"] for f in march["factors"]] == sorted(by_id)
    # config/factors.toml, from the DESNZ 2024 flat file (ID 1_100_1004_1_4).
    m3 = by_id["gb-desnz-2024-natural-gas-m3-v1"]
    assert {k: v for k, v in m3.items() if k not in ("source", "ncv_source")} == {
        "factor_id": "gb-desnz-2024-natural-gas-m3-v1",
        "publisher": "UK DESNZ",
        "series": "ghg-conversion-factors",
        "region": "GB",
        "carrier": "natural_gas",
        "valid_from": "2024-01-01",
        "valid_to": "2025-01-01",
        "kg_co2e_per_unit": 2.04542,
        "unit": "m3",
        "version": 1,
        "data_year": 2024,
        "gases": "CO2e",
        "gwp_set": "AR5",
        "kg_co2_per_unit": 2.0414,
        "kg_ch4_per_unit": pytest.approx(0.00307 / 28),
        "kg_n2o_per_unit": pytest.approx(0.00095 / 265),
        "cv_basis": "net",
        "reference_conditions": "15C-101.325kPa",
        "fuel_type": "",
        "ncv": pytest.approx(2.04542 / 0.20264),
        "ncv_unit": "kWh (net CV) per m3",
    }
    assert m3["source"].startswith("DESNZ Greenhouse gas reporting: conversion factors 2024")
    assert m3["ncv_source"].startswith("derived from the same 2024 set")
    # The diesel invoice's factor is listed too (non-metered activity).
    assert "gb-desnz-2024-diesel-l-v1" in by_id


def test_non_metered_records_prorated_by_days(march: dict[str, Any], march_db: str) -> None:
    nm = {r["record_id"]: r for r in march["not_metered"]}
    assert list(nm) == ["chiller", "diesel-inv", "diesel-old", "pv-mar"]
    # 15 Dec 2023-15 Mar 2024: 91 days, 14 in March; refused, so no emissions.
    old = nm["diesel-old"]
    assert (old["share_in_month"], old["kg_co2e"], old["scope"]) == (14 / 91, None, 1)
    assert old["refusal"] and old["amount"] == pytest.approx(500 * 14 / 91)
    pv = nm["pv-mar"]
    assert (pv["scope"], pv["kg_co2e"], pv["exported_kwh"], pv["amount"]) == (None, None, 62.0, 300.0)
    diesel = nm["diesel-inv"]
    # 15 Feb-15 Mar 2024: 29 days, 14 in March.
    assert diesel["period"] == ["2024-02-15", "2024-03-15"] and diesel["share_in_month"] == 14 / 29
    assert diesel["amount"] == pytest.approx(1000 * 14 / 29)
    with psycopg.connect(march_db) as conn:
        stored = conn.execute(
            "SELECT site_id, kind, scope, carrier, gas, unit, gwp_set, kg_co2e, kg_hfc, factor_id, refusal,"
            " provenance, exported_kwh FROM activity_records WHERE record_id = 'diesel-inv'"
        ).fetchone()
    assert stored is not None
    site, kind, scope, carrier, gas, unit, gwp, kg, hfc, factor, refusal, provenance, exported = stored
    assert {k: v for k, v in diesel.items() if k not in ("period", "share_in_month", "amount")} == {
        "record_id": "diesel-inv",
        "site_id": site,
        "kind": kind,
        "scope": scope,
        "carrier": carrier,
        "gas": gas,
        "unit": unit,
        "gwp_set": gwp,
        "kg_co2e": pytest.approx(kg * 14 / 29),
        "kg_hfc": None if hfc is None else pytest.approx(hfc * 14 / 29),
        "factor_id": factor,
        "refusal": refusal,
        "provenance": provenance,
        "exported_kwh": exported,
        "metered": False,
    }
    assert (site, kind, scope, carrier, factor, provenance) == (
        "uk",
        "fuel_purchase",
        1,
        "diesel",
        "gb-desnz-2024-diesel-l-v1",
        "invoice 551",
    )
    chiller = nm["chiller"]
    assert (chiller["share_in_month"], chiller["gas"], chiller["kg_co2e"]) == (
        1.0,
        "R-410A",
        pytest.approx(4175.0),
    )
    assert chiller["kg_hfc"] == 2.0  # the 2 kg topped up
    # Scope 1 non-metered kg is in the totals and in the site's (R-410A 2 kg x 2,087.5 + the diesel).
    extra = 4175.0 + 1000 * 2.66155 * 14 / 29
    assert march["not_metered_kg"] == pytest.approx(extra)
    metered_s1 = 200_000 * 0.18290 + 1_000 * 2.04542
    assert march["per_site"]["uk"]["scope1"] == pytest.approx(metered_s1 + extra)
    t = march["totals"]
    assert t["total_location"] == pytest.approx(t["scope1"] + t["scope2_location"])
    assert t["total_market"] == pytest.approx(metered_s1 + extra + t["scope2_market"])


def test_a_year_and_an_unknown_supplier(march_db: str) -> None:
    with psycopg.connect(march_db) as conn:
        assert supplier_name(conn, "acme") == "Acme"
        with pytest.raises(UserError) as e:
            supplier_name(conn, "nobody")
        assert str(e.value) == "unknown supplier 'nobody' (apply the fleet with `scopemeter fleet apply`)"
        year = month_figures(conn, "acme", "2024")
        assert year["period_kind"] == "year"
        assert year["totals"]["scope1"] == pytest.approx(
            200_000 * 0.18290 + 1_000 * 2.04542 + 4175.0 + 1000 * 2.66155  # all of the diesel in 2024
        )


def test_energy_per_carrier_and_unit(march: dict[str, Any]) -> None:
    """Electricity 1,000 kWh in Leeds and 2,000 in Shenzhen; gas in kWh and m3 apart; cooling 500 kWh
    (refused, yet metered energy)."""
    energy = march["energy_by_carrier"]
    assert sorted(energy) == ["cooling", "electricity", "natural_gas (kWh)", "natural_gas (m3)"]
    assert energy["electricity"] == {"amount": pytest.approx(3000.0), "estimated": 0.0, "unit": "kWh"}
    assert energy["cooling"]["amount"] == pytest.approx(500.0)
    market = [ln for ln in march["lines"] if ln["method"] == "market"]
    assert {ln["unit"] for ln in market} == {"kWh"} and {ln["scope"] for ln in market} == {2}


def _rollup_columns(conn: psycopg.Connection[Any]) -> str:
    """site_rollups_15m's columns but ``method``, for copying its rows under another method."""
    return ", ".join(
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'site_rollups_15m'"
            " AND table_schema = current_schema() AND column_name <> 'method' ORDER BY ordinal_position"
        ).fetchall()
    )


def test_market_rows_in_the_rollups_are_not_counted_twice(march_db: str) -> None:
    """Market-based Scope 2 comes from site_market_1h only: a 'market' row in site_rollups_15m (an
    older layout) changes nothing."""
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        before = month_figures(conn, "acme", "2024-03")
        names = _rollup_columns(conn)
        conn.execute(
            f"INSERT INTO site_rollups_15m ({names}, method) SELECT {names}, 'market' FROM site_rollups_15m"
            " WHERE carrier = 'electricity' AND method = 'location'"
        )
        after = month_figures(conn, "acme", "2024-03")
    assert (after["lines"], after["daily"], after["totals"]) == (
        before["lines"],
        before["daily"],
        before["totals"],
    )


@pytest.mark.parametrize(
    ("carrier", "method", "copied", "scope"),
    [
        # A Scope 2 method that is neither location- nor market-based: it would be in no Scope 2 total.
        ("electricity", "supplier_specific", "location", 2),
        # A Scope 1 row labelled location: no Scope 2 total may take it, nor any Scope 1 one.
        ("natural_gas", "location", "direct", 1),
    ],
)
def test_rows_of_a_method_no_total_counts_are_refused(
    march_db: str, carrier: str, method: str, copied: str, scope: int
) -> None:
    """compute writes Scope 2 'location' and Scope 1 'direct' rows only, but recompute keeps rows of
    other methods that something else wrote (as this test does): the month is refused, naming them,
    rather than stating totals that leave them out. Scope 1 rows of other methods stay allowed
    (``test_summary_counts_energy_once_and_falls_back_per_site``)."""
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        names = _rollup_columns(conn)
        conn.execute(
            f"INSERT INTO site_rollups_15m ({names}, method) SELECT {names}, %s FROM site_rollups_15m"
            " WHERE site_id = 'uk' AND carrier = %s AND method = %s",
            (method, carrier, copied),
        )
        with pytest.raises(UserError) as e:
            month_figures(conn, "acme", "2024-03")
    assert str(e.value) == (
        f"site_rollups_15m: site 'uk' has {carrier} rows of Scope {scope} method {method!r}, which no"
        " total counts (Scope 2 is location- or market-based, and those methods are Scope 2 only;"
        " compute writes no such rows): delete them"
    )


def test_quarantined_readings_of_the_sites_local_month_are_listed(march_db: str) -> None:
    """Two NaN readings (the gateway sent them; compute.quarantine holds them): Leeds' in March is
    listed, Shenzhen's at 23:59 on 29 February local time (15:59 UTC) is not. Both are held."""
    leeds = datetime(2024, 3, 5, 10, 30, 30, tzinfo=UTC)  # between two of uk-elec's readings
    shenzhen = datetime(2024, 2, 29, 15, 59, tzinfo=UTC)
    data = [
        ("uk-elec", "energy_import_kwh", leeds, float("nan"), 0, "uk", "gw", 0),
        ("sz-elec", "energy_import_kwh", shenzhen, float("nan"), 0, "sz", "gw", 0),
    ]
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        insert_rows(conn, data)
        for d in dirty_ranges(data):
            recompute(conn, d)
        held = conn.execute("SELECT meter_id FROM quarantined_readings ORDER BY 1").fetchall()
        figs = month_figures(conn, "acme", "2024-03")
    assert held == [("sz-elec",), ("uk-elec",)]
    [q] = figs["quarantined"]
    assert datetime.fromisoformat(q.pop("ts")) == leeds
    assert q == {
        "meter_id": "uk-elec",
        "site_id": "uk",
        "quantity": "energy_import_kwh",
        "value": "nan",
        "reason": "non_finite_value",
        "detail": "value nan is not a finite number",
    }


def test_estimated_energy_is_reported_per_line(march_db: str) -> None:
    """A quarter of Leeds' electricity estimated (as gaps make it): the line, the carrier and the
    coverage say so."""
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        conn.execute(
            "UPDATE site_rollups_15m SET kwh_estimated = kwh / 4"
            " WHERE site_id = 'uk' AND carrier = 'electricity'"
        )
        figs = month_figures(conn, "acme", "2024-03")
    [line] = [
        ln
        for ln in figs["lines"]
        if (ln["site_id"], ln["carrier"], ln["method"]) == ("uk", "electricity", "location")
    ]
    assert line["kwh_estimated"] == pytest.approx(250.0) and line["kwh"] == pytest.approx(1000.0)
    assert figs["energy_by_carrier"]["electricity"]["estimated"] == pytest.approx(250.0)
    assert (line["buckets"], line["buckets_without_factor"]) == (4, 0)
    cooling = next(ln for ln in figs["lines"] if ln["carrier"] == "cooling")
    assert (cooling["buckets"], cooling["buckets_without_factor"], cooling["factor_ids"]) == (4, 4, [])


def test_an_instrument_without_serials_claimed_in_the_month(march_db: str) -> None:
    """A PPA (no certificate serials) claiming 300 + 200 kWh of Leeds' March: 0.5 of its 2 MWh."""
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        conn.execute(
            "INSERT INTO contractual_instruments (instrument_id, site_id, kind, mwh, period_start,"
            " period_end, kg_co2e_per_kwh, hourly, reference) VALUES ('ppa-1', 'uk', 'ppa', 2.0,"
            " '2024-03-01', '2024-04-01', 0.05, true, 'PPA contract 7')"
        )
        conn.execute(
            "INSERT INTO instrument_claims (instrument_id, site_id, carrier, bucket, kwh) VALUES"
            " ('ppa-1', 'uk', 'electricity', '2024-03-05T10:00Z', 300), ('ppa-1', 'uk', 'electricity',"
            " '2024-03-05T10:15Z', 200)"
        )
        figs = month_figures(conn, "acme", "2024-03")
    assert figs["instruments"] == [
        {
            "instrument_id": "ppa-1",
            "site_id": "uk",
            "kind": "ppa",
            "carrier": "electricity",
            "mwh": 2.0,
            "claimed_mwh": 0.5,
            "period_start": "2024-03-01",
            "period_end": "2024-04-01",
            "kg_co2e_per_kwh": 0.05,
            "hourly": True,
            "reference": "PPA contract 7",
            "serials": None,
            "market_boundary": "",  # the ledger's defaults: not stated
            "evidence": "",
        }
    ]


def test_per_gas_totals_and_a_meter_without_a_unit(march_db: str) -> None:
    """The month's per-gas section; a meter stored without a unit counts as kWh in the accuracy list."""
    with psycopg.connect(march_db) as conn, conn.transaction(force_rollback=True):
        conn.execute("UPDATE meters SET activity_unit = NULL WHERE meter_id = 'sz-elec'")
        figs = month_figures(conn, "acme", "2024-03")
    assert figs["by_gas"]["co2_only_factor_ids"] == [
        "cn-mee-stat-2023-national-excl-mkt-nonfossil-v1",
        "cn-mee-stat-2023-national-v1",
    ]
    assert figs["meter_accuracy"][0] == {
        "site_id": "sz",
        "carrier": "electricity",
        "unit": "kWh",
        "worst_class_pct": 0.5,
        "meters_without_class": 0,
    }


def test_several_scope2_carriers_of_one_site_add_up() -> None:
    lines = [
        line("a", "electricity", 2, "location", 100, 50),
        line("a", "steam", 2, "location", 10, 5),
        line("a", "electricity", 2, "market", 100, 30, instr=0.5),  # half a kWh of instruments
        line("a", "steam", 2, "market", 10, 4),
        line("b", "electricity", 2, "location", 20, 8),
        line("b", "steam", 2, "location", 2, 1),
    ]
    s = _summarise(lines, [], {"a": 96, "b": 96}, set(), date(2026, 11, 1), date(2026, 11, 2))
    assert s["per_site"]["a"] == {"scope1": 0.0, "scope2_location": 55.0, "scope2_market": 34.0}
    assert s["per_site"]["b"] == {"scope1": 0.0, "scope2_location": 9.0, "scope2_market": 9.0}
    assert s["market_fallback_sites"] == ["b"]
    day = date(2026, 11, 1)
    rows = [("b", day, 2, "location", "electricity", 8.0), ("b", day, 2, "location", "steam", 1.0)]
    assert _daily(rows, {}, {"a"}, day, date(2026, 11, 2)) == [
        {"date": "2026-11-01", "scope1": 0.0, "scope2_location": 9.0, "scope2_market": 9.0}
    ]
