"""Market-based Scope 2 in a monthly statement: a site holding China GECs for part of its month.

Readings → compute (location and market) → issue → JSON, CSV, PDF → recompute-verify, against a
real PostgreSQL. Expected figures come from the constant power drawn, the GEC volume and the grid
factor (no residual-mix factor exists for CN, so the uncovered rest keeps the location factor).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.market import apply_instruments
from compute.rebuild import recompute_all
from compute.recompute import Params
from compute.statements.config import load_statements_config
from compute.statements.document import keygen, load_public_key, public_key_path
from compute.statements.figures import month_figures
from compute.statements.issue import issue_month
from compute.statements.verify import Verification, verify_statement
from ingest.db import drop_database, ensure_database, migrate
from tests.test_compute_support import cn_grid_factor_toml

FACTOR = 0.5  # kg CO2e/kWh
KW = 100.0  # the site's one meter draws this constant power
GEC_CERTIFICATES = 20  # 1 GEC = 1 MWh: covers the first 200 of the month's 720 hours
MONTH = "2026-11"
HOURS = 30 * 24
STEP = timedelta(minutes=15)
START, END = datetime(2026, 10, 29, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)

FLEET = """
[[suppliers]]
id = "delta"
name = "Delta Circuits (Suzhou) Co., Ltd."

[[sites]]
id = "d1"
supplier = "delta"
name = "Suzhou Plant"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[meters]]
id = "e1"
site = "d1"
carrier = "electricity"
model = "eastron_sdm630"
"""

FACTORS = cn_grid_factor_toml(FACTOR)

INSTRUMENTS = f"""
[[instruments]]
id = "gec-2026-11-d1"
site = "d1"
kind = "gec"
certificates = {GEC_CERTIFICATES}
serial_prefix = "GEC-2026-SZ"
serial_first = 101
serial_last = {100 + GEC_CERTIFICATES}
market_boundary = "CN"
evidence = "GEC platform cancellation record 2026-12-01 for Delta Circuits"
period_start = 2026-11-01
period_end = 2026-12-01
reference = "GEC serials 2026-SZ-000101..000120"
"""


def verify_one(conn: psycopg.Connection[Any], path: Path, trusted: Any, cfg: Any) -> Verification:
    [v] = verify_statement(conn, [path], trusted, cfg)
    return v


@pytest.fixture
def setup(pg_admin_dsn: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A database of its own with the site, its GEC and five weeks of readings, computed."""
    name = f"scopemeter_test_stmt_market_{uuid.uuid4().hex[:10]}"
    dsn = make_conninfo(pg_admin_dsn, dbname=name)
    ensure_database(dsn, pg_admin_dsn)
    try:
        migrate(dsn)
        for file, text in (("fleet", FLEET), ("factors", FACTORS), ("instruments", INSTRUMENTS)):
            (tmp_path / f"{file}.toml").write_text(text)
        steps = int((END - START) / STEP)
        with psycopg.connect(dsn, autocommit=True) as conn:
            apply_fleet(conn, tmp_path / "fleet.toml")
            apply_factors(conn, tmp_path / "factors.toml")
            apply_instruments(conn, tmp_path / "instruments.toml")
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (START, END))
                with cur.copy(
                    "COPY readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
                    " FROM STDIN"
                ) as cp:
                    for i in range(steps + 1):
                        cp.write_row(
                            ("e1", "energy_import_kwh", START + i * STEP, KW / 4 * i, 0, "d1", "gw", 1)
                        )
            recompute_all(conn)
        cfg = tmp_path / "statements.toml"
        cfg.write_text(f'signing_key = "{tmp_path / "sign.pem"}"\noutbox_dir = "{tmp_path / "outbox"}"\n')
        keygen(tmp_path / "sign.pem")
        yield dsn, cfg
    finally:
        drop_database(name, pg_admin_dsn)


def test_gec_lowers_market_scope2_and_sets_renewable_share(setup: tuple[str, Path], tmp_path: Path) -> None:
    dsn, cfg_path = setup
    cfg = load_statements_config(cfg_path)
    trusted = load_public_key(public_key_path(cfg.key_path))
    location_kg = KW * HOURS * FACTOR
    gec_kwh = GEC_CERTIFICATES * 1000.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        [res] = issue_month(
            conn,
            cfg,
            MONTH,
            ["delta"],
            now=datetime(2026, 12, 5, tzinfo=UTC),
            params=Params(),
            progress=False,
        )
        doc = json.loads((res.directory / "statement.json").read_text())
        f = doc["figures"]
        assert f["totals"]["scope2_location"] == pytest.approx(location_kg, rel=1e-12)
        assert f["totals"]["scope2_location"] - f["totals"]["scope2_market"] == pytest.approx(
            gec_kwh * FACTOR, rel=1e-12
        )
        assert f["per_site"]["d1"]["scope2_market"] == pytest.approx(
            location_kg - gec_kwh * FACTOR, rel=1e-12
        )
        assert sum(d["scope2_market"] for d in f["daily"]) == pytest.approx(
            location_kg - gec_kwh * FACTOR, rel=1e-12
        )
        assert f["renewable_share"] == pytest.approx(gec_kwh / (KW * HOURS), rel=1e-12)
        assert f["market_fallback_sites"] == []
        assert f["instruments"] == [
            {
                "instrument_id": "gec-2026-11-d1",
                "site_id": "d1",
                "kind": "gec",
                "carrier": "electricity",
                "mwh": float(GEC_CERTIFICATES),
                "claimed_mwh": pytest.approx(float(GEC_CERTIFICATES)),
                "period_start": "2026-11-01",
                "period_end": "2026-12-01",
                "kg_co2e_per_kwh": 0.0,
                "hourly": False,
                "reference": "GEC serials 2026-SZ-000101..000120",
                "serials": "GEC-2026-SZ 101..120",
                "market_boundary": "CN",
                "evidence": "GEC platform cancellation record 2026-12-01 for Delta Circuits",
            }
        ]
        # No residual factor is published for CN in this test's library: the rest is location-based.
        assert f["market_residual_basis"] == {"d1": {"location": pytest.approx(KW * HOURS - gec_kwh)}}
        assert doc["inputs"]["instruments"] == f["instruments"]
        # The previous month had no instrument: market equals location there.
        oct_ = doc["month_on_month"]["scope2_market"]["previous"]
        assert oct_ == pytest.approx(doc["month_on_month"]["scope2_location"]["previous"], rel=1e-12)

        rows = list(csv.DictReader(io.StringIO((res.directory / "statement.csv").read_text())))
        [gec_row] = [r for r in rows if r["section"] == "instrument"]
        assert (gec_row["metric"], float(gec_row["value"]), gec_row["unit"]) == (
            "gec-2026-11-d1",
            pytest.approx(GEC_CERTIFICATES),
            "MWh claimed in the month",
        )
        text = subprocess.run(
            ["pdftotext", "-layout", str(res.directory / "statement.pdf"), "-"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for expected in (
            "Contractual instruments claimed this month",
            "gec-2026-11-d1",
            "GEC-2026-SZ 101..120",
            f"{GEC_CERTIFICATES:,.3f}",
            "location-based grid factor",
        ):
            assert expected in text, expected
        assert f"{(location_kg - gec_kwh * FACTOR) / 1000:,.3f}" in text  # market-based t CO2e
        assert f"{gec_kwh / (KW * HOURS) * 100:.1f}" in text  # renewable share %

        path = res.directory / "statement.json"
        assert verify_one(conn, path, trusted, cfg).status == "valid"
        # Tampered market rows do not matter: verify recomputes them from readings and instruments.
        conn.execute("UPDATE site_market_1h SET kg_co2e = 0, kwh_instruments = kwh")
        v = verify_one(conn, path, trusted, cfg)
        assert (v.status, v.differences) == ("valid", [])
        recompute_all(conn)
        # The instruments are inputs: a changed certificate reference makes the statement outdated.
        conn.execute("UPDATE contractual_instruments SET reference = 'GEC serials revised'")
        v = verify_one(conn, path, trusted, cfg)
        assert v.status == "outdated" and "instruments" in v.problems[0]
        assert v.differences == []
        # More certificates change the market figures, which verify reports.
        conn.execute("UPDATE contractual_instruments SET mwh = mwh * 2")
        v = verify_one(conn, path, trusted, cfg)
        change = {d["figure"]: d for d in v.differences}
        assert change["figures.totals.scope2_market"]["delta"] == pytest.approx(-gec_kwh * FACTOR, rel=1e-9)
        assert change["figures.renewable_share"]["new"] == pytest.approx(
            2 * gec_kwh / (KW * HOURS), rel=1e-12
        )
        claimed = "figures.instruments.d1|electricity|gec-2026-11-d1.claimed_mwh"
        assert change[claimed]["new"] == pytest.approx(2 * GEC_CERTIFICATES, rel=1e-12)
        assert "figures.totals.scope2_location" not in change


def test_uncovered_load_uses_the_excl_nonfossil_factor_and_says_so(
    setup: tuple[str, Path], tmp_path: Path
) -> None:
    """GHG Protocol Scope 2 Guidance Table 7.1 criterion 8: no residual mix is published for China,
    so the uncovered rest uses MEE/NBS's average excluding market-traded non-fossil power (2022:
    0.5856 kgCO2/kWh, announcement of 2024-12-20), and the statement discloses it per site."""
    dsn, _ = setup
    excl = 0.5856
    (tmp_path / "excl.toml").write_text(
        FACTORS.replace('id = "cn-grid-v1"', 'id = "cn-excl-2022"')
        .replace(
            'series = "national-power-average"', 'series = "national-power-average-excl-market-nonfossil"'
        )
        .replace(f"kg_co2_per_unit = {FACTOR}", f"kg_co2_per_unit = {excl}")
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_factors(conn, tmp_path / "excl.toml")
        recompute_all(conn)
        f = month_figures(conn, "delta", MONTH)
    rest = KW * HOURS - GEC_CERTIFICATES * 1000.0
    assert f["totals"]["scope2_market"] == pytest.approx(rest * excl, rel=1e-12)
    assert f["totals"]["scope2_location"] == pytest.approx(KW * HOURS * FACTOR, rel=1e-12)
    assert f["market_residual_basis"] == {"d1": {"excl-market-nonfossil": pytest.approx(rest)}}
    assert f["market_fallback_sites"] == []
