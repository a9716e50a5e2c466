"""Fixtures and builders for the compute/factors tests (kept out of the shared conftest on purpose).

Import the fixtures into a test module with ``from tests.test_compute_support import compute_dsn``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.db import drop_database, ensure_database, migrate
from ops.settings import DbSettings

# The same admin DSN as the shared conftest: the settings default unless the environment says otherwise.
ADMIN_DSN = os.environ.get("SCOPEMETER_DB__ADMIN_DSN", DbSettings().admin_dsn)
REPO = Path(__file__).resolve().parent.parent

Row = tuple[str, str, datetime, float, int, str, str, int]


def dsn_for(dbname: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + dbname


@pytest.fixture(scope="module")
def compute_dsn() -> Iterator[str]:
    """A freshly migrated database of its own for one test module; dropped afterwards."""
    name = f"scopemeter_test_compute_{uuid.uuid4().hex[:10]}"
    dsn = dsn_for(name)
    ensure_database(dsn, ADMIN_DSN)  # no PostgreSQL is a failure, never a skip
    try:
        migrate(dsn)
        yield dsn
    finally:
        drop_database(name, ADMIN_DSN)


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "TRUNCATE readings, meter_energy_15m, site_rollups_15m, site_market_1h, instrument_claims, "
        "contractual_instruments, activity_records, emission_factors, meters, gateways, sites, suppliers"
    )
    conn.commit()


def apply_registry(conn: psycopg.Connection[Any], folder: Path, fleet: str, factors: str | Path) -> None:
    """Apply a test's fleet registry (TOML text) and factor library (TOML text, or a file such as
    the repository's config/factors.toml) the way ``fleet apply`` and ``factors apply`` do."""
    from compute.factors import apply_factors
    from compute.fleet import apply_fleet

    (folder / "fleet.toml").write_text(fleet)
    if isinstance(factors, str):
        (folder / "factors.toml").write_text(factors)
        factors = folder / "factors.toml"
    apply_fleet(conn, folder / "fleet.toml")
    apply_factors(conn, factors)


def insert_rows(conn: psycopg.Connection[Any], rows: list[Row]) -> int:
    """What the writer does, minus the COPY: create partitions, insert, drop duplicates."""
    if not rows:
        return 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT scopemeter_ensure_partitions(%s, %s)", (min(r[2] for r in rows), max(r[2] for r in rows))
        )
        cur.executemany(
            "INSERT INTO readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            rows,
        )
    return len(rows)


def snapshot(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    energy = conn.execute(
        "SELECT meter_id, bucket, kwh, kwh_estimated, measured_ms, flags FROM meter_energy_15m ORDER BY 1, 2"
    ).fetchall()
    rollups = conn.execute(
        "SELECT site_id, bucket, carrier, scope, method, activity_unit, kwh, kwh_estimated, coverage,"
        " kg_co2e, kg_co2, kg_ch4, kg_n2o, factor_id, cv_basis, reference_conditions, fuel_type, refusal"
        " FROM site_rollups_15m ORDER BY 1, 2, 3, 4, 5, 6, 15, 16, 17"
    ).fetchall()
    conn.commit()
    return energy, rollups


def cn_grid_factor_toml(
    kg_per_kwh: float,
    factor_id: str = "cn-grid-v1",
    *,
    region: str = "CN",
    series: str = "national-power-average",
    source: str = "test grid factor",
) -> str:
    """One ``[[factors]]`` entry: a China grid factor (national unless ``region`` says a province)
    with every field the loader requires, valid 2022-2100, CO2 only. The tests' fixture factor,
    stated once."""
    return f"""
[[factors]]
id = "{factor_id}"
publisher = "China MEE / NBS"
series = "{series}"
region = "{region}"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
data_year = 2022
kg_co2_per_unit = {kg_per_kwh}
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 1
source = "{source}"
"""
