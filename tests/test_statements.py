"""Monthly statements against a real PostgreSQL: figures, PDF/CSV/JSON, signatures, recompute-verify,
late data superseding a version, and e-mail delivery to a real local SMTP server (aiosmtpd).

Expected figures are derived here from the constant power each meter draws (kW × hours × factor),
never copied from the code's output.
"""

from __future__ import annotations

import csv
import email
import io
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import psycopg
import pytest
from aiosmtpd.controller import Controller
from matplotlib import image

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.rebuild import recompute_all
from compute.recompute import Params, recompute
from compute.statements.config import load_statements_config
from compute.statements.document import fingerprint, keygen, load_public_key, public_key_path
from compute.statements.figures import month_figures
from compute.statements.issue import issue_month
from compute.statements.verify import Verification, verify_statement
from ingest.db import drop_database, ensure_database, migrate
from ingest.events import DirtyRange
from ops.cli import main
from ops.errors import UserError
from ops.procs import free_port
from tests.test_compute_support import cn_grid_factor_toml

FACTOR = 0.5  # kg CO2e/kWh, the only electricity factor below
GAS_FACTOR = 2.0
# Constant power per meter (kW). late-m2's readings only arrive after v1 was issued.
POWER = {"m1": 100.0, "m2": 50.0, "m3": 20.0, "late-m1": 30.0, "late-m2": 10.0}
SITE = {"m1": "s1", "m2": "s1", "m3": "s2", "late-m1": "g1", "late-m2": "g1"}
MONTH = "2026-11"
HOURS_NOV, HOURS_OCT = 30 * 24, 31 * 24
STEP = timedelta(minutes=15)  # no gaps: every interval is measured
START, END = datetime(2026, 9, 29, tzinfo=UTC), datetime(2026, 12, 3, tzinfo=UTC)

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme Electronics (Shenzhen) Co., Ltd."
[[suppliers]]
id = "gamma"
name = "Gamma Plastics"
[[suppliers]]
id = "beta"
name = "Beta Metals"

[[sites]]
id = "s1"
supplier = "acme"
name = "Shenzhen Plant 1"
grid_region = "CN"
timezone = "Asia/Shanghai"
[[sites]]
id = "s2"
supplier = "acme"
name = "Dongguan Warehouse"
grid_region = "CN"
[[sites]]
id = "g1"
supplier = "gamma"
name = "Gamma Plant"
grid_region = "CN"
[[sites]]
id = "b1"
supplier = "beta"
name = "Beta Foundry"
grid_region = "CN"

[[meters]]
id = "m1"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "m2"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "m3"
site = "s2"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "late-m1"
site = "g1"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "late-m2"
site = "g1"
carrier = "electricity"
model = "eastron_sdm630"
"""

FACTORS = cn_grid_factor_toml(FACTOR) + f"""
[[factors]]
id = "ng-v1"
publisher = "IPCC"
series = "stationary-combustion"
region = "CN"
carrier = "natural_gas"
valid_from = 2022-01-01
valid_to = 2100-01-01
data_year = 2022
kg_co2_per_unit = {GAS_FACTOR}
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 1
source = "test gas factor"
cv_basis = "net"
"""


def statements_toml(tmp: Path, smtp_port: int = 25) -> str:
    return f"""
signing_key = "{tmp / "keys" / "sign.pem"}"
outbox_dir = "{tmp / "outbox"}"
[email]
host = "127.0.0.1"
port = {smtp_port}
sender = "statements@test.example"
[[allocations]]
supplier = "acme"
customer = "lenovo"
customer_name = "Lenovo Group"
share = 0.45
[[allocations]]
supplier = "acme"
customer = "zte"
customer_name = "ZTE Corporation"
share = 0.2
[[production]]
supplier = "acme"
month = "{MONTH}"
quantity = 1000
unit = "PCBA"
[[recipients]]
supplier = "gamma"
to = ["buyer@customer.example", "esg@gamma.example"]
"""


def readings(meter: str) -> list[tuple[Any, ...]]:
    """Quarter-hourly counter readings of a meter drawing POWER[meter] kW from START to END."""
    steps = int((END - START) / STEP)
    kwh_per_step = POWER[meter] * STEP.total_seconds() / 3600
    return [
        (meter, "energy_import_kwh", START + i * STEP, 1000.0 + kwh_per_step * i, 0, SITE[meter], "gw", 1)
        for i in range(steps + 1)
    ]


def load_readings(conn: psycopg.Connection[Any], meters: list[str]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (START, END))
        with cur.copy(
            "COPY readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
            " FROM STDIN"
        ) as cp:
            for m in meters:
                for row in readings(m):
                    cp.write_row(row)


@pytest.fixture(scope="module")
def db(pg_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of its own: the fleet, factors and two months of readings, computed."""
    from psycopg.conninfo import make_conninfo

    name = f"scopemeter_test_statements_{uuid.uuid4().hex[:10]}"
    dsn = make_conninfo(pg_admin_dsn, dbname=name)
    ensure_database(dsn, pg_admin_dsn)
    try:
        migrate(dsn)
        tmp = tmp_path_factory.mktemp("stmt-db")
        (tmp / "fleet.toml").write_text(FLEET)
        (tmp / "factors.toml").write_text(FACTORS)
        with psycopg.connect(dsn, autocommit=True) as conn:
            apply_fleet(conn, tmp / "fleet.toml")
            apply_factors(conn, tmp / "factors.toml")
            load_readings(conn, ["m1", "m2", "m3", "late-m1"])
            recompute_all(conn)
        yield dsn
    finally:
        drop_database(name, pg_admin_dsn)


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "statements.toml"
    path.write_text(statements_toml(tmp_path))
    keygen(tmp_path / "keys" / "sign.pem")
    return path


STATEMENT_SCHEMA = json.loads(
    (
        Path(__file__).resolve().parent.parent
        / "compute"
        / "statements"
        / "schema"
        / "statement-2.schema.json"
    ).read_text()
)


def assert_schema_valid(doc: dict[str, Any]) -> None:
    """The published JSON Schema (draft 2020-12) accepts the statement, formats included."""
    validator = jsonschema.Draft202012Validator(STATEMENT_SCHEMA, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


def verify_one(conn: psycopg.Connection[Any], path: Path, trusted: Any, cfg: Any) -> Verification:
    [v] = verify_statement(conn, [path], trusted, cfg)
    return v


def expected_location_kg(meters: list[str], hours: int) -> float:
    return sum(POWER[m] for m in meters) * hours * FACTOR


def test_issue_writes_signed_versioned_statement_with_expected_figures(db: str, cfg_path: Path) -> None:
    cfg = load_statements_config(cfg_path)
    now = datetime(2026, 12, 5, tzinfo=UTC)
    with psycopg.connect(db, autocommit=True) as conn:
        [res] = issue_month(conn, cfg, MONTH, ["acme"], now=now, params=Params(), progress=False)
        assert (res.version, res.status) == (1, "new")
        doc = json.loads((res.directory / "statement.json").read_text())
        assert_schema_valid(doc)
        f = doc["figures"]
        s2 = expected_location_kg(["m1", "m2", "m3"], HOURS_NOV)
        assert f["totals"]["scope2_location"] == pytest.approx(s2, rel=1e-9)
        assert f["totals"]["scope2_market"] == pytest.approx(s2, rel=1e-9)  # no contractual data
        assert f["market_fallback_sites"] == ["s1", "s2"]
        assert f["totals"]["scope1"] == 0
        assert f["energy_by_carrier"]["electricity"]["amount"] == pytest.approx(170 * HOURS_NOV, rel=1e-9)
        assert f["per_site"]["s1"]["scope2_location"] == pytest.approx(150 * HOURS_NOV * FACTOR, rel=1e-9)
        assert f["coverage"]["bucket_share"] == pytest.approx(1.0)
        assert f["coverage"]["measured_share"] == pytest.approx(1.0)
        assert [x["factor_id"] for x in f["factors"]] == ["cn-grid-v1"]
        # Shanghai's November starts at 16:00 UTC the day before.
        assert f["boundary"][0]["window_utc"][0] == "2026-10-31T16:00:00+00:00"
        assert len(f["daily"]) == 30
        assert sum(d["scope2_location"] for d in f["daily"]) == pytest.approx(s2, rel=1e-9)
        assert doc["month_on_month"]["scope2_location"]["change_pct"] == pytest.approx(
            (HOURS_NOV - HOURS_OCT) / HOURS_OCT * 100, rel=1e-9
        )
        assert doc["intensity"]["kg_co2e_per_unit_location"] == pytest.approx(s2 / 1000, rel=1e-9)
        lenovo = next(a for a in doc["allocation"] if a["customer"] == "lenovo")
        assert lenovo["total_location_kg"] == pytest.approx(0.45 * s2, rel=1e-9)
        assert doc["unallocated_share"] == pytest.approx(0.35)
        assert doc["provisional"] is False
        assert doc["inputs"]["readings"]["count"] == 3 * (HOURS_NOV * 4 + 2)  # + one before, one after each

        # The CSV carries the same figures.
        rows = list(csv.DictReader(io.StringIO((res.directory / "statement.csv").read_text())))
        total = next(r for r in rows if r["section"] == "totals" and r["metric"] == "scope2_location")
        assert float(total["value"]) == f["totals"]["scope2_location"]
        assert {r["customer"] for r in rows if r["section"] == "allocation"} == {"lenovo", "zte"}
        assert {(r["supplier_id"], r["period"], r["version"]) for r in rows} == {("acme", MONTH, "1")}

        # Unchanged inputs: no new version.
        [again] = issue_month(conn, cfg, MONTH, ["acme"], now=now, params=Params(), progress=False)
        assert (again.version, again.status) == (1, "unchanged")

        trusted = load_public_key(public_key_path(cfg.key_path))
        path = res.directory / "statement.json"
        assert doc["signing_key"]["fingerprint"] == fingerprint(trusted)
        assert verify_one(conn, path, trusted, cfg).status == "valid"

        # Tampered rollups do not matter: verify recomputes from the readings (and changes nothing).
        conn.execute("UPDATE site_rollups_15m SET kg_co2e = kg_co2e * 2 WHERE site_id = 's1'")
        v = verify_one(conn, path, trusted, cfg)
        assert (v.status, v.differences) == ("valid", [])
        tampered = month_figures(conn, "acme", MONTH)["totals"]["scope2_location"]
        assert tampered > s2 * 1.5  # verify rolled its recompute back
        recompute_all(conn)

        # An altered figure breaks the signature; a signature from another key is refused.
        altered = dict(doc, figures={**f, "totals": {**f["totals"], "scope2_location": 1.0}})
        bad = res.directory.parent / "altered.json"
        bad.write_text(json.dumps(altered))
        v = verify_one(conn, bad, trusted, cfg)
        assert v.status == "invalid" and "altered" in v.problems[0]
        other = keygen(cfg_path.parent / "other.pem")
        v = verify_one(conn, path, load_public_key(other), cfg)
        assert v.status == "invalid" and "not by the trusted key" in v.problems[0]
        # An altered PDF is caught through the signed file hashes.
        (res.directory / "statement.pdf").write_bytes(b"%PDF-1.4 forged")
        v = verify_one(conn, path, trusted, cfg)
        assert v.status == "invalid" and "statement.pdf was altered" in v.problems[0]


def test_pdf_shows_the_statement(db: str, cfg_path: Path, tmp_path: Path) -> None:
    cfg = load_statements_config(cfg_path)
    with psycopg.connect(db, autocommit=True) as conn:
        [res] = issue_month(
            conn,
            cfg,
            MONTH,
            ["acme"],
            now=datetime(2026, 12, 5, tzinfo=UTC),
            params=Params(),
            progress=False,
        )
    pdf = res.directory / "statement.pdf"
    subprocess.run(["pdftoppm", "-r", "60", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == 3
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True, text=True
    ).stdout
    s2_t = expected_location_kg(["m1", "m2", "m3"], HOURS_NOV) / 1000
    for expected in (
        "Acme Electronics (Shenzhen) Co., Ltd.",
        "Scope 2 location-based",
        "Scope 2 market-based",
        f"{s2_t:,.3f}",
        "Lenovo Group",
        "cn-grid-v1",
        "Daily emissions",
        "Per-site breakdown",
        "Scope 1 vs Scope 2",
        "Data coverage",
        "Renewable share",
    ):
        assert expected in text, expected
    # The charts page: the daily chart's region holds the Scope 2 bar colour, page 3 does not.
    charts = image.imread(pages[1])[..., :3]
    h = charts.shape[0]
    blue = np.all(np.abs(charts - np.array([0x2B, 0x6C, 0xB0]) / 255) < 0.06, axis=-1)
    daily_region = blue[int(h * 0.10) : int(h * 0.36)]
    assert daily_region.mean() > 0.05
    assert blue[int(h * 0.45) : int(h * 0.67)].mean() > 0.005  # per-site bars
    detail = image.imread(pages[2])[..., :3]
    assert np.all(np.abs(detail - np.array([0x2B, 0x6C, 0xB0]) / 255) < 0.06, axis=-1).mean() < 0.001


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def test_late_data_supersedes_with_difference_and_is_emailed(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = _Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        cfg_path = tmp_path / "statements.toml"
        cfg_path.write_text(statements_toml(tmp_path, smtp.port))
        monkeypatch.setenv("SCOPEMETER_DB__DSN", db)
        monkeypatch.setenv("SCOPEMETER_CLOCK__SIM_START", "2026-12-05T00:00:00Z")
        assert main(["statements", "keygen", "--config", str(cfg_path)]) == 0
        issue = ["statements", "issue", "--month", MONTH, "--supplier", "gamma", "--config", str(cfg_path)]
        # late-m2 has sent nothing yet: no Final statement, and nothing is e-mailed.
        capsys.readouterr()
        assert main([*issue, "--email"]) == 1
        out = capsys.readouterr().out
        assert (
            "gamma 2026-11: refused Final" in out
            and "meter late-m2 (site g1): 0.0% of the month measured" in out
        )
        assert not (tmp_path / "outbox" / "gamma").exists() and inbox.messages == []
        # --provisional issues it, marked as such.
        assert main([*issue, "--email", "--provisional"]) == 0
        v1 = tmp_path / "outbox" / "gamma" / MONTH / "v1" / "statement.json"
        v1_doc = json.loads(v1.read_text())
        assert v1_doc["version"] == 1 and v1_doc["provisional"] is True
        assert any("late-m2" in r for r in v1_doc["incomplete_reasons"])
        assert len(inbox.messages) == 1
        assert "PROVISIONAL GHG statement" in email.message_from_bytes(inbox.messages[0][1])["Subject"]

        # The second meter's backlog arrives late; the worker recomputes it.
        with psycopg.connect(db, autocommit=True) as conn:
            load_readings(conn, ["late-m2"])
            recompute(
                conn,
                DirtyRange(
                    site_id="g1",
                    meter_id="late-m2",
                    quantity="energy_import_kwh",
                    t_min=START,
                    t_max=END,
                    rows=0,
                ),
            )
        capsys.readouterr()
        assert main(["statements", "verify", str(v1), "--config", str(cfg_path)]) == 1
        out = capsys.readouterr().out
        assert "outdated" in out and "readings" in out and "figures.totals.scope2_location" in out

        assert main([*issue, "--email"]) == 0
        v2 = json.loads((tmp_path / "outbox" / "gamma" / MONTH / "v2" / "statement.json").read_text())
        assert v2["supersedes"]["version"] == 1
        assert v2["provisional"] is False
        change = {c["figure"]: c for c in v2["supersedes"]["changes"]}
        late_kg = expected_location_kg(["late-m2"], HOURS_NOV)
        assert change["figures.totals.scope2_location"]["delta"] == pytest.approx(late_kg, rel=1e-9)
        # Every daily value that changed is listed too, not only the headline figures.
        assert change["figures.daily.2026-11-07.scope2_location"]["delta"] == pytest.approx(
            late_kg / 30, rel=1e-9
        )
        assert change["figures.totals.scope2_location"]["old"] == pytest.approx(
            expected_location_kg(["late-m1"], HOURS_NOV), rel=1e-9
        )
        capsys.readouterr()
        assert main(["statements", "verify", str(v1), "--config", str(cfg_path)]) == 1
        assert "superseded by version 2" in capsys.readouterr().out
        v2_path = tmp_path / "outbox" / "gamma" / MONTH / "v2" / "statement.json"
        assert main(["statements", "verify", str(v2_path), "--config", str(cfg_path)]) == 0

        assert len(inbox.messages) == 2
        rcpt, raw = inbox.messages[1]
        assert rcpt == ["buyer@customer.example", "esg@gamma.example"]
        msg = email.message_from_bytes(raw)
        assert "Revised GHG statement 2026-11" in msg["Subject"]
        names = sorted(str(p.get_filename()) for p in msg.walk() if p.get_filename())
        assert names == [f"gamma-{MONTH}-v2.{ext}" for ext in ("csv", "json", "pdf")]
        attached = next(p for p in msg.walk() if p.get_filename() == f"gamma-{MONTH}-v2.json")
        assert json.loads(bytes(attached.get_payload(decode=True)))["signature"] == v2["signature"]
        body = next(p for p in msg.walk() if p.get_content_type() == "text/plain").get_payload(decode=True)
        assert b"supersedes version 1" in body
    finally:
        smtp.stop()


def test_reads_scope1_rollups_and_market_rows(db: str) -> None:
    """Scope 1 fuel rollups and market-based Scope 2 hours (``site_market_1h``) as compute writes them;
    stray 'market' rows in ``site_rollups_15m`` are not counted."""
    hour0 = datetime(2026, 11, 3, tzinfo=UTC)
    gas_kwh, elec_kwh, gec_buckets, buckets = 40.0, 25.0, 3, 8
    with psycopg.connect(db, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(
                "INSERT INTO contractual_instruments (instrument_id, site_id, kind, mwh, period_start,"
                " period_end, reference)"
                " VALUES ('gec-b1', 'b1', 'gec', 1, '2026-11-01', '2026-12-01', 'GEC-1')"
            )
            for i in range(buckets):
                b = hour0 + i * timedelta(minutes=15)
                conn.execute(
                    "INSERT INTO site_rollups_15m"
                    " (site_id, bucket, carrier, scope, method, kwh, kg_co2e, factor_id)"
                    " VALUES ('b1', %s, 'natural_gas', 1, 'direct', %s, %s, 'ng-v1'),"
                    " ('b1', %s, 'electricity', 2, 'location', %s, %s, 'cn-grid-v1'),"
                    " ('b1', %s, 'electricity', 2, 'market', %s, 0, 'cn-grid-v1')",
                    (b, gas_kwh, gas_kwh * GAS_FACTOR, b, elec_kwh, elec_kwh * FACTOR, b, elec_kwh),
                )
            for h in range(buckets // 4):  # the GEC covers the first gec_buckets quarter hours
                covered = elec_kwh * max(0, min(4, gec_buckets - 4 * h))
                conn.execute(
                    "INSERT INTO site_market_1h (site_id, bucket, carrier, kwh, kwh_instruments, kg_co2e,"
                    " residual_factor_id, instrument_ids) VALUES ('b1', %s, 'electricity', %s, %s, %s,"
                    " 'cn-grid-v1', %s)",
                    (
                        hour0 + timedelta(hours=h),
                        4 * elec_kwh,
                        covered,
                        (4 * elec_kwh - covered) * FACTOR,
                        ["gec-b1"] if covered else [],
                    ),
                )
                if covered:
                    conn.execute(
                        "INSERT INTO instrument_claims VALUES ('gec-b1', 'b1', 'electricity', %s, %s)",
                        (hour0 + timedelta(hours=h), covered),
                    )
        f = month_figures(conn, "beta", MONTH)
    assert f["scope1_by_fuel"] == {"natural_gas": pytest.approx(buckets * gas_kwh * GAS_FACTOR)}
    assert f["totals"]["scope2_location"] == pytest.approx(buckets * elec_kwh * FACTOR)
    assert f["totals"]["scope2_market"] == pytest.approx((buckets - gec_buckets) * elec_kwh * FACTOR)
    assert f["market_fallback_sites"] == []
    assert f["renewable_share"] == pytest.approx(gec_buckets / buckets)
    assert [(x["instrument_id"], x["claimed_mwh"]) for x in f["instruments"]] == [
        ("gec-b1", pytest.approx(gec_buckets * elec_kwh / 1000))
    ]
    assert sum(d["scope2_market"] for d in f["daily"]) == pytest.approx(f["totals"]["scope2_market"])
    # Energy is counted once per carrier, not once per method.
    assert f["energy_by_carrier"]["electricity"]["amount"] == pytest.approx(buckets * elec_kwh)
    assert f["energy_by_carrier"]["natural_gas"]["amount"] == pytest.approx(buckets * gas_kwh)
    assert f["coverage"]["bucket_share"] == pytest.approx(2 * buckets / (2 * 30 * 96))
    assert sorted(x["factor_id"] for x in f["factors"]) == ["cn-grid-v1", "ng-v1"]


def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "statements.toml"
    path.write_text(statements_toml(tmp_path).replace("share = 0.2", "share = 0.6"))
    with pytest.raises(UserError, match=r"add up to 1\.05"):
        load_statements_config(path)
    assert main(["statements", "issue", "--month", "2026-11", "--config", str(path)]) == 2
    assert "add up to 1.0500" in capsys.readouterr().err
    path.write_text(statements_toml(tmp_path))
    assert main(["statements", "issue", "--month", "2026-13", "--config", str(path)]) == 2
    assert "month must be YYYY-MM" in capsys.readouterr().err
    assert (
        main(
            [
                "statements",
                "verify",
                str(tmp_path / "nope.json"),
                "--config",
                str(path),
                "--public-key",
                str(keygen(tmp_path / "k.pem")),
            ]
        )
        == 2
    )
    assert os.path.exists(tmp_path / "k.pem")


def test_annual_statement_rolls_up_the_months_and_verifies(db: str, cfg_path: Path) -> None:
    """``issue --year``: the year's figures equal the sum of its twelve months (each site's local
    calendar), it is signed and versioned like a month, and verify recomputes it from readings."""
    cfg = load_statements_config(cfg_path)
    now = datetime(2027, 1, 10, tzinfo=UTC)
    with psycopg.connect(db, autocommit=True) as conn:
        with conn.transaction():
            months = [month_figures(conn, "acme", f"2026-{m:02d}") for m in range(1, 13)]
            year = month_figures(conn, "acme", "2026")
        for key in ("scope1", "scope2_location", "scope2_market", "energy_kwh"):
            assert year["totals"][key] == pytest.approx(sum(f["totals"][key] for f in months), rel=1e-9)
        assert sum(1 for f in months if f["lines"]) >= 2  # the fixture has October and November data
        assert (year["period_kind"], len(year["daily"])) == ("year", 365)
        # Data from October and November only: the year is incomplete, so no Final is signed.
        [refused] = issue_month(conn, cfg, "2026", ["acme"], now=now, params=Params(), progress=False)
        assert (refused.status, refused.directory) == ("refused", None)
        assert any("of the year measured, below the" in r for r in refused.reasons), refused.reasons
        [res] = issue_month(
            conn, cfg, "2026", ["acme"], now=now, params=Params(), progress=False, provisional=True
        )
        assert res.directory is not None
        doc = json.loads((res.directory / "statement.json").read_text())
        assert (doc["month"], doc["version"], res.directory.parent.name) == ("2026", 1, "2026")
        assert doc["provisional"] is True and doc["incomplete_reasons"] == list(refused.reasons)
        assert_schema_valid(doc)
        trusted = load_public_key(public_key_path(cfg.key_path))
        assert verify_one(conn, res.directory / "statement.json", trusted, cfg).status == "valid"
        lenovo = json.loads((res.directory / "customers" / "lenovo" / "statement.json").read_text())
        assert_schema_valid(lenovo)
        assert [r["customer"] for r in lenovo["cdp_sc1_1"]] == ["lenovo"]
    assert main(["statements", "issue", "--year", "26", "--config", str(cfg_path)]) == 2


def test_schema_rejects_a_statement_missing_what_it_must_say(db: str, cfg_path: Path) -> None:
    """The schema is not a rubber stamp: a statement without its gases or with a bad period fails."""
    cfg = load_statements_config(cfg_path)
    with psycopg.connect(db, autocommit=True) as conn:
        [res] = issue_month(
            conn, cfg, MONTH, ["acme"], now=datetime(2026, 12, 5, tzinfo=UTC), params=Params(), progress=False
        )
    doc = json.loads((res.directory / "statement.json").read_text())
    validator = jsonschema.Draft202012Validator(STATEMENT_SCHEMA)
    no_gases = {**doc, "figures": {k: v for k, v in doc["figures"].items() if k != "by_gas"}}
    assert not validator.is_valid(no_gases)
    assert not validator.is_valid({**doc, "month": "2026-13"})
    assert not validator.is_valid({**doc, "inputs_digest": "xyz"})
