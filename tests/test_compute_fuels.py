"""Scope 1 for metered diesel (litres), LPG and coal (kg) with the repository's factor library.

Expected kg are computed here from the per-gas values in ``config/factors.toml`` and the AR5 GWPs
(IPCC AR5 WG1 Table 8.7: CH4 28, N2O 265), never from the compute engine's output.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.rebuild import recompute_all
from compute.recompute import recompute
from ingest.events import DirtyRange
from ingest.writer import dirty_ranges
from tests.test_compute_support import REPO, Row, apply_registry, compute_dsn, insert_rows, reset, snapshot

__all__ = ["compute_dsn"]

AR5 = {"ch4": 28.0, "n2o": 265.0}

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "s1"
supplier = "acme"
name = "Shenzhen"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[meters]]
id = "genset"
site = "s1"
carrier = "diesel"
model = "fuel_flow"

[[meters]]
id = "boiler"
site = "s1"
carrier = "coal"
fuel_type = "other_bituminous"
model = "weighbridge"

[[meters]]
id = "canteen"
site = "s1"
carrier = "lpg"
model = "cylinder_scale"
"""

T0 = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)
# Constant consumption per minute, read every minute for one hour (4 quarter hours).
RATE = {"genset": ("fuel_l", 2.5), "boiler": ("fuel_kg", 40.0), "canteen": ("fuel_kg", 0.3)}
MINUTES = 60


def library_factor(factor_id: str) -> dict[str, Any]:
    with (REPO / "config" / "factors.toml").open("rb") as f:
        [entry] = [x for x in tomllib.load(f)["factors"] if x["id"] == factor_id]
    return dict(entry)


def kg_co2e(amount: float, factor: dict[str, Any]) -> float:
    assert factor["gwp_set"] == "AR5"
    return amount * float(
        factor["kg_co2_per_unit"]
        + factor["kg_ch4_per_unit"] * AR5["ch4"]
        + factor["kg_n2o_per_unit"] * AR5["n2o"]
    )


def rows() -> list[Row]:
    return [
        (meter, quantity, T0 + timedelta(minutes=k), 1000.0 + rate * k, 0, "s1", "gw", 0)
        for meter, (quantity, rate) in RATE.items()
        for k in range(MINUTES + 1)
    ]


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, REPO / "config" / "factors.toml")
        yield c


def rollups(conn: psycopg.Connection[Any], carrier: str) -> list[tuple[Any, ...]]:
    got = conn.execute(
        "SELECT scope, method, activity_unit, kwh, kg_co2e, kg_co2, kg_ch4, kg_n2o, factor_id, coverage"
        " FROM site_rollups_15m WHERE site_id = 's1' AND carrier = %s ORDER BY bucket",
        (carrier,),
    ).fetchall()
    conn.commit()
    return got


@pytest.mark.parametrize(
    ("meter", "carrier", "unit", "factor_id"),
    [
        ("genset", "diesel", "l", "ipcc-2006-diesel-l-v2"),
        ("boiler", "coal", "kg", "ipcc-2006-coal-kg-v2"),
        ("canteen", "lpg", "kg", "ipcc-2006-lpg-kg-v2"),
    ],
)
def test_fuel_scope1_per_gas_from_the_library(
    conn: Any, meter: str, carrier: str, unit: str, factor_id: str
) -> None:
    data = rows()
    insert_rows(conn, data)
    for d in dirty_ranges(data):  # what the writer publishes: fuel counters are dirty ranges too
        recompute(conn, d)
    factor = library_factor(factor_id)
    per_bucket = RATE[meter][1] * 15
    got = rollups(conn, carrier)
    assert len(got) == MINUTES // 15
    for scope, method, activity_unit, amount, kg, co2, ch4, n2o, fid, coverage in got:
        assert (scope, method, activity_unit, fid) == (1, "direct", unit, factor_id)
        assert amount == pytest.approx(per_bucket, rel=1e-12)
        assert kg == pytest.approx(kg_co2e(per_bucket, factor), rel=1e-12)
        assert co2 == pytest.approx(per_bucket * factor["kg_co2_per_unit"], rel=1e-12)
        assert ch4 == pytest.approx(per_bucket * factor["kg_ch4_per_unit"], rel=1e-12)
        assert n2o == pytest.approx(per_bucket * factor["kg_n2o_per_unit"], rel=1e-12)
        assert coverage == pytest.approx(1.0)
    total = sum(r[4] for r in got)
    assert total == pytest.approx(kg_co2e(RATE[meter][1] * MINUTES, factor), rel=1e-12)


def test_rebuild_equals_incremental_and_wrong_quantity_is_skipped(conn: Any) -> None:
    data = rows()
    insert_rows(conn, data)
    for d in dirty_ranges(data):
        recompute(conn, d)
    incremental = snapshot(conn)
    recompute_all(conn)
    assert snapshot(conn) == incremental
    assert {r[2] for r in incremental[1]} == {"diesel", "coal", "lpg"}
    # A diesel meter is computed from litres only: a mass counter on it is not Scope 1 activity.
    wrong = DirtyRange(site_id="s1", meter_id="genset", quantity="fuel_kg", t_min=T0, t_max=T0, rows=1)
    assert recompute(conn, wrong).skipped
