"""What a month's figures say about factors and gases, computed end to end from readings.

Expected values are the publishers' figures typed here (DESNZ 2024 flat file; MEE/NBS 2023) times
the metered activity, by hand — not the engine's output.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.activity import apply_activity
from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.recompute import Params, recompute
from compute.statements import completeness
from compute.statements.config import Allocation, Production, Reporting, StatementsConfig
from compute.statements.document import derive, keygen
from compute.statements.figures import month_figures
from compute.statements.issue import issue_month
from ingest.writer import dirty_ranges
from tests.test_compute_support import REPO, Row, compute_dsn, insert_rows, reset

__all__ = ["compute_dsn"]

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "uk"
supplier = "acme"
name = "Leeds"
grid_region = "GB"
timezone = "Europe/London"
factor_series = "ghg-conversion-factors"
fuel_series = "ghg-conversion-factors"

[[sites]]
id = "sz"
supplier = "acme"
name = "Shenzhen"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[meters]]
id = "gas-kwh"
accuracy_class = 1.0
site = "uk"
carrier = "natural_gas"
unit = "kWh"
cv_basis = "gross"
model = "gas_kwh"

[[meters]]
id = "gas-m3"
accuracy_class = 1.5
site = "uk"
carrier = "natural_gas"
unit = "m3"
reference_conditions = "15C-101.325kPa"
model = "gas_m3"

[[meters]]
id = "uk-elec"
accuracy_class = 1.0
site = "uk"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "chill"
site = "uk"
carrier = "cooling"
model = "heat_meter"

[[meters]]
id = "sz-elec"
accuracy_class = 0.5
site = "sz"
carrier = "electricity"
model = "eastron_sdm630"
"""

ACTIVITY = """
[[refrigerants]]
id = "chiller"
site = "uk"
period_start = 2024-03-01
period_end = 2024-04-01
gas = "R-410A"
kg = 2.0
gwp_set = "AR4"
provenance = "service report 17"

[[fuel_purchases]]
id = "diesel-inv"
site = "uk"
period_start = 2024-02-15
period_end = 2024-03-15
carrier = "diesel"
amount = 1000.0
provenance = "invoice 551"

[[generation]]
id = "pv-feb"
site = "uk"
period_start = 2024-02-01
period_end = 2024-03-01
source = "pv"
self_consumed_kwh = 900.0
exported_kwh = 100.0
provenance = "inverter log"
"""
T0 = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)
HOUR = {"gas-kwh": 200_000.0, "gas-m3": 1_000.0, "uk-elec": 1_000.0, "chill": 500.0, "sz-elec": 2_000.0}
QUANTITY = {"gas-m3": "gas_m3"}
SITE = {"sz-elec": "sz"}


def rows() -> list[Row]:
    return [
        (
            m,
            QUANTITY.get(m, "energy_import_kwh"),
            T0 + timedelta(minutes=k),
            total * k / 60,
            0,
            SITE.get(m, "uk"),
            "gw",
            0,
        )
        for m, total in HOUR.items()
        for k in range(61)
    ]


@pytest.fixture
def figures(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        (tmp_path / "fleet.toml").write_text(FLEET)
        apply_fleet(conn, tmp_path / "fleet.toml")
        apply_factors(conn, REPO / "config" / "factors.toml")
        data = rows()
        insert_rows(conn, data)
        for d in dirty_ranges(data):
            recompute(conn, d)
        (tmp_path / "activity.toml").write_text(ACTIVITY)
        apply_activity(conn, tmp_path / "activity.toml")
        with conn.transaction():
            return month_figures(conn, "acme", "2024-03")


def test_gas_in_two_units_is_reported_apart_and_fully_counted(figures: dict[str, Any]) -> None:
    energy = figures["energy_by_carrier"]
    assert energy["natural_gas (kWh)"]["amount"] == pytest.approx(200_000.0)
    assert energy["natural_gas (m3)"]["amount"] == pytest.approx(1_000.0)
    # DESNZ 2024: 0.18290 kg CO2e per kWh (Gross CV), 2.04542 per m3.
    assert figures["scope1_by_fuel"]["natural_gas"] == pytest.approx(200_000 * 0.18290 + 1_000 * 2.04542)


def test_per_gas_totals_and_gwp_set(figures: dict[str, Any]) -> None:
    by_gas = figures["by_gas"]
    # DESNZ 2024 per-gas parts (kg CO2e): kWh gross CO2 0.18253, CH4 0.00028, N2O 0.00009;
    # m3 CO2 2.0414, CH4 0.00307, N2O 0.00095; AR5 (CH4 28, N2O 265) turns them into kg of gas.
    assert by_gas["scope1"]["co2"] == pytest.approx(200_000 * 0.18253 + 1_000 * 2.0414)
    assert by_gas["scope1"]["ch4"] == pytest.approx((200_000 * 0.00028 + 1_000 * 0.00307) / 28)
    assert by_gas["scope1"]["n2o"] == pytest.approx((200_000 * 0.00009 + 1_000 * 0.00095) / 265)
    # Scope 2: UK electricity 2024 CO2 0.20493 kg/kWh; China 2023 national 0.5306 kgCO2/kWh, CO2 only.
    assert by_gas["scope2_location"]["co2"] == pytest.approx(1_000 * 0.20493 + 2_000 * 0.5306)
    assert by_gas["gwp_sets"] == ["AR5"]
    # China's grid factors are CO2 only: location-based 2023 national, and for market-based the
    # 2023 average excluding market-traded non-fossil power (no residual mix is published).
    assert by_gas["co2_only_factor_ids"] == [
        "cn-mee-stat-2023-national-excl-mkt-nonfossil-v1",
        "cn-mee-stat-2023-national-v1",
    ]


def test_market_based_rest_uses_the_excl_nonfossil_factor(figures: dict[str, Any]) -> None:
    """Shenzhen has no instruments and China publishes no residual mix: market-based Scope 2 uses
    MEE/NBS 2023's national average excluding market-traded non-fossil power, 0.6096 kgCO2/kWh
    (issue 14's list of the 2023 values), and says so per site."""
    assert figures["market_residual_basis"]["sz"] == {"excl-market-nonfossil": pytest.approx(2_000.0)}
    assert figures["per_site"]["sz"]["scope2_market"] == pytest.approx(2_000 * 0.6096)
    assert figures["per_site"]["sz"]["scope2_location"] == pytest.approx(2_000 * 0.5306)


def test_factors_state_year_gases_and_basis(figures: dict[str, Any]) -> None:
    by_id = {f["factor_id"]: f for f in figures["factors"]}
    gas = by_id["gb-desnz-2024-natural-gas-kwh-gross-v1"]
    assert (gas["data_year"], gas["gases"], gas["gwp_set"], gas["cv_basis"]) == (2024, "CO2e", "AR5", "gross")
    m3 = by_id["gb-desnz-2024-natural-gas-m3-v1"]
    assert m3["reference_conditions"] == "15C-101.325kPa" and m3["ncv_unit"] == "kWh (net CV) per m3"
    cn = by_id["cn-mee-stat-2023-national-v1"]
    assert (cn["data_year"], cn["gases"], cn["gwp_set"], cn["region"]) == (2023, "CO2", "none", "CN")


def test_cooling_without_a_factor_is_listed_as_refused(figures: dict[str, Any]) -> None:
    [refusal] = figures["refusals"]
    assert (refusal["site_id"], refusal["carrier"], refusal["scope"], refusal["buckets"]) == (
        "uk",
        "cooling",
        2,
        4,
    )
    assert refusal["activity"] == pytest.approx(500.0)
    assert "no emission factor for cooling" in refusal["reason"]


def test_a_refused_carrier_blocks_final(figures: dict[str, Any], compute_dsn: str, tmp_path: Path) -> None:
    """Issue 14 item 2: cooling without a factor source is "an explicit refusal that blocks Final
    statements". With the coverage threshold off, the refusal (view ``site_refusals``) is the only
    reason the month is not Final, and ``issue`` refuses it; ``--provisional`` carries the reason."""
    cfg = CFG.model_copy(
        update={
            "min_meter_coverage": 0.0,
            "signing_key": tmp_path / "sign.pem",
            "outbox_dir": tmp_path / "outbox",
        }
    )
    keygen(cfg.key_path)
    now = datetime(2024, 4, 10, tzinfo=UTC)
    with psycopg.connect(compute_dsn, autocommit=True) as conn:
        state = completeness.check(conn, "acme", "2024-03", now=now, min_meter_coverage=0.0)
        assert state.active and not state.final
        [reason] = state.reasons
        assert reason.startswith("site uk: cooling refused (no emission factor for cooling per kWh")
        assert reason.endswith(": 4 15-minute intervals, 500.000 kWh in total")
        [refused] = issue_month(conn, cfg, "2024-03", ["acme"], now=now, params=Params(), progress=False)
        assert (refused.status, refused.reasons) == ("refused", (reason,))
        [issued] = issue_month(
            conn, cfg, "2024-03", ["acme"], now=now, params=Params(), progress=False, provisional=True
        )
    assert issued.directory is not None
    doc = json.loads((issued.directory / "statement.json").read_text())
    assert doc["provisional"] is True and doc["incomplete_reasons"] == [reason]
    assert [r["carrier"] for r in doc["figures"]["refusals"]] == ["cooling"]


def test_non_metered_activity_is_listed_prorated_and_counted(figures: dict[str, Any]) -> None:
    nm = {r["record_id"]: r for r in figures["not_metered"]}
    assert set(nm) == {"chiller", "diesel-inv"}  # February's PV is outside March
    assert all(r["metered"] is False for r in nm.values())
    # R-410A 2 kg, AR4: 2 x 2,087.5 = 4,175 kg CO2e, all in March.
    assert nm["chiller"]["kg_co2e"] == pytest.approx(4175.0)
    # 1,000 l over 15 Feb-15 Mar 2024 (29 days), 14 of them in March; DESNZ 2024 diesel 2.66155/l.
    assert nm["diesel-inv"]["share_in_month"] == pytest.approx(14 / 29)
    assert nm["diesel-inv"]["kg_co2e"] == pytest.approx(1000 * 2.66155 * 14 / 29)
    assert nm["diesel-inv"]["provenance"] == "invoice 551"
    extra = 4175.0 + 1000 * 2.66155 * 14 / 29
    assert figures["not_metered_kg"] == pytest.approx(extra)
    metered = 200_000 * 0.18290 + 1_000 * 2.04542
    assert figures["totals"]["scope1"] == pytest.approx(metered + extra)
    assert "gb-desnz-2024-diesel-l-v1" in {f["factor_id"] for f in figures["factors"]}


CFG = StatementsConfig(
    allocations=[Allocation(supplier="acme", customer="lenovo", customer_name="Lenovo Group", share=0.25)],
    production=[Production(supplier="acme", month="2024-03", quantity=1000.0, unit="PCBA")],
    reporting=[
        Reporting(
            supplier="acme",
            consolidation_approach="operational_control",
            base_year=2023,
            verification="limited",
            verifier="Verifier Ltd",
            verification_standard="ISO 14064-3:2019",
            allocation_level="product",
            estimated_uncertainty_pct=10.0,
        )
    ],
)


def test_disclosure_cdp_and_pact(figures: dict[str, Any]) -> None:
    d = derive(figures, None, CFG)
    disc = d["disclosure"]
    assert (disc["consolidation_approach"], disc["base_year"]) == ("operational_control", 2023)
    assert disc["verification"] == {
        "status": "limited",
        "verifier": "Verifier Ltd",
        "standard": "ISO 14064-3:2019",
    }
    cat1 = disc["iso14064_categories"]["category_1_direct"]
    assert cat1["kg_co2e"] == pytest.approx(figures["totals"]["scope1"])
    assert disc["gwp_sets"] == ["AR5"]
    # Uncertainty by hand: every line measured (no gaps), so each takes its meters' class:
    # gas kWh 36,580 kg x 1 %, gas m3 2,045.42 x 1.5 %, UK electricity 207.05 x 1 %, China
    # electricity 1,061.2 x 0.5 %; non-metered at 10 %: R-410A 4,175 and diesel 1,000 x 2.66155 x 14/29.
    diesel = 1000 * 2.66155 * 14 / 29
    parts = [(36_580.0, 1.0), (2_045.42, 1.5), (207.05, 1.0), (1_061.2, 0.5), (4_175.0, 10.0), (diesel, 10.0)]
    total = sum(kg for kg, _ in parts)
    expected = sum((kg * pct / 100) ** 2 for kg, pct in parts) ** 0.5 / total * 100
    assert disc["uncertainty_pct"] == pytest.approx(expected, rel=1e-6)
    [row] = d["cdp_sc1_1"]
    assert row["requesting_member"] == "Lenovo Group" and row["allocation_level"] == "product"
    assert row["quantity_supplied"] == pytest.approx(250.0) and row["unit_for_quantity_supplied"] == "PCBA"
    assert row["emissions_t_co2e_location"] == pytest.approx(
        figures["totals"]["total_location"] * 0.25 / 1000
    )
    assert row["verified"] is True and row["major_sources"][0] == "natural_gas"
    assert row["uncertainty_pct"] == disc["uncertainty_pct"]
    p = d["pact"]
    assert p["geography"]["geographyCountry"] == ["CN", "GB"]
    assert p["primaryDataShare"] == pytest.approx(100.0)
    assert p["referencePeriodStart"].startswith("2024-02-29T16:00")  # Shenzhen's March starts first


def test_uncertainty_not_assessed_without_accuracy_classes(figures: dict[str, Any]) -> None:
    stripped = {**figures, "meter_accuracy": []}
    assert derive(stripped, None, CFG)["disclosure"]["uncertainty_pct"] is None
