"""The instrument ledger against a real PostgreSQL: one claim per MWh whatever order data arrives
in, serial overlaps and boundary/vintage rules refused at load, retraction, residual fallbacks.

Expected claims are derived here from the constant power drawn and the instruments' volumes (kW ×
hours, 1 certificate = 1 MWh), never copied from the code's output.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compute.config import ConfigError
from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.market import apply_instruments, load_instruments
from compute.rebuild import recompute_all
from compute.recompute import recompute
from ingest.writer import dirty_ranges
from ops.cli import main
from tests.test_compute_support import (
    Row,
    apply_registry,
    cn_grid_factor_toml,
    compute_dsn,
    insert_rows,
    reset,
)

__all__ = ["compute_dsn"]

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "cn1"
supplier = "acme"
name = "Shenzhen"
grid_region = "CN"
timezone = "UTC"

[[sites]]
id = "cn2"
supplier = "acme"
name = "Dongguan"
grid_region = "CN-GD"
timezone = "UTC"

[[sites]]
id = "uk1"
supplier = "acme"
name = "Leeds"
grid_region = "GB"
timezone = "UTC"

[[meters]]
id = "e1"
site = "cn1"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "e2"
site = "cn2"
carrier = "electricity"
model = "eastron_sdm630"
"""

GRID = 0.45  # kg CO2e/kWh, the issue's example grid factor
EXCL = 0.5856  # MEE/NBS 2022 national average excluding market-traded non-fossil power

FACTORS = cn_grid_factor_toml(GRID, "cn") + cn_grid_factor_toml(GRID, "cn-gd", region="CN-GD")
EXCL_FACTOR = cn_grid_factor_toml(EXCL, "cn-excl", series="national-power-average-excl-market-nonfossil")

STEP = timedelta(minutes=15)


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, FACTORS)
        yield c


def gec(
    ident: str,
    site: str,
    certificates: int,
    start: date,
    end: date,
    *,
    first: int = 1,
    prefix: str = "GEC-2026-GD",
    boundary: str = "CN",
    hourly: bool = False,
) -> str:
    return f"""
[[instruments]]
id = "{ident}"
site = "{site}"
kind = "gec"
certificates = {certificates}
serial_prefix = "{prefix}"
serial_first = {first}
serial_last = {first + certificates - 1}
period_start = {start.isoformat()}
period_end = {end.isoformat()}
market_boundary = "{boundary}"
evidence = "cancellation record {ident}"
hourly = {"true" if hourly else "false"}
reference = "test"
"""


def apply(conn: psycopg.Connection[Any], tmp_path: Path, text: str) -> Any:
    (tmp_path / "instruments.toml").write_text(text)
    return apply_instruments(conn, tmp_path / "instruments.toml")


def constant(meter: str, site: str, kw: float, t0: datetime, t1: datetime) -> list[Row]:
    n = int((t1 - t0) / STEP)
    return [
        (meter, "energy_import_kwh", t0 + k * STEP, kw * k * 0.25, 0, site, "gw", 0) for k in range(n + 1)
    ]


def copy_rows(conn: psycopg.Connection[Any], rows: list[Row]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (rows[0][2], rows[-1][2]))
        with cur.copy(
            "COPY readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
            " FROM STDIN"
        ) as cp:
            for r in rows:
                cp.write_row(r)


def claims(conn: psycopg.Connection[Any]) -> dict[str, float]:
    rows = conn.execute(
        "SELECT instrument_id, sum(kwh) FROM instrument_claims GROUP BY 1 ORDER BY 1"
    ).fetchall()
    conn.commit()
    return {r[0]: r[1] for r in rows}


def state(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    market = conn.execute(
        "SELECT site_id, bucket, carrier, round(kwh::numeric, 6), round(kwh_instruments::numeric, 6),"
        " round(kg_co2e::numeric, 6), residual_factor_id, instrument_ids, residual_basis"
        " FROM site_market_1h ORDER BY 1, 2, 3"
    ).fetchall()
    claim_rows = conn.execute(
        "SELECT instrument_id, site_id, bucket, round(kwh::numeric, 6) FROM instrument_claims"
        " ORDER BY 1, 2, 3"
    ).fetchall()
    conn.commit()
    return market, claim_rows


KW = 137.0  # ≈ 100 MWh a month, as in the issue


def test_issue_a_b_case_late_november_reading(conn: Any, tmp_path: Path) -> None:
    """Issue 13: A (300 MWh, Jan–Jul) and B (100 MWh, Jun–Dec), ~100 MWh of load a month. One late
    November reading and its incremental recompute must leave 400 MWh claimed, as a rebuild does
    (the old allocator re-claimed A in June: 498.6 MWh)."""
    apply(
        conn,
        tmp_path,
        gec("A", "cn1", 300, date(2026, 1, 1), date(2026, 8, 1))
        + gec("B", "cn1", 100, date(2026, 6, 1), date(2027, 1, 1), first=301),
    )
    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    rows = [r for r in constant("e1", "cn1", KW, t0, t1) if r[2] != datetime(2026, 11, 15, 12, tzinfo=UTC)]
    copy_rows(conn, rows)
    recompute_all(conn)
    assert claims(conn) == pytest.approx({"A": 300_000.0, "B": 100_000.0})
    rebuilt = state(conn)

    late = datetime(2026, 11, 15, 12, tzinfo=UTC)
    row: Row = ("e1", "energy_import_kwh", late, KW * ((late - t0) / STEP) * 0.25, 0, "cn1", "gw", 0)
    insert_rows(conn, [row])
    for d in dirty_ranges([row]):
        recompute(conn, d)
    assert claims(conn) == pytest.approx({"A": 300_000.0, "B": 100_000.0})
    assert state(conn) == rebuilt  # the reading is on the line: energy and claims are unchanged

    # July: B has 100 MWh − June's 137 kW × 720 h left; the rest of July gets the grid factor.
    july = conn.execute(
        "SELECT sum(kwh), sum(kwh_instruments), sum(kg_co2e) FROM site_market_1h"
        " WHERE site_id = 'cn1' AND bucket >= '2026-07-01' AND bucket < '2026-08-01'"
    ).fetchone()
    conn.commit()
    july_kwh = KW * 31 * 24
    b_left = 100_000.0 - KW * 30 * 24
    assert july[0] == pytest.approx(july_kwh)
    assert july[1] == pytest.approx(b_left)
    assert july[2] / 1000 == pytest.approx((july_kwh - b_left) * GRID / 1000)  # ≈ 45.26 t
    assert july[1] / july[0] == pytest.approx(0.01334, abs=1e-5)  # ≈ 1.3 % renewable


instrument_specs = st.lists(
    st.tuples(
        st.integers(0, 3),  # first day of the generation period
        st.integers(1, 4),  # its length in days
        st.integers(1, 12),  # certificates (MWh): 10 kW × 24 h = 0.24 MWh a day
        st.booleans(),  # hourly matching
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=instrument_specs, order_seed=st.integers(0, 2**16), batches=st.integers(1, 4))
def test_incremental_equals_rebuild_for_any_overlapping_instruments(
    conn: Any, tmp_path: Path, specs: list[tuple[int, int, int, bool]], order_seed: int, batches: int
) -> None:
    """Property: however the readings arrive (shuffled, in batches, late), the incremental
    recompute's market rows and claims equal a full rebuild's, and no instrument is over-claimed."""
    conn.execute("TRUNCATE readings, meter_energy_15m, site_rollups_15m, site_market_1h, instrument_claims")
    conn.commit()
    base = date(2026, 3, 1)
    text, volume = "", {}
    for k, (day, days, mwh, hourly) in enumerate(specs):
        start = base + timedelta(days=day)
        text += gec(
            f"i{k}", "cn1", mwh, start, start + timedelta(days=days), first=100 * k + 1, hourly=hourly
        )
        volume[f"i{k}"] = mwh * 1000.0
    apply(conn, tmp_path, text)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    rows = constant("e1", "cn1", 10_000.0 / 24 / 4, t0, t0 + timedelta(days=6))  # ≈ 104 kW
    # Contiguous stretches arriving in random order, then a few single late readings.
    rng = random.Random(order_seed)
    late = rng.sample(rows, 3)
    rest = [r for r in rows if r not in late]
    cuts = sorted(rng.sample(range(1, len(rest)), batches - 1)) if batches > 1 else []
    chunks = [rest[a:b] for a, b in zip([0, *cuts], [*cuts, len(rest)], strict=True)]
    rng.shuffle(chunks)
    for chunk in chunks + [[r] for r in late]:
        insert_rows(conn, chunk)
        for d in dirty_ranges(chunk):
            recompute(conn, d)
    incremental = state(conn)
    for iid, kwh in claims(conn).items():
        assert kwh <= volume[iid] * (1 + 1e-9)
    recompute_all(conn)
    assert state(conn) == incremental


def test_overlapping_serials_refused_naming_file_line_and_instruments(tmp_path: Path) -> None:
    text = gec("sz", "cn1", 10, date(2026, 1, 1), date(2027, 1, 1), first=101) + gec(
        "dg", "cn2", 10, date(2026, 1, 1), date(2027, 1, 1), first=110
    )
    p = tmp_path / "instruments.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_instruments(p)
    second = text.splitlines().index("[[instruments]]", 2) + 1
    msg = str(err.value)
    assert f"{p}:{second}: instrument 'dg'" in msg and "overlap instrument 'sz'" in msg and f"{p}:2)" in msg
    # Another registry batch with the same numbers is a different certificate.
    p.write_text(
        gec("sz", "cn1", 10, date(2026, 1, 1), date(2027, 1, 1), first=101)
        + gec("dg", "cn2", 10, date(2026, 1, 1), date(2027, 1, 1), first=110, prefix="GEC-2026-SC")
    )
    assert len(load_instruments(p).instruments) == 2


def test_boundary_and_vintage_rules(conn: Any, tmp_path: Path) -> None:
    # A GEC on a UK site: outside the China grid.
    with pytest.raises(ConfigError, match=r"site 'uk1' is on grid region GB, outside .* boundary CN"):
        apply(conn, tmp_path, gec("x", "uk1", 5, date(2026, 1, 1), date(2027, 1, 1)))
    # A GEC claiming a UK market boundary.
    with pytest.raises(ConfigError, match="gec is valid only within CN, not market boundary GB"):
        apply(conn, tmp_path, gec("x", "uk1", 5, date(2026, 1, 1), date(2027, 1, 1), boundary="GB"))
    # 2010–2100: not within one reporting year.
    with pytest.raises(ConfigError, match="not within one reporting year"):
        apply(conn, tmp_path, gec("x", "cn1", 5, date(2010, 1, 1), date(2100, 1, 1)))
    assert conn.execute("SELECT count(*) FROM contractual_instruments").fetchone() == (0,)
    conn.commit()
    # A provincial site lies within the national market; an April–March reporting year is configurable.
    fiscal = "[rules]\nreporting_year_start_month = 4\n" + gec(
        "y", "cn2", 5, date(2026, 4, 1), date(2027, 4, 1)
    )
    assert apply(conn, tmp_path, fiscal).upserted == 1
    with pytest.raises(ConfigError, match="not within one reporting year"):
        apply(conn, tmp_path, gec("y", "cn2", 5, date(2026, 4, 1), date(2027, 4, 1)))


def test_removed_instrument_is_retracted_and_claims_recomputed(
    conn: Any,
    compute_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    copy_rows(conn, constant("e1", "cn1", 100.0, t0, t0 + timedelta(days=2)))  # 2.4 MWh a day
    recompute_all(conn)
    both = gec("a", "cn1", 2, date(2026, 3, 1), date(2026, 3, 3)) + gec(
        "b", "cn1", 2, date(2026, 3, 1), date(2026, 3, 3), first=3
    )
    apply(conn, tmp_path, both)
    assert claims(conn) == pytest.approx({"a": 2000.0, "b": 2000.0})
    (tmp_path / "instruments.toml").write_text(
        gec("b", "cn1", 2, date(2026, 3, 1), date(2026, 3, 3), first=3)
    )
    monkeypatch.setenv("SCOPEMETER_DB__DSN", compute_dsn)
    capsys.readouterr()
    assert main(["instruments", "apply", str(tmp_path / "instruments.toml")]) == 0
    assert "1 applied, 1 retracted (retracted with their claims: a)" in capsys.readouterr().out
    # b now takes the first 20 hours, which a had.
    assert claims(conn) == pytest.approx({"b": 2000.0})
    first = conn.execute("SELECT min(bucket) FROM instrument_claims WHERE instrument_id = 'b'").fetchone()
    conn.commit()
    assert first == (t0,)
    assert conn.execute("SELECT count(*) FROM contractual_instruments").fetchone() == (1,)
    conn.commit()


def test_database_refuses_claims_beyond_an_instruments_volume(conn: Any, tmp_path: Path) -> None:
    apply(conn, tmp_path, gec("a", "cn1", 1, date(2026, 3, 1), date(2026, 3, 3)))
    with pytest.raises(psycopg.errors.CheckViolation, match="more than its 1 MWh"):
        conn.execute(
            "INSERT INTO instrument_claims VALUES ('a', 'cn1', 'electricity', '2026-03-01 00:00Z', 600),"
            " ('a', 'cn2', 'electricity', '2026-03-01 00:00Z', 600)"
        )
    conn.rollback()


def test_residual_fallback_excl_market_nonfossil_then_location(conn: Any, tmp_path: Path) -> None:
    """China publishes no residual mix: the uncovered rest uses MEE/NBS's factor excluding
    market-traded non-fossil power, for the national and the provincial site alike; without it, the
    location factor. Each hour says which."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    copy_rows(conn, constant("e1", "cn1", 100.0, t0, t0 + timedelta(hours=3)))
    copy_rows(conn, constant("e2", "cn2", 100.0, t0, t0 + timedelta(hours=3)))
    recompute_all(conn)
    rows = conn.execute("SELECT DISTINCT residual_basis, residual_factor_id FROM site_market_1h").fetchall()
    assert rows == [("location", "cn")] or sorted(rows) == [("location", "cn"), ("location", "cn-gd")]
    (tmp_path / "excl.toml").write_text(EXCL_FACTOR)
    apply_factors(conn, tmp_path / "excl.toml")
    apply(conn, tmp_path, gec("a", "cn1", 0 + 1, date(2026, 3, 1), date(2026, 3, 2), hourly=False))
    recompute_all(conn)
    got = conn.execute(
        "SELECT site_id, sum(kg_co2e), array_agg(DISTINCT residual_basis) FROM site_market_1h"
        " GROUP BY 1 ORDER BY 1"
    ).fetchall()
    conn.commit()
    # cn1: 300 kWh, all covered by the 1 MWh certificate; cn2: 300 kWh at the excl. factor.
    assert got[0][0] == "cn1" and got[0][1] == pytest.approx(0.0)
    assert (
        got[1][0] == "cn2"
        and got[1][1] == pytest.approx(300 * EXCL)
        and got[1][2] == ["excl-market-nonfossil"]
    )


def test_no_claims_once_the_site_leaves_the_market_boundary(conn: Any, tmp_path: Path) -> None:
    """A fleet change that moves a site out of an instrument's market stops its claims at the next
    recompute (criterion 5 is checked at claim time too, not only at load)."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    copy_rows(conn, constant("e1", "cn1", 100.0, t0, t0 + timedelta(hours=5)))
    recompute_all(conn)
    apply(conn, tmp_path, gec("a", "cn1", 1, date(2026, 3, 1), date(2026, 3, 3)))
    assert claims(conn) == pytest.approx({"a": 500.0})
    moved = FLEET.replace(
        'id = "cn1"\nsupplier = "acme"\nname = "Shenzhen"\ngrid_region = "CN"',
        'id = "cn1"\nsupplier = "acme"\nname = "Shenzhen"\ngrid_region = "HK"',
    )
    assert moved != FLEET
    (tmp_path / "fleet.toml").write_text(moved)
    apply_fleet(conn, tmp_path / "fleet.toml")
    recompute_all(conn)
    assert claims(conn) == {}
