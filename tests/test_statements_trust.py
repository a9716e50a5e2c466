"""Statements safe to sign (issue 13), against a real PostgreSQL and through the CLI: incomplete
months refused with reasons, --provisional banners, no statement without activity, re-issue on
changed figures, one statement per customer, and verification of the files as a customer receives
them (any names, any folder, the public key only), plus a full recompute with the database.

Expected figures are derived here from the constant power drawn (kW × hours × factor).
"""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller
from psycopg.conninfo import make_conninfo

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.rebuild import recompute_all
from compute.recompute import Params
from compute.statements.config import load_statements_config
from compute.statements.document import load_private_key, load_public_key, public_key_path, sign
from compute.statements.issue import issue_month
from compute.statements.verify import verify_offline, verify_statement
from ingest.db import drop_database, ensure_database, migrate
from ops.cli import main
from ops.procs import free_port
from tests.test_compute_support import cn_grid_factor_toml

FACTOR = 0.5
MONTH = "2026-11"
HOURS = 30 * 24
STEP = timedelta(minutes=15)
START, END = datetime(2026, 10, 30, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)
NOW = "2026-12-05T00:00:00Z"

FLEET = """
[[suppliers]]
id = "good"
name = "Good Assembly Ltd"
[[suppliers]]
id = "bad"
name = "Bad Data Co"
[[suppliers]]
id = "idle"
name = "Idle Holdings"

[[sites]]
id = "g1"
supplier = "good"
name = "Good Plant"
grid_region = "CN"
[[sites]]
id = "b1"
supplier = "bad"
name = "Bad Plant"
grid_region = "CN"
[[sites]]
id = "b2"
supplier = "bad"
name = "Bad Annex"
grid_region = "ZZ"
[[sites]]
id = "i1"
supplier = "idle"
name = "Idle Plant"
grid_region = "CN"

[[meters]]
id = "gm"
site = "g1"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "bdrop"
site = "b1"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "bpart"
site = "b1"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "bzz"
site = "b2"
carrier = "electricity"
model = "eastron_sdm630"
[[meters]]
id = "bgas"
site = "b1"
carrier = "natural_gas"
unit = "m3"
reference_conditions = "15C-101.325kPa"
model = "eastron_sdm630"
[[meters]]
id = "im"
site = "i1"
carrier = "electricity"
model = "eastron_sdm630"
"""

FACTORS = cn_grid_factor_toml(FACTOR, "cn-grid")

KW = {"gm": 100.0, "bdrop": 50.0, "bpart": 20.0, "bzz": 10.0}
SITE = {"gm": "g1", "bdrop": "b1", "bpart": "b1", "bzz": "b2", "bgas": "b1"}


def rows(meter: str, quantity: str = "energy_import_kwh", until: datetime = END) -> list[tuple[Any, ...]]:
    n = int((until - START) / STEP)
    out = [
        (meter, quantity, START + k * STEP, 1000.0 + KW.get(meter, 5.0) * 0.25 * k, 0, SITE[meter], "gw", 1)
        for k in range(n + 1)
    ]
    if meter == "bdrop":  # one implausible value: the counter falls back, then recovers
        k = int((datetime(2026, 11, 10, tzinfo=UTC) - START) / STEP)
        out[k] = (*out[k][:3], 10.0, *out[k][4:])
    return out


@pytest.fixture(scope="module")
def db(pg_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"scopemeter_test_stmt_trust_{uuid.uuid4().hex[:10]}"
    dsn = make_conninfo(pg_admin_dsn, dbname=name)
    ensure_database(dsn, pg_admin_dsn)
    try:
        migrate(dsn)
        tmp = tmp_path_factory.mktemp("trust-db")
        (tmp / "fleet.toml").write_text(FLEET)
        (tmp / "factors.toml").write_text(FACTORS)
        with psycopg.connect(dsn, autocommit=True) as conn:
            apply_fleet(conn, tmp / "fleet.toml")
            apply_factors(conn, tmp / "factors.toml")
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (START, END))
                with cur.copy(
                    "COPY readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
                    " FROM STDIN"
                ) as cp:
                    for r in (
                        rows("gm")
                        + rows("bdrop")
                        + rows("bpart", until=datetime(2026, 11, 11, tzinfo=UTC))
                        + rows("bzz")
                        + rows("bgas")  # a gas meter sending kWh: compute reads gas from gas_m3
                    ):
                        cp.write_row(r)
            recompute_all(conn)
        yield dsn
    finally:
        drop_database(name, pg_admin_dsn)


@pytest.fixture
def env(db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A statements config with two customers of ``good``, a key, and the CLI pointed at the DB."""
    cfg = tmp_path / "statements.toml"
    cfg.write_text(
        f"""
signing_key = "{tmp_path / "keys" / "sign.pem"}"
outbox_dir = "{tmp_path / "outbox"}"
[[allocations]]
supplier = "good"
customer = "lenovo"
customer_name = "Lenovo Group"
share = 0.3
[[allocations]]
supplier = "good"
customer = "zte"
customer_name = "ZTE Corporation"
share = 0.25
"""
    )
    monkeypatch.setenv("SCOPEMETER_DB__DSN", db)
    monkeypatch.setenv("SCOPEMETER_CLOCK__SIM_START", NOW)
    assert main(["statements", "keygen", "--config", str(cfg)]) == 0
    return cfg


def issue(cfg: Path, *extra: str) -> int:
    return main(["statements", "issue", "--month", MONTH, "--config", str(cfg), *extra])


def pdf_pages(path: Path) -> list[str]:
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    )
    return text.stdout.split("\f")[:-1]


def test_issue_all_suppliers_refuses_incomplete_and_skips_idle(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert issue(env) == 1  # a Final was refused
    out = capsys.readouterr().out
    outbox = env.parent / "outbox"
    # The complete supplier is issued; the others are named with why.
    assert "good 2026-11: v1 new" in out and (outbox / "good" / MONTH / "v1" / "statement.json").exists()
    assert "bad 2026-11: refused Final (month incomplete)" in out
    for reason in (
        "meter bpart (site b1): 33.3% of the month measured, below the 99.0% threshold",
        "meter bgas (site b1): natural_gas is computed from gas_m3, but it sent only energy_import_kwh",
        "meter bdrop (site b1): quarantined (dropped) readings in 1 15-minute intervals",
        # The compute engine's refusal (view site_refusals), with its reason and extent.
        "site b2: electricity refused (no emission factor for electricity per kWh in series"
        " 'national-power-average' for region 'ZZ' on this date): 2880 15-minute intervals,"
        " 7,200.000 kWh in total",
    ):
        assert reason in out, reason
    assert "idle 2026-11: no statement" in out and "no registered meter has a reading" in out
    assert not (outbox / "bad").exists() and not (outbox / "idle").exists()

    # --provisional issues the incomplete month with a banner on every page and its reasons.
    capsys.readouterr()
    assert issue(env, "--supplier", "bad", "--provisional") == 0
    assert "bad 2026-11: v1 PROVISIONAL new" in capsys.readouterr().out
    vdir = outbox / "bad" / MONTH / "v1"
    doc = json.loads((vdir / "statement.json").read_text())
    assert doc["provisional"] is True and len(doc["incomplete_reasons"]) == 4
    pages = pdf_pages(vdir / "statement.pdf")
    assert len(pages) == 3 and all("PROVISIONAL" in p for p in pages)
    assert "Not final: meter bpart" in pages[0]
    good = pdf_pages(outbox / "good" / MONTH / "v1" / "statement.pdf")
    assert not any("PROVISIONAL" in p for p in good) and "Final for the month" in good[0]


def test_one_statement_per_customer_verifiable_as_received(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert issue(env, "--supplier", "good") == 0
    vdir = env.parent / "outbox" / "good" / MONTH / "v1"
    full = json.loads((vdir / "statement.json").read_text())
    assert {a["customer"] for a in full["allocation"]} == {"lenovo", "zte"}
    s2 = KW["gm"] * HOURS * FACTOR
    lenovo_dir = vdir / "customers" / "lenovo"
    lenovo = json.loads((lenovo_dir / "statement.json").read_text())
    assert [a["customer"] for a in lenovo["allocation"]] == ["lenovo"]
    assert lenovo["allocation"][0]["total_location_kg"] == pytest.approx(0.3 * s2, rel=1e-9)
    assert "unallocated_share" not in lenovo
    assert [a["customer"] for a in lenovo["inputs"]["allocations"]] == ["lenovo"]
    # CDP SC1.1: the supplier's statement has a row per customer, each customer's only its own.
    assert [r["customer"] for r in full["cdp_sc1_1"]] == ["lenovo", "zte"]
    assert [r["customer"] for r in lenovo["cdp_sc1_1"]] == ["lenovo"]
    assert lenovo["cdp_sc1_1"][0]["emissions_t_co2e_location"] == pytest.approx(0.3 * s2 / 1000, rel=1e-9)
    assert lenovo["figures"]["totals"]["scope2_location"] == pytest.approx(s2, rel=1e-9)
    # Nothing of ZTE in anything Lenovo receives.
    for name in ("statement.json", "statement.csv"):
        text = (lenovo_dir / name).read_text()
        assert "zte" not in text.lower() and "ZTE Corporation" not in text
    assert not any("ZTE" in p for p in pdf_pages(lenovo_dir / "statement.pdf"))
    pub = public_key_path(load_statements_config(env).key_path)
    fp = lenovo["signing_key"]["fingerprint"]
    assert fp.startswith("SHA256:") and fp in pdf_pages(lenovo_dir / "statement.pdf")[0].replace("\n", " ")

    # As received: renamed, in a folder of the customer's, with only the public key.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for src, dst in (("statement.json", "Good_Nov.json"), ("statement.pdf", "a.pdf"), ("statement.csv", "x")):
        shutil.copy(lenovo_dir / src, inbox / dst)
    shutil.copy(pub, inbox / "good.pub")
    shutil.copy(env.parent / "outbox" / "index.json", inbox / "latest-index.json")
    files = [str(inbox / n) for n in ("Good_Nov.json", "a.pdf", "x", "latest-index.json")]
    capsys.readouterr()
    assert main(["statements", "verify", "--offline", "--public-key", str(inbox / "good.pub"), *files]) == 0
    out = capsys.readouterr().out
    assert f"valid (good/{MONTH}/v1/lenovo, key {fp})" in out and "matches" in out
    # A changed CSV is not a rendition of the statement.
    (inbox / "x").write_text((inbox / "x").read_text().replace("lenovo", "lenovo ", 1))
    assert main(["statements", "verify", "--offline", "--public-key", str(inbox / "good.pub"), *files]) == 1
    assert "is not a rendition of this statement" in capsys.readouterr().out
    shutil.copy(lenovo_dir / "statement.csv", inbox / "x")

    # A new version: the old copy verifies as superseded against the new signed index.
    assert issue(env, "--supplier", "good", "--force") == 0
    shutil.copy(env.parent / "outbox" / "index.json", inbox / "latest-index.json")
    capsys.readouterr()
    assert main(["statements", "verify", "--offline", "--public-key", str(inbox / "good.pub"), *files]) == 1
    assert "superseded by version 2" in capsys.readouterr().out
    # An index not signed by the trusted key is refused.
    forged = json.loads((inbox / "latest-index.json").read_text())
    forged["latest"] = [e | {"version": 1} for e in forged["latest"]]
    (inbox / "latest-index.json").write_text(json.dumps(forged))
    assert main(["statements", "verify", "--offline", "--public-key", str(inbox / "good.pub"), *files]) == 2
    assert "the index is not to be trusted" in capsys.readouterr().err


def test_reissue_compares_figures_and_verify_recomputes_every_figure(
    db: str, env: Path, tmp_path: Path
) -> None:
    cfg = load_statements_config(env)
    now = datetime.fromisoformat(NOW)
    trusted = load_public_key(public_key_path(cfg.key_path))
    with psycopg.connect(db, autocommit=True) as conn:
        # v1 is issued from wrong rollups (as the double-claiming allocator produced): same readings,
        # same inputs digest, wrong figures.
        conn.execute("UPDATE site_rollups_15m SET kg_co2e = kg_co2e * 2 WHERE site_id = 'g1'")
        try:
            [v1] = issue_month(conn, cfg, MONTH, ["good"], now=now, params=Params(), progress=False)
        finally:
            recompute_all(conn)
        [v2] = issue_month(conn, cfg, MONTH, ["good"], now=now, params=Params(), progress=False)
        assert (v1.status, v2.status, v2.version) == ("new", "superseded", 2)
        change = {c["figure"]: c for c in v2.changes}
        s2 = KW["gm"] * HOURS * FACTOR
        assert change["figures.totals.scope2_location"]["delta"] == pytest.approx(-s2, rel=1e-9)
        assert change["allocation.lenovo.total_location_kg"]["delta"] == pytest.approx(-0.3 * s2, rel=1e-9)
        [v3] = issue_month(conn, cfg, MONTH, ["good"], now=now, params=Params(), progress=False)
        assert v3.status == "unchanged"

        # A daily value changed and re-signed with the right key: offline it is validly signed,
        # the recompute from the readings finds the figure.
        assert v2.directory is not None
        doc = json.loads((v2.directory / "statement.json").read_text())
        doc["figures"]["daily"][6]["scope2_location"] += 1.0
        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps(sign(doc, load_private_key(cfg.key_path))))
        [off] = verify_offline([forged], trusted)
        assert off.status == "valid"
        [v] = verify_statement(conn, [forged], trusted, cfg)
        assert v.status == "invalid"
        assert [d["figure"] for d in v.differences] == ["figures.daily.2026-11-07.scope2_location"]
        # An allocation's text changed and re-signed (a basis the supplier did not configure): no
        # number moves, yet the recompute from the configuration does not state it.
        doc = json.loads((v2.directory / "statement.json").read_text())
        [lenovo] = [a for a in doc["allocation"] if a["customer"] == "lenovo"]
        lenovo["basis"] = "mass" if lenovo["basis"] != "mass" else "revenue"
        forged.write_text(json.dumps(sign(doc, load_private_key(cfg.key_path))))
        [v] = verify_statement(conn, [forged], trusted, cfg)
        assert v.status == "invalid" and v.differences == []
        assert v.problems == ["stated fields do not reproduce: allocation.lenovo.basis"]
        [ok] = verify_statement(conn, [v2.directory / "statement.json"], trusted, cfg)
        assert (ok.status, ok.differences) == ("valid", [])
        # v1 in the outbox: superseded (the outbox index), and its figures do not reproduce.
        [old] = verify_statement(conn, [v2.directory.parent / "v1" / "statement.json"], trusted, cfg)
        assert old.status == "invalid" and old.superseded_by == 2
        # Each customer's statement verifies against the database too (its own allocation only).
        [cust] = verify_statement(conn, [v2.directory / "customers" / "zte" / "statement.json"], trusted, cfg)
        assert (cust.status, cust.differences) == ("valid", [])


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def test_each_customer_is_mailed_only_its_own_statement(env: Path, tmp_path: Path) -> None:
    inbox = _Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        env.write_text(
            env.read_text()
            + f"""
[email]
host = "127.0.0.1"
port = {smtp.port}
[[recipients]]
supplier = "good"
to = ["ghg@good.example"]
[[recipients]]
supplier = "good"
customer = "lenovo"
to = ["suppliers@lenovo.example"]
"""
        )
        assert issue(env, "--supplier", "good", "--email") == 0
    finally:
        smtp.stop()
    by_rcpt = {tuple(r): email.message_from_bytes(raw) for r, raw in inbox.messages}
    assert set(by_rcpt) == {("ghg@good.example",), ("suppliers@lenovo.example",)}
    lenovo = by_rcpt[("suppliers@lenovo.example",)]
    names = sorted(str(p.get_filename()) for p in lenovo.walk() if p.get_filename())
    assert names == [f"good-{MONTH}-v1-lenovo.{ext}" for ext in ("csv", "json", "pdf")]
    for part in lenovo.walk():
        name = part.get_filename()
        if name:
            payload = bytes(part.get_payload(decode=True))
            if name.endswith(".pdf"):  # its text: compressed streams hold any 3 bytes now and then
                (tmp_path / name).write_bytes(payload)
                assert not any("ZTE" in p for p in pdf_pages(tmp_path / name))
            else:
                assert b"ZTE" not in payload and b"zte" not in payload
    full = by_rcpt[("ghg@good.example",)]
    doc = next(p for p in full.walk() if p.get_filename() == f"good-{MONTH}-v1.json")
    assert {a["customer"] for a in json.loads(bytes(doc.get_payload(decode=True)))["allocation"]} == {
        "lenovo",
        "zte",
    }
