"""Quarantine against a real PostgreSQL: implausible jumps (per-meter max_kw) and NaN/Infinity readings
are kept in ``readings``, listed with their reason, left out of every rollup and statement figure,
and listed in the statement's data-quality section.

Expected energy is derived here from the constant power each meter draws (kW × hours), minus the
intervals that touch a quarantined reading — never copied from the code's output. NaN and Infinity
are written straight into ``readings``: the bridge refuses them (``edge.wire``), so only a direct
database writer (an import, a restore, a bug) can produce them, and compute must still hold.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.config import ConfigError
from compute.factors import apply_factors
from compute.fleet import apply_fleet, load_fleet
from compute.quarantine import JUMP, NON_FINITE, quarantined, reasons
from compute.rebuild import recompute_all
from compute.recompute import Params, recompute
from compute.statements.config import load_statements_config
from compute.statements.document import keygen
from compute.statements.issue import issue_month
from ingest.events import DirtyRange
from tests.test_compute_support import Row, cn_grid_factor_toml, compute_dsn, insert_rows, snapshot

__all__ = ["compute_dsn"]

FACTOR = 0.5  # kg CO2e/kWh
MONTH = "2026-11"
START = datetime(2026, 11, 1, tzinfo=UTC)
STEP = timedelta(minutes=15)
N = 96  # one day of quarter hours: readings 0..96
POWER = {"m1": 100.0, "m2": 50.0}
SPIKE = 40  # m1's reading 40 jumps by a million kWh, the next is back on track
NON_FINITE_AT = {10: math.nan, 20: math.inf}  # m2

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "s1"
supplier = "acme"
name = "Plant"
grid_region = "CN"

[[meters]]
id = "m1"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"
max_kw = {max_kw}

[[meters]]
id = "m2"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"
"""

FACTORS = cn_grid_factor_toml(FACTOR)


def rows() -> list[Row]:
    out: list[Row] = []
    for meter, kw in POWER.items():
        for i in range(N + 1):
            value = 1000.0 + kw * 0.25 * i
            if meter == "m1" and i == SPIKE:
                value += 1e6
            if meter == "m2":
                value = NON_FINITE_AT.get(i, value)
            out.append((meter, "energy_import_kwh", START + i * STEP, value, 0, "s1", "gw", 1))
    return out


def expected_kwh(meter: str) -> float:
    """kW × 24 h, minus the two quarter hours either side of each quarantined reading."""
    held = 1 if meter == "m1" else len(NON_FINITE_AT)
    return POWER[meter] * 24 - 2 * held * POWER[meter] * 0.25


def dirty(meter: str, t0: datetime, t1: datetime) -> DirtyRange:
    return DirtyRange(site_id="s1", meter_id=meter, quantity="energy_import_kwh", t_min=t0, t_max=t1, rows=1)


def _setup(conn: psycopg.Connection[Any], tmp: Path, max_kw: float = 150.0) -> None:
    (tmp / "fleet.toml").write_text(FLEET.format(max_kw=max_kw))
    (tmp / "factors.toml").write_text(FACTORS)
    apply_fleet(conn, tmp / "fleet.toml")
    apply_factors(conn, tmp / "factors.toml")


def _held(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT meter_id, ts, value::text, reason FROM quarantined_readings ORDER BY 1, 2"
    ).fetchall()


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn, autocommit=True) as c:
        c.execute(
            "TRUNCATE readings, meter_energy_15m, site_rollups_15m, site_market_1h, quarantined_readings,"
            " activity_records, contractual_instruments, emission_factors, meters, gateways, sites, suppliers"
            " CASCADE"
        )
        _setup(c, tmp_path)
        insert_rows(c, rows())
        yield c


def test_implausible_readings_are_kept_flagged_and_left_out_of_rollups(conn: psycopg.Connection[Any]) -> None:
    # Incrementally, meter by meter, as the compute worker does.
    for meter in POWER:
        recompute(conn, dirty(meter, START, START + N * STEP), Params())
    incremental = snapshot(conn), _held(conn)

    assert _held(conn) == [
        ("m1", START + SPIKE * STEP, "1002000", JUMP),  # 1000 + 100 kW × 10 h + 1e6
        ("m2", START + 10 * STEP, "NaN", NON_FINITE),
        ("m2", START + 20 * STEP, "Infinity", NON_FINITE),
    ]
    # Kept as received: nothing is deleted from readings.
    assert conn.execute("SELECT count(*) FROM readings").fetchone() == (2 * (N + 1),)
    for meter in POWER:
        kwh = conn.execute("SELECT sum(kwh) FROM meter_energy_15m WHERE meter_id = %s", (meter,)).fetchone()
        assert kwh is not None and math.isclose(kwh[0], expected_kwh(meter), rel_tol=1e-12)
    site = conn.execute(
        "SELECT sum(kwh), sum(kg_co2e), bool_and(kwh < 'Infinity' AND kwh = kwh AND kg_co2e = kg_co2e"
        " AND kg_co2e < 'Infinity') FROM site_rollups_15m WHERE site_id = 's1'"
    ).fetchone()
    assert site is not None
    total = expected_kwh("m1") + expected_kwh("m2")
    assert math.isclose(site[0], total, rel_tol=1e-12) and site[2] is True
    assert math.isclose(site[1], total * FACTOR, rel_tol=1e-12)
    # A rebuild from scratch gives exactly the same rows, quarantine included.
    recompute_all(conn)
    assert (snapshot(conn), _held(conn)) == incremental


def test_a_raised_max_kw_or_late_reading_lifts_the_quarantine(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    recompute_all(conn)
    assert [r[0] for r in _held(conn)] == ["m1", "m2", "m2"]
    # The registry said 150 kW; the circuit really is bigger: the jump is then counted.
    _setup(conn, tmp_path, max_kw=1e12)
    recompute_all(conn)
    assert [r[0] for r in _held(conn)] == ["m2", "m2"]
    _setup(conn, tmp_path)
    recompute_all(conn)
    # A late reading between the spike and its predecessor: the jump is now one interval later,
    # and an incremental recompute of that range moves the quarantine with it.
    late = START + SPIKE * STEP - STEP / 2
    insert_rows(
        conn, [("m1", "energy_import_kwh", late, 1000.0 + 100.0 * 0.25 * (SPIKE - 0.5), 0, "s1", "gw", 1)]
    )
    recompute(conn, dirty("m1", late, late), Params())
    assert [(r[0], r[1]) for r in _held(conn) if r[0] == "m1"] == [("m1", START + SPIKE * STEP)]
    assert conn.execute(
        "SELECT count(*) FROM quarantined_readings WHERE meter_id = 'm1' AND ts = %s", (late,)
    ).fetchone() == (0,)


def test_statement_lists_quarantined_readings_in_its_data_quality_section(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    recompute_all(conn)
    held = quarantined(conn, "acme", MONTH)
    assert [(q.meter_id, q.reason) for q in held] == [("m1", JUMP), ("m2", NON_FINITE), ("m2", NON_FINITE)]
    assert quarantined(conn, "acme", "2026-10") == []
    assert reasons(held) == [
        "meter m1 (site s1): 1 readings quarantined (implausible_jump: 1)",
        f"meter m2 (site s1): 2 readings quarantined ({NON_FINITE}: 2)",
    ]
    cfg_path = tmp_path / "statements.toml"
    cfg_path.write_text(f'signing_key = "{tmp_path / "sign.pem"}"\noutbox_dir = "{tmp_path / "outbox"}"\n')
    keygen(tmp_path / "sign.pem")
    cfg = load_statements_config(cfg_path)
    now = datetime(2026, 12, 5, tzinfo=UTC)
    extra: dict[str, Any] = {}
    if "provisional" in inspect.signature(issue_month).parameters:
        # With issue 13's completeness check (compute.statements.completeness), quarantined readings
        # refuse a Final statement; it is issued only as PROVISIONAL, naming them.
        [refused] = issue_month(conn, cfg, MONTH, ["acme"], now=now, params=Params(), progress=False)
        assert refused.status == "refused"
        assert {*reasons(held)} <= {*refused.reasons}
        extra = {"provisional": True}
    [res] = issue_month(conn, cfg, MONTH, ["acme"], now=now, params=Params(), progress=False, **extra)
    assert res.directory is not None
    doc = json.loads((res.directory / "statement.json").read_text())  # strict JSON: no NaN in it
    listed = doc["figures"]["quarantined"]
    assert [(q["meter_id"], q["value"], q["reason"]) for q in listed] == [
        ("m1", repr(1000.0 + 100.0 * 0.25 * SPIKE + 1e6), JUMP),
        ("m2", "nan", NON_FINITE),
        ("m2", "inf", NON_FINITE),
    ]
    assert math.isclose(
        doc["figures"]["totals"]["energy_kwh"], expected_kwh("m1") + expected_kwh("m2"), rel_tol=1e-9
    )
    table = list(csv.reader(io.StringIO((res.directory / "statement.csv").read_text())))
    in_csv = [r for r in table if "quarantined" in r]
    assert len(in_csv) == 3 and any("implausible_jump" in r for r in in_csv)
    pdf = subprocess.run(
        ["pdftotext", "-layout", str(res.directory / "statement.pdf"), "-"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "3 readings quarantined" in pdf and "non_finite_value" in pdf


def test_max_kw_in_the_registry_is_checked(tmp_path: Path) -> None:
    for bad in ("0", "-5.0", "nan", "inf"):
        (tmp_path / "fleet.toml").write_text(FLEET.format(max_kw=bad))
        with pytest.raises(ConfigError, match="m1"):
            load_fleet(tmp_path / "fleet.toml")
    (tmp_path / "fleet.toml").write_text(FLEET.format(max_kw=173.2))
    assert [m.max_kw for m in load_fleet(tmp_path / "fleet.toml").meters] == [173.2, None]
