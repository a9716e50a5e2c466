"""Non-metered activity: refrigerant top-ups, fuel invoices and on-site generation, from TOML or CSV.

Expected kg are typed from the publishers (IPCC GWPs; DESNZ 2023 flat file) and worked by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.activity import apply_activity, gwp, load_activity
from compute.config import ConfigError
from tests.test_compute_support import REPO, apply_registry, compute_dsn, reset

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
"""

ACTIVITY = """
[[refrigerants]]
id = "chiller-2023-03"
site = "uk"
period_start = 2023-03-01
period_end = 2023-04-01
gas = "R-410A"
kg = 2.0
gwp_set = "AR4"
provenance = "F-gas service report 2023-117 (CoolCo)"

[[refrigerants]]
id = "vending-2023-03"
site = "uk"
period_start = 2023-03-01
period_end = 2023-04-01
gas = "HFC-134a"
kg = 1.5
gwp_set = "AR6"
provenance = "service report 2023-118"

[[fuel_purchases]]
id = "diesel-inv-551"
site = "uk"
period_start = 2023-02-01
period_end = 2023-03-01
carrier = "diesel"
amount = 1000.0
provenance = "invoice 551 (FuelCo), 1,000 litres delivered"

[[fuel_purchases]]
id = "gas-inv-spanning"
site = "uk"
period_start = 2022-12-15
period_end = 2023-01-15
carrier = "natural_gas"
unit = "kWh"
cv_basis = "gross"
amount = 50000.0
provenance = "gas bill Dec/Jan"

[[generation]]
id = "pv-2023-03"
site = "uk"
period_start = 2023-03-01
period_end = 2023-04-01
source = "pv"
self_consumed_kwh = 1200.0
exported_kwh = 300.0
provenance = "inverter export, SolarEdge monitoring"
"""


def test_blend_gwps_from_composition() -> None:
    # IIR/RTOC AR6 blend GWPs: R-410A 2,256, R-404A 4,728, R-407C 1,908 (rounded to whole numbers).
    assert round(gwp("R-410A", "AR6")) == 2256
    assert round(gwp("R-404A", "AR6")) == 4728
    assert round(gwp("R-407C", "AR6")) == 1908
    # AR4 (US EPA 40 CFR 98 Table A-1): HFC-32 675, HFC-125 3,500 → R-410A 2,087.5.
    assert gwp("R-410A", "AR4") == pytest.approx(2087.5)


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, REPO / "config" / "factors.toml")
        yield c


def records(conn: psycopg.Connection[Any]) -> dict[str, tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT record_id, kind, scope, kg_co2e, kg_hfc, factor_id, refusal, metered, provenance,"
        " exported_kwh FROM activity_records ORDER BY 1"
    ).fetchall()
    conn.commit()
    return {r[0]: r[1:] for r in rows}


def test_apply_computes_each_kind(conn: Any, tmp_path: Path) -> None:
    path = tmp_path / "activity.toml"
    path.write_text(ACTIVITY)
    result = apply_activity(conn, path)
    assert result.written == 5
    assert [r.split(":")[0] for r in result.refused] == ["gas-inv-spanning"]
    got = records(conn)
    # R-410A, 2 kg, AR4: 2 x (0.5 x 675 + 0.5 x 3,500) = 4,175 kg CO2e.
    assert got["chiller-2023-03"][:4] == ("refrigerant", 1, pytest.approx(4175.0), 2.0)
    # HFC-134a, 1.5 kg, AR6: 1.5 x 1,530 = 2,295 kg CO2e.
    assert got["vending-2023-03"][2] == pytest.approx(2295.0)
    # DESNZ 2023 Diesel (100% mineral diesel), litres: 2.65937 kg CO2e/l → 2,659.37 kg.
    assert got["diesel-inv-551"][2] == pytest.approx(2659.37)
    assert got["diesel-inv-551"][4] == "gb-desnz-2023-diesel-l-v1"
    # An invoice across the 2022/2023 vintages is refused, not split silently.
    assert got["gas-inv-spanning"][2] is None and "split the invoice" in got["gas-inv-spanning"][5]
    assert got["pv-2023-03"][:3] == ("generation", None, None) and got["pv-2023-03"][8] == 300.0
    assert all(r[6] is False for r in got.values())
    assert got["diesel-inv-551"][7].startswith("invoice 551")


def test_csv_gives_the_same_records(conn: Any, tmp_path: Path) -> None:
    csv = tmp_path / "activity.csv"
    csv.write_text(
        "section,id,site,period_start,period_end,gas,kg,gwp_set,carrier,amount,provenance\n"
        "refrigerants,chiller-2023-03,uk,2023-03-01,2023-04-01,R-410A,2.0,AR4,,,F-gas report 2023-117\n"
        "fuel_purchases,diesel-inv-551,uk,2023-02-01,2023-03-01,,,,diesel,1000,invoice 551 (FuelCo)\n"
    )
    apply_activity(conn, csv)
    got = records(conn)
    assert got["chiller-2023-03"][2] == pytest.approx(4175.0)
    assert got["diesel-inv-551"][2] == pytest.approx(2659.37)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("section,id,site\nrefrigerant,x,uk\n", "line 2: section must be one of"),
        (
            "section,id,site,period_start,period_end,gas,kg,gwp_set,provenance\n"
            "refrigerants,x,uk,2023-03-01,2023-04-01,R-22,1,AR5,report\n",
            "line 2 \\(refrigerants, id='x'\\): gas",
        ),
        (
            "section,id,site,period_start,period_end,carrier,amount,provenance\n"
            "fuel_purchases,c,uk,2023-03-01,2023-04-01,coal,5,weighbridge ticket\n",
            "coal needs fuel_type",
        ),
        (
            "section,id,site,period_start,period_end,carrier,amount,provenance\n"
            "fuel_purchases,e,uk,2023-03-01,2023-04-01,electricity,5,bill\n",
            "not a fuel",
        ),
        (
            "section,id,site,period_start,period_end,gas,kg,gwp_set\n"
            "refrigerants,x,uk,2023-03-01,2023-04-01,HFC-32,1,AR5\n",
            "provenance: Field required",
        ),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "activity.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_activity(path)
    assert str(path) in str(err.value)


def test_unknown_site_refused(conn: Any, tmp_path: Path) -> None:
    path = tmp_path / "activity.toml"
    path.write_text(ACTIVITY.replace('site = "uk"', 'site = "nowhere"', 1))
    with pytest.raises(ConfigError, match="unknown site 'nowhere'"):
        apply_activity(conn, path)
