"""Market-based Scope 2: instruments first (period or hourly matching), residual or location after."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.config import ConfigError
from compute.market import apply_instruments, load_instruments
from compute.rebuild import recompute_all
from compute.recompute import recompute
from ingest.writer import dirty_ranges
from tests.test_compute_support import Row, apply_registry, compute_dsn, insert_rows, reset

__all__ = ["compute_dsn"]

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

[[sites]]
id = "s2"
supplier = "acme"
name = "Leeds"
grid_region = "GB"
timezone = "Europe/London"

[[meters]]
id = "e1"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "e2"
site = "s2"
carrier = "electricity"
model = "eastron_sdm630"
"""

FACTORS = """
[[factors]]
id = "cn"
publisher = "MEE"
series = "national-power-average"
region = "CN"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
data_year = 2022
kg_co2_per_unit = 0.5
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 1
source = "test"

[[factors]]
id = "uk"
publisher = "DESNZ"
series = "national-power-average"
region = "GB"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
data_year = 2022
kg_co2_per_unit = 0.2
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 1
source = "test"

[[factors]]
id = "uk-residual"
publisher = "test"
series = "residual-mix"
region = "GB"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
data_year = 2022
kg_co2_per_unit = 0.4
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 1
source = "test"
"""

T = datetime(2026, 11, 1, 2, tzinfo=UTC)  # 10:00 in Shanghai, 02:00 in London: same local day


def load(kw: float = 600.0) -> list[Row]:
    """Both meters draw ``kw`` for three hours, read every minute."""
    return [
        (m, "energy_import_kwh", T + timedelta(minutes=k), kw * k / 60, 0, site, "gw", 0)
        for k in range(181)
        for m, site in (("e1", "s1"), ("e2", "s2"))
    ]


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, FACTORS)
        yield c


def instruments(conn: psycopg.Connection[Any], tmp_path: Path, text: str) -> None:
    (tmp_path / "instruments.toml").write_text(text)
    apply_instruments(conn, tmp_path / "instruments.toml")


def market(conn: psycopg.Connection[Any], site: str) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT kwh, kwh_instruments, kg_co2e, residual_factor_id, instrument_ids FROM site_market_1h"
        " WHERE site_id = %s ORDER BY bucket",
        (site,),
    ).fetchall()
    conn.commit()
    return rows


def run(conn: psycopg.Connection[Any], rows: list[Row]) -> None:
    insert_rows(conn, rows)
    for d in dirty_ranges(rows):
        recompute(conn, d)


def test_without_instruments_market_equals_location(conn: Any) -> None:
    run(conn, load())
    got = market(conn, "s1")
    assert [r[0] for r in got] == pytest.approx([600.0] * 3)
    assert [r[2] for r in got] == pytest.approx([300.0] * 3)  # 600 kWh × 0.5
    assert {r[3] for r in got} == {"cn"} and all(r[1] == 0 and r[4] == [] for r in got)


def test_gec_retired_in_time_order_then_location(conn: Any, tmp_path: Path) -> None:
    instruments(
        conn,
        tmp_path,
        """
[[instruments]]
id = "gec-1"
site = "s1"
kind = "gec"
certificates = 1
serial_prefix = "GEC-T"
serial_first = 1
serial_last = 1
market_boundary = "CN"
evidence = "cancelled for s1"
period_start = 2026-11-01
period_end = 2026-11-02
reference = "GEC test"
""",
    )
    run(conn, load())
    got = market(conn, "s1")
    assert [r[1] for r in got] == pytest.approx([600.0, 400.0, 0.0])  # 1 GEC = 1 MWh
    assert [r[2] for r in got] == pytest.approx([0.0, 100.0, 300.0])
    assert [r[4] for r in got] == [["gec-1"], ["gec-1"], []]


def test_hourly_ppa_and_residual_factor(conn: Any, tmp_path: Path) -> None:
    instruments(
        conn,
        tmp_path,
        """
[[instruments]]
id = "ppa-1"
site = "s2"
kind = "ppa"
mwh = 2.4
period_start = 2026-11-01
period_end = 2026-11-02
market_boundary = "GB"
kg_co2e_per_kwh = 0.05
hourly = true
reference = "PPA test"
""",
    )
    run(conn, load())
    got = market(conn, "s2")
    assert [r[1] for r in got] == pytest.approx([100.0] * 3)  # 2400 kWh over 24 h, no banking
    assert [r[2] for r in got] == pytest.approx([100 * 0.05 + 500 * 0.4] * 3)
    assert {r[3] for r in got} == {"uk-residual"}


def test_incremental_out_of_order_equals_rebuild(conn: Any, tmp_path: Path) -> None:
    instruments(
        conn,
        tmp_path,
        """
[[instruments]]
id = "gec-1"
site = "s1"
kind = "gec"
certificates = 1
serial_prefix = "GEC-T"
serial_first = 1
serial_last = 1
market_boundary = "CN"
evidence = "cancelled for s1"
period_start = 2026-11-01
period_end = 2026-11-02
reference = "GEC test"

[[instruments]]
id = "ppa-1"
site = "s1"
kind = "ppa"
mwh = 2.4
period_start = 2026-11-01
period_end = 2026-11-02
market_boundary = "CN"
hourly = true
reference = "PPA test"
""",
    )
    rows = load()
    rng = random.Random(3)
    rng.shuffle(rows)
    for i in range(0, len(rows), 37):
        run(conn, rows[i : i + 37])
    incremental = market(conn, "s1")
    recompute_all(conn)
    assert market(conn, "s1") == incremental
    assert [r[1] for r in incremental] == pytest.approx(
        [600.0, 600.0, 100.0]
    )  # PPA 100/h, GEC 1000 on the rest


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('kind = "gec"\nmwh = 5.0', "counted in certificates"),
        ('kind = "gec"\ncertificates = 5', "serial range"),
        (
            'kind = "gec"\ncertificates = 5\nserial_prefix = "G"\nserial_first = 1\nserial_last = 4',
            "are 4 certificates",
        ),
        (
            'kind = "gec"\ncertificates = 5\nserial_prefix = "G"\nserial_first = 1\nserial_last = 5',
            "retirement evidence",
        ),
        ('kind = "ppa"\nmwh = 5.0\ncertificates = 5', "exactly one of"),
        ('kind = "ppa"\nmwh = 5.0\ncarrier = "diesel"', "Scope 2 carriers"),
        ('kind = "coupon"\nmwh = 5.0', "kind"),
    ],
)
def test_bad_instruments_rejected(tmp_path: Path, entry: str, message: str) -> None:
    p = tmp_path / "instruments.toml"
    p.write_text(
        f'[[instruments]]\nid = "x"\nsite = "s1"\n{entry}\nperiod_start = 2026-01-01\n'
        'period_end = 2027-01-01\nmarket_boundary = "CN"\nreference = "r"\n'
    )
    with pytest.raises(ConfigError, match=message):
        load_instruments(p)


def test_unknown_site_rejected(conn: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown site"):
        instruments(
            conn,
            tmp_path,
            '[[instruments]]\nid = "x"\nsite = "nope"\nkind = "ppa"\nmwh = 1.0\n'
            'period_start = 2026-01-01\nperiod_end = 2027-01-01\nmarket_boundary = "CN"\nreference = "r"\n',
        )
