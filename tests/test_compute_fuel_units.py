"""Scope 1 from meters in the units they report, with the factor series chosen per site.

A UK site uses DESNZ: gas metered in kWh (gross or net CV, stated per meter) or in m3 (at stated
reference conditions), coal by type, heat from DESNZ's district heat factor; cooling has no factor
source and is refused explicitly (``site_refusals``). Every expected value below is the publisher's
figure typed from its file (DESNZ/BEIS flat files, sheet 'Factors by Category') times the activity,
computed by hand — never read back from the library or the engine.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.config import ConfigError
from compute.fleet import load_fleet
from compute.rebuild import recompute_all
from compute.recompute import recompute
from ingest.writer import dirty_ranges
from tests.test_compute_support import REPO, Row, apply_registry, compute_dsn, insert_rows, reset, snapshot

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
id = "uk-ipcc"
supplier = "acme"
name = "Leeds, fuel series left at the IPCC default"
grid_region = "GB"
timezone = "Europe/London"
factor_series = "ghg-conversion-factors"

[[meters]]
id = "gas-gross"
site = "uk"
carrier = "natural_gas"
unit = "kWh"
cv_basis = "gross"
model = "gas_kwh"

[[meters]]
id = "gas-net"
site = "uk"
carrier = "natural_gas"
unit = "kWh"
cv_basis = "net"
model = "gas_kwh"

[[meters]]
id = "gas-m3"
site = "uk"
carrier = "natural_gas"
unit = "m3"
reference_conditions = "15C-101.325kPa"
model = "gas_m3"

[[meters]]
id = "coal"
site = "uk"
carrier = "coal"
fuel_type = "industrial"
model = "weighbridge"

[[meters]]
id = "heat"
site = "uk"
carrier = "heat"
model = "heat_meter"

[[meters]]
id = "chill"
site = "uk"
carrier = "cooling"
model = "heat_meter"

[[meters]]
id = "gas-m3-ipcc"
site = "uk-ipcc"
carrier = "natural_gas"
unit = "m3"
reference_conditions = "15C-101.325kPa"
model = "gas_m3"
"""

# 2022-03-01 and 2024-03-05, 10:00 local (UTC in winter): one hour of readings, every minute.
T2022 = datetime(2022, 3, 1, 10, 0, tzinfo=UTC)
T2024 = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)


def readings(meter: str, site: str, quantity: str, t0: datetime, total: float) -> list[Row]:
    """A counter advancing evenly by ``total`` over one hour."""
    return [
        (meter, quantity, t0 + timedelta(minutes=k), 1000.0 + total * k / 60, 0, site, "gw", 0)
        for k in range(61)
    ]


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, REPO / "config" / "factors.toml")
        yield c


def run(conn: psycopg.Connection[Any], rows: list[Row]) -> None:
    insert_rows(conn, rows)
    for d in dirty_ranges(rows):
        recompute(conn, d)


def totals(conn: psycopg.Connection[Any], site: str, carrier: str) -> tuple[Any, ...]:
    got = conn.execute(
        "SELECT activity_unit, cv_basis, sum(kwh), sum(kg_co2e), sum(kg_co2), sum(kg_ch4), sum(kg_n2o),"
        " array_agg(DISTINCT factor_id), array_agg(DISTINCT refusal)"
        " FROM site_rollups_15m WHERE site_id = %s AND carrier = %s GROUP BY 1, 2 ORDER BY 2",
        (site, carrier),
    ).fetchall()
    conn.commit()
    return tuple(got)


def test_gas_meter_in_kwh_gross_is_computed_not_skipped(conn: Any) -> None:
    """200,000 kWh (gross CV) of gas in 2024 at a UK site: DESNZ 2024 natural gas, kWh (Gross CV),
    0.18290 kg CO2e/kWh = CO2 0.18253 + CH4 0.00028 + N2O 0.00009 kg CO2e (AR5: CH4 28, N2O 265).
    Before issue 14 this meter was skipped without a word and gave 0 kg."""
    run(conn, readings("gas-gross", "uk", "energy_import_kwh", T2024, 200_000.0))
    [(unit, basis, kwh, kg, co2, ch4, n2o, fids, refusals)] = totals(conn, "uk", "natural_gas")
    assert (unit, basis, fids, refusals) == (
        "kWh",
        "gross",
        ["gb-desnz-2024-natural-gas-kwh-gross-v1"],
        [None],
    )
    assert kwh == pytest.approx(200_000.0)
    assert kg == pytest.approx(36_580.0)  # 200,000 x 0.18290
    assert co2 == pytest.approx(36_506.0)  # 200,000 x 0.18253
    assert ch4 == pytest.approx(2.0)  # 200,000 x 0.00028 / 28 kg of CH4
    assert n2o == pytest.approx(200_000 * 0.00009 / 265)


def test_gas_meters_in_kwh_net_and_m3_use_their_own_basis(conn: Any) -> None:
    """DESNZ 2022 (AR4): kWh (Net CV) 0.20227 and cubic metres 2.01574 kg CO2e per unit."""
    run(conn, readings("gas-net", "uk", "energy_import_kwh", T2022, 100_000.0))
    run(conn, readings("gas-m3", "uk", "gas_m3", T2022, 1_000.0))
    by_unit = {r[0]: r for r in totals(conn, "uk", "natural_gas")}
    assert by_unit["kWh"][3] == pytest.approx(20_227.0)  # 100,000 x 0.20227
    assert by_unit["kWh"][7] == ["gb-desnz-2022-natural-gas-kwh-net-v1"]
    # 1,000 m3 at a UK site: 2,015.74 kg (DESNZ 2022), not the 2,186 kg of an IPCC x China-NCV factor.
    assert by_unit["m3"][3] == pytest.approx(2_015.74)
    assert by_unit["m3"][6] == pytest.approx(1_000 * 0.00107 / 298)  # N2O, kg of gas (AR4)
    assert by_unit["m3"][7] == ["gb-desnz-2022-natural-gas-m3-v1"]


def test_coal_by_type_and_heat_have_factors_cooling_is_refused(conn: Any) -> None:
    """DESNZ 2024: Coal (industrial) 2,399.43994 kg CO2e/tonne; district heat and steam 0.17965 kg
    CO2e/kWh. Cooling has no published factor in the site's series: no number, a refusal."""
    run(conn, readings("coal", "uk", "fuel_kg", T2024, 500.0))
    run(conn, readings("heat", "uk", "energy_import_kwh", T2024, 1_000.0))
    run(conn, readings("chill", "uk", "energy_import_kwh", T2024, 1_000.0))
    [coal] = totals(conn, "uk", "coal")
    assert coal[3] == pytest.approx(500 * 2.39943994)
    [heat] = totals(conn, "uk", "heat")
    assert heat[3] == pytest.approx(179.65)
    [cool] = totals(conn, "uk", "cooling")
    assert cool[2] == pytest.approx(1_000.0) and cool[3] is None and cool[7] == [None]
    [refusal] = cool[8]
    assert "no emission factor for cooling per kWh" in refusal and "'ghg-conversion-factors'" in refusal
    view = conn.execute(
        "SELECT site_id, carrier, scope, buckets, activity FROM site_refusals ORDER BY site_id, carrier"
    ).fetchall()
    assert view == [("uk", "cooling", 2, 4, pytest.approx(1_000.0))]


def test_uk_site_without_desnz_fuel_series_is_refused_not_given_a_china_ncv(conn: Any) -> None:
    run(conn, readings("gas-m3-ipcc", "uk-ipcc", "gas_m3", T2024, 1_000.0))
    [(unit, _, _kwh, kg, *_rest, fids, refusals)] = totals(conn, "uk-ipcc", "natural_gas")
    assert (unit, kg, fids) == ("m3", None, [None])
    assert "natural_gas per m3 at 15C-101.325kPa in series 'ipcc-2006-default'" in refusals[0]


def test_uk_activity_in_2025_and_2026_uses_that_years_desnz_set(conn: Any) -> None:
    """Until issue 14 item 3, UK activity from 2025 was refused (no DESNZ 2025 set). DESNZ 2025 flat
    file, natural gas kWh (Gross CV): 0.18296 kg CO2e = CO2 0.18259 + CH4 0.00028 + N2O 0.00009 kg
    CO2e; DESNZ 2026 (v1.2) kWh (Net CV): 0.20199 kg CO2e = CO2 0.20158 + CH4 0.00031 + N2O 0.0001."""
    run(
        conn, readings("gas-gross", "uk", "energy_import_kwh", datetime(2025, 2, 3, 10, tzinfo=UTC), 10_000.0)
    )
    run(conn, readings("gas-net", "uk", "energy_import_kwh", datetime(2026, 2, 3, 10, tzinfo=UTC), 10_000.0))
    got = {r[1]: r for r in totals(conn, "uk", "natural_gas")}
    _, _, kwh, kg, co2, ch4, n2o, fids, refusals = got["gross"]
    assert (kwh, fids, refusals) == (
        pytest.approx(10_000.0),
        ["gb-desnz-2025-natural-gas-kwh-gross-v1"],
        [None],
    )
    assert (kg, co2, ch4, n2o) == pytest.approx(
        (1_829.6, 1_825.9, 10_000 * 0.00028 / 28, 10_000 * 0.00009 / 265)
    )
    _, _, kwh, kg, co2, *_, fids, refusals = got["net"]
    assert (kwh, fids, refusals) == (
        pytest.approx(10_000.0),
        ["gb-desnz-2026-natural-gas-kwh-net-v1"],
        [None],
    )
    assert (kg, co2) == pytest.approx((2_019.9, 2_015.8))


def test_activity_after_the_newest_vintage_is_refused(conn: Any) -> None:
    """The newest DESNZ set (2026) is valid to 2027-01-01: 2027 gas gets no 2026 factor by default."""
    run(conn, readings("gas-gross", "uk", "energy_import_kwh", datetime(2027, 2, 3, 10, tzinfo=UTC), 10.0))
    [(*_, kg, _co2, _ch4, _n2o, fids, refusals)] = totals(conn, "uk", "natural_gas")
    assert (kg, fids) == (None, [None]) and refusals[0]


def test_rebuild_equals_incremental(conn: Any) -> None:
    run(conn, readings("gas-gross", "uk", "energy_import_kwh", T2024, 200_000.0))
    run(conn, readings("gas-m3", "uk", "gas_m3", T2024, 1_000.0))
    run(conn, readings("chill", "uk", "energy_import_kwh", T2024, 10.0))
    incremental = snapshot(conn)
    recompute_all(conn)
    assert snapshot(conn) == incremental


@pytest.mark.parametrize(
    ("meter", "message"),
    [
        ('carrier = "natural_gas"\nunit = "kWh"', "needs cv_basis"),
        ('carrier = "natural_gas"', "needs reference_conditions"),
        ('carrier = "natural_gas"\nunit = "l"\nreference_conditions = "0C-101.325kPa"', "counts in"),
        ('carrier = "coal"', "needs fuel_type"),
        ('carrier = "electricity"\ncv_basis = "gross"', "takes no cv_basis"),
        ('carrier = "diesel"\nreference_conditions = "0C-101.325kPa"', "apply to gas in m3 only"),
    ],
)
def test_meter_must_state_its_unit_basis(tmp_path: Path, meter: str, message: str) -> None:
    head = FLEET.split("[[meters]]")[0]
    (tmp_path / "fleet.toml").write_text(head + f'[[meters]]\nid = "m"\nsite = "uk"\nmodel = "x"\n{meter}\n')
    with pytest.raises(ConfigError, match=message) as err:
        load_fleet(tmp_path / "fleet.toml")
    assert "'m'" in str(err.value)


def test_site_region_must_be_iso(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET.replace('grid_region = "GB"', 'grid_region = "UK"', 1))
    with pytest.raises(ConfigError, match="'GB'"):
        load_fleet(tmp_path / "fleet.toml")
