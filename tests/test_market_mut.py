"""Fast, exact tests of compute/market.py for mutation testing (issue 17).

Expected values are worked out by hand in each test from the GHG Protocol Scope 2 Guidance
(WRI/WBCSD 2015), chapter 6 (market-based method: contractual instruments first, section 6.11
residual mix for the rest, the location-based factor as the last resort) and chapter 7, Table 7.1
(criteria 2: one claim per certificate, 4: vintage within the reporting period, 5: same market),
not copied from the code's output.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from pydantic import ValidationError

from compute.config import ConfigError
from compute.market import (
    Instrument,
    Rules,
    _ceil_hour,
    _floor_hour,
    _Hour,
    _Inst,
    _local_midnight,
    allocate,
    apply_instruments,
    connected_hull,
    load_instruments,
    rebuild_market,
    recompute_market_set,
    reporting_year,
    rule_problems,
    site_problem,
    within,
)
from compute.recompute import lock_site
from tests.test_compute_support import apply_registry, compute_dsn, reset

__all__ = ["compute_dsn"]

H = timedelta(hours=1)
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def inst(**kw: Any) -> Instrument:
    base: dict[str, Any] = {
        "id": "i1",
        "site": "s1",
        "kind": "ppa",
        "mwh": 1.0,
        "period_start": date(2026, 1, 1),
        "period_end": date(2027, 1, 1),
        "market_boundary": "CN",
        "reference": "r",
    }
    base.update(kw)
    return Instrument(**base)


# --- pure functions ---------------------------------------------------------------------------------


def test_within_is_region_or_subregion() -> None:
    assert within("CN", "CN") and within("CN-GD", "CN") and within("CN-GD-SZ", "CN-GD")
    assert not within("CNX", "CN") and not within("GB", "CN") and not within("CN", "CN-GD")


def test_reporting_year_starts_in_its_month() -> None:
    assert reporting_year(date(2026, 3, 31), 4) == 2025
    assert reporting_year(date(2026, 4, 1), 4) == 2026
    assert reporting_year(date(2026, 1, 1), 1) == 2026


def test_rule_problems_boundary_and_vintage() -> None:
    rules = Rules()
    gec = {
        "kind": "gec",
        "certificates": 1,
        "mwh": None,
        "serial_prefix": "G",
        "serial_first": 1,
        "serial_last": 1,
        "evidence": "e",
    }
    assert rule_problems(inst(**gec, market_boundary="CN-GD"), rules) == []
    assert rule_problems(inst(**gec, market_boundary="GB"), rules) == [
        "gec is valid only within CN, not market boundary GB"
    ]
    two = Rules(boundaries={"ppa": ["CN", "GB"]})
    assert rule_problems(inst(market_boundary="FR"), two) == [
        "ppa is valid only within CN, GB, not market boundary FR"
    ]
    assert rule_problems(inst(market_boundary="GB-SCT"), two) == []
    # end exclusive: 2026-01-01..2027-01-01 generates only in 2026
    assert rule_problems(inst(), rules) == []
    assert rule_problems(inst(period_end=date(2027, 1, 2)), rules) == [
        "generation period 2026-01-01..2027-01-02 is not within one reporting year (starting in month 1);"
        " split it per year"
    ]
    off = Rules(generation_within_reporting_year=False)
    assert rule_problems(inst(period_end=date(2027, 1, 2)), off) == []
    april = Rules(reporting_year_start_month=4)
    assert rule_problems(inst(period_start=date(2026, 4, 1), period_end=date(2027, 4, 1)), april) == []
    assert len(rule_problems(inst(period_start=date(2026, 3, 1), period_end=date(2026, 5, 1)), april)) == 1
    assert len(rule_problems(inst(), april)) == 1


def test_site_problem_names_site_region_and_boundary() -> None:
    assert site_problem(inst(market_boundary="CN"), "CN-GD") is None
    assert site_problem(inst(market_boundary="CN-GD"), "CN") == (
        "site 's1' is on grid region CN, outside the instrument's market boundary CN-GD"
    )


def test_instrument_checks_and_volume() -> None:
    assert inst(mwh=2.5).volume_mwh == 2.5
    gec = inst(
        kind="i-rec",
        mwh=None,
        certificates=3,
        serial_prefix="R",
        serial_first=10,
        serial_last=12,
        evidence="e",
    )
    assert gec.volume_mwh == 3.0 and isinstance(gec.volume_mwh, float)
    assert inst(kind="ppa", mwh=None, certificates=2).volume_mwh == 2.0
    cases: list[tuple[dict[str, Any], str]] = [
        ({"period_end": date(2026, 1, 1)}, "period_start 2026-01-01 must be before period_end 2026-01-01"),
        ({"serial_prefix": "P"}, "give all of serial_prefix, serial_first and serial_last, or none"),
        ({"serial_prefix": "P", "serial_first": 1}, "give all of serial_prefix"),
        ({"serial_first": 1, "serial_last": 2}, "give all of serial_prefix"),
        (
            {
                "kind": "i-rec",
                "mwh": None,
                "certificates": 3,
                "serial_prefix": "R",
                "serial_first": 10,
                "serial_last": 13,
                "evidence": "e",
            },
            "serials 10..13 are 4 certificates, not 3",
        ),
        ({"kind": "green-power-trade", "mwh": 1.0}, "green-power-trade volumes are counted in certificates"),
        ({"kind": "i-rec", "mwh": None, "certificates": 1}, "i-rec needs its serial range"),
        (
            {
                "kind": "i-rec",
                "mwh": None,
                "certificates": 1,
                "serial_prefix": "R",
                "serial_first": 1,
                "serial_last": 1,
            },
            r"i-rec needs its retirement evidence \(evidence = ...\)",
        ),
        ({"carrier": "natural_gas"}, "instruments are for Scope 2 carriers, not natural_gas"),
        ({"mwh": None}, r"give exactly one of certificates \(1 certificate = 1 MWh\) or mwh"),
    ]
    for kw, message in cases:
        with pytest.raises(ValidationError, match=message):
            inst(**kw)
    for carrier in ("electricity", "heat", "steam", "cooling"):
        assert inst(carrier=carrier).carrier.value == carrier


def test_hours_floor_ceil_and_local_midnight() -> None:
    t = datetime(2026, 11, 1, 10, 30, 15, 7, tzinfo=UTC)
    assert _floor_hour(t) == datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert _ceil_hour(t) == datetime(2026, 11, 1, 11, tzinfo=UTC)
    on = datetime(2026, 11, 1, 10, tzinfo=UTC)
    assert _floor_hour(on) == on and _ceil_hour(on) == on
    assert _ceil_hour(on + timedelta(microseconds=1)) == on + H
    m = _local_midnight(date(2026, 11, 1), ZoneInfo("Asia/Kolkata"))  # UTC+05:30
    assert m == datetime(2026, 10, 31, 18, 30, tzinfo=UTC)


def _i(
    iid: str,
    p0: datetime,
    p1: datetime,
    kwh: float = 1.0,
    hourly: bool = False,
    carrier: str = "electricity",
    kg: float = 0.0,
) -> _Inst:
    return _Inst(iid, carrier, kwh, kg, hourly, p0, p1)


def test_connected_hull_grows_through_overlaps_only() -> None:
    insts = [_i("a", T0, T0 + 6 * H), _i("b", T0 + 5 * H, T0 + 10 * H), _i("c", T0 + 12 * H, T0 + 13 * H)]
    # [1, 2) lies partly in a → [0, 6), which lies partly in b → [0, 10); c is not connected
    assert connected_hull(insts, T0 + H, T0 + 2 * H) == (T0, T0 + 10 * H)
    assert connected_hull(insts, T0 + 12 * H, T0 + 13 * H) == (T0 + 12 * H, T0 + 13 * H)  # wholly inside
    assert connected_hull(insts, T0 + 10 * H, T0 + 11 * H) == (T0 + 10 * H, T0 + 11 * H)  # b ends at 10
    assert connected_hull(insts, T0 + 11 * H, T0 + 12 * H) == (T0 + 11 * H, T0 + 12 * H)  # c starts at 12
    assert connected_hull(insts, T0 + 9 * H, T0 + 12 * H + 30 * timedelta(minutes=1)) == (T0, T0 + 13 * H)
    half = timedelta(minutes=30)  # periods of a site at UTC+05:30 start on the half hour
    k = [_i("k", T0 + 18 * H + half, T0 + 42 * H + half)]
    assert connected_hull(k, T0 + 20 * H, T0 + 21 * H) == (T0 + 18 * H, T0 + 43 * H)
    assert connected_hull([], T0, T0 + H) == (T0, T0 + H)


def test_allocate_hourly_first_then_time_order() -> None:
    e, q = "electricity", "heat"
    hours = {(e, T0 + k * H): _Hour(100.0, None, None) for k in range(4)}
    hours[(q, T0 + H)] = _Hour(50.0, None, None)
    insts = [
        _i("A", T0, T0 + 4 * H, kwh=120.0, hourly=True, kg=0.1),  # 30 kWh in each of 4 hours
        _i("B", T0 + H, T0 + 3 * H, kwh=250.0, kg=0.2),  # 70 + 70; 110 kWh left unused, period ends at 3
        _i("C", T0, T0 + 4 * H, kwh=500.0),  # the rest of hours 0 and 3; 1 and 2 are full
        _i("D", T0, T0 + 4 * H, kwh=20.0, carrier=q, kg=0.5),  # heat only
    ]
    allocate(hours, insts)
    want = {
        (e, T0): (100.0, 3.0, [("A", 30.0), ("C", 70.0)]),
        (e, T0 + H): (100.0, 3.0 + 14.0, [("A", 30.0), ("B", 70.0)]),
        (e, T0 + 2 * H): (100.0, 3.0 + 14.0, [("A", 30.0), ("B", 70.0)]),
        (e, T0 + 3 * H): (100.0, 3.0, [("A", 30.0), ("C", 70.0)]),
        (q, T0 + H): (20.0, 10.0, [("D", 20.0)]),
    }
    got = {k: (h.claimed, h.instrument_kg, h.claims) for k, h in hours.items()}
    assert got.keys() == want.keys()
    for k, (claimed, kg, claims) in want.items():
        assert got[k][0] == pytest.approx(claimed) and got[k][1] == pytest.approx(kg), k
        assert [c[0] for c in got[k][2]] == [c[0] for c in claims], k
        assert [c[1] for c in got[k][2]] == pytest.approx([c[1] for c in claims]), k


def test_allocate_stops_at_volume_and_skips_full_hours() -> None:
    e = "electricity"
    hours = {(e, T0 + k * H): _Hour(100.0, None, None) for k in range(3)}
    hours[(e, T0 + H)].claimed = 100.0  # already covered
    allocate(hours, [_i("E", T0, T0 + 3 * H, kwh=130.0, kg=1.0)])
    assert [hours[(e, T0 + k * H)].claimed for k in range(3)] == [100.0, 100.0, 30.0]
    assert [hours[(e, T0 + k * H)].claims for k in range(3)] == [[("E", 100.0)], [], [("E", 30.0)]]
    assert hours[(e, T0 + 2 * H)].instrument_kg == 30.0
    # an hourly instrument caps each hour at volume / period hours, none banked: 48 kWh over 24 h
    hours = {(e, T0 + k * H): _Hour(5.0 if k == 0 else 3.0, None, None) for k in range(2)}
    allocate(hours, [_i("F", T0, T0 + 24 * H, kwh=48.0, hourly=True)])
    assert [hours[(e, T0 + k * H)].claims for k in range(2)] == [[("F", 2.0)], [("F", 2.0)]]


def test_allocate_fractions_exhaustion_and_the_next_instrument() -> None:
    e = "electricity"
    hours = {(e, T0 + k * H): _Hour(kwh, None, None) for k, kwh in enumerate((100.0, 0.5, 100.0, 100.0))}
    # E: 100 + 0.5 + the last 0.25 kWh (under 1 kWh still counts), then used up in hour 2;
    # G (next in order) still gets 10 kWh of what is left of hour 2
    allocate(hours, [_i("E", T0, T0 + 4 * H, kwh=100.75), _i("G", T0, T0 + 4 * H, kwh=10.0)])
    assert [hours[(e, T0 + k * H)].claims for k in range(4)] == [
        [("E", 100.0)],
        [("E", 0.5)],
        [("E", 0.25), ("G", 10.0)],
        [],
    ]


def test_allocate_hourly_never_claims_beyond_its_volume() -> None:
    # 0.3 kWh over 24 h: 0.3 / 24 does not add up to 0.3 exactly in binary floating point; the
    # claims, summed in time order as the ledger adds them, must stay within the volume (criterion 2)
    e = "electricity"
    hours = {(e, T0 + k * H): _Hour(1.0, None, None) for k in range(24)}
    allocate(hours, [_i("P", T0, T0 + 24 * H, kwh=0.3, hourly=True)])
    claims = [c for k in range(24) for c in hours[(e, T0 + k * H)].claims]
    assert len(claims) == 24 and all(c[1] == pytest.approx(0.0125) for c in claims)
    assert sum(c[1] for c in claims) <= 0.3


# --- the database path: fallback hierarchy per hour ------------------------------------------------------

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"
""" + "".join(
    f'\n[[sites]]\nid = "{s}"\nsupplier = "acme"\nname = "{s}"\ngrid_region = "{r}"\ntimezone = "{tz}"\n'
    for s, r, tz in (
        ("gd", "CN-GD", "Asia/Shanghai"),
        ("bj", "CN-BJ", "Asia/Shanghai"),
        ("gb", "GB", "UTC"),
        ("fr", "FR", "Europe/Paris"),
    )
)


def _factor(fid: str, series: str, region: str, kg: float) -> str:
    return (
        f'\n[[factors]]\nid = "{fid}"\npublisher = "test"\nseries = "{series}"\nregion = "{region}"\n'
        'carrier = "electricity"\nvalid_from = 2022-01-01\nvalid_to = 2100-01-01\ndata_year = 2022\n'
        f'kg_co2_per_unit = {kg}\ngases = "CO2"\ngwp_set = "none"\nunit = "kWh"\n'
        'version = 1\nsource = "test"\n'
    )


# Test factors (made-up values): a residual mix for CN-GD only, the China-wide factor excluding
# market-traded non-fossil power (MEE/NBS series) for every other CN region, nothing of the kind for GB or FR.
FACTORS = (
    _factor("cn-loc", "national-power-average", "CN", 0.5)
    + _factor("gd-res", "residual-mix", "CN-GD", 0.7)
    + _factor("cn-excl", "national-power-average-excl-market-nonfossil", "CN", 0.6)
    + _factor("gd-excl", "national-power-average-excl-market-nonfossil", "CN-GD", 0.65)
    + _factor("gb-loc", "national-power-average", "GB", 0.2)
)

INSTRUMENTS = """
[[instruments]]
id = "gd-ppa"
site = "gd"
kind = "ppa"
mwh = 0.15
kg_co2e_per_kwh = 0.1
period_start = 2026-11-01
period_end = 2026-11-02
market_boundary = "CN"
reference = "test"

[[instruments]]
id = "fr-ppa"
site = "fr"
kind = "ppa"
mwh = 2.4
hourly = true
period_start = 2026-11-01
period_end = 2026-11-02
market_boundary = "FR"
reference = "test"
"""

Q = timedelta(minutes=15)
P = datetime(2026, 11, 1, 2, tzinfo=UTC)  # 10:00 in Shanghai, 03:00 in Paris: all on 1 November


def _rollups() -> list[tuple[str, datetime, float, float | None, str | None]]:
    """Location-based quarter hours (site, bucket, kWh, kg, factor)."""
    out: list[tuple[str, datetime, float, float | None, str | None]] = []
    for k in range(8):  # gd: 25 kWh a quarter, two hours of 100 kWh; CN 0.5
        out.append(("gd", P + k * Q, 25.0, 12.5, "cn-loc"))
    out.append(("bj", P, 80.0, 40.0, "cn-loc"))
    out += [("gb", P + k * Q, 10.0, 2.0, "gb-loc") for k in range(4)]  # gb hour 1: 40 kWh, 8 kg
    out += [("gb", P + H, 10.0, 2.0, "gb-loc"), ("gb", P + H + Q, 10.0, None, None)]  # part unknown
    out += [
        ("fr", P, 60.0, None, None),
        ("fr", P + H, 130.0, None, None),
        ("fr", datetime(2026, 10, 31, 22, tzinfo=UTC), 10.0, None, None),
    ]  # 23:00 in Paris, 31 Oct
    return out


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, FACTORS)
        with c.transaction(), c.cursor() as cur:
            cur.executemany(
                "INSERT INTO site_rollups_15m (site_id, bucket, carrier, scope, method, kwh, kg_co2e,"
                " factor_id)"
                " VALUES (%s, %s, 'electricity', 2, 'location', %s, %s, %s)",
                _rollups(),
            )
        yield c


def _market(c: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    rows = c.execute(
        "SELECT site_id, bucket, carrier, kwh, kwh_instruments, kg_co2e, residual_factor_id, instrument_ids,"
        " residual_basis FROM site_market_1h ORDER BY site_id, bucket"
    ).fetchall()
    c.commit()
    return rows


def _claims(c: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    rows = c.execute(
        "SELECT instrument_id, site_id, carrier, bucket, kwh FROM instrument_claims ORDER BY 1, 4"
    ).fetchall()
    c.commit()
    return rows


E = "electricity"
# gd: 150 kWh PPA at 0.1: hour 1 fully covered (100 kWh, 10 kg; nothing left for the residual mix),
# hour 2 50 kWh (5 kg) + 50 kWh at the CN-GD residual mix 0.7 (35 kg), which ranks above the
# region's own excl-non-fossil factor. bj: no residual mix → the CN excl-non-fossil factor 0.6 on
# 80 kWh. gb: neither → location-based (8 kg; unknown where a quarter has no factor). fr: nothing
# but the hourly PPA (2400 kWh / 24 h = 100 kWh an hour): 60 kWh fully covered (0 kg, no residual),
# 130 kWh → 30 kWh with no factor at all (unknown), the hour before the period unknown.
WANT = [
    ("bj", P, E, 80.0, 0.0, 48.0, "cn-excl", [], "excl-market-nonfossil"),
    ("fr", datetime(2026, 10, 31, 22, tzinfo=UTC), E, 10.0, 0.0, None, None, [], None),
    ("fr", P, E, 60.0, 60.0, 0.0, None, ["fr-ppa"], None),
    ("fr", P + H, E, 130.0, 100.0, None, None, ["fr-ppa"], None),
    ("gb", P, E, 40.0, 0.0, 8.0, "gb-loc", [], "location"),
    ("gb", P + H, E, 20.0, 0.0, None, None, [], None),
    ("gd", P, E, 100.0, 100.0, 10.0, "gd-res", ["gd-ppa"], "residual-mix"),
    ("gd", P + H, E, 100.0, 50.0, 40.0, "gd-res", ["gd-ppa"], "residual-mix"),
]
WANT_CLAIMS = [
    ("fr-ppa", "fr", E, P, 60.0),
    ("fr-ppa", "fr", E, P + H, 100.0),
    ("gd-ppa", "gd", E, P, 100.0),
    ("gd-ppa", "gd", E, P + H, 50.0),
]


def _same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        for a, b in zip(g, w, strict=True):
            if isinstance(b, float):
                assert a == pytest.approx(b, abs=1e-9), (g, w)
            else:
                assert a == b, (g, w)


def test_market_hierarchy_per_hour(conn: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "instruments.toml").write_text(INSTRUMENTS)
    applied = apply_instruments(conn, tmp_path / "instruments.toml")
    assert applied.upserted == 2 and applied.retracted == [] and applied.sites == ["fr", "gd"]
    got = _market(conn)
    _same(got, [w for w in WANT if w[0] in ("fr", "gd")])  # only the sites with instruments rebuilt
    _same(_claims(conn), WANT_CLAIMS)
    assert conn.execute(
        "SELECT instrument_id, evidence FROM contractual_instruments ORDER BY 1"
    ).fetchall() == [("fr-ppa", ""), ("gd-ppa", "")]
    with conn.transaction(), conn.cursor() as cur:
        assert rebuild_market(cur, []) == 0
        assert recompute_market_set(cur, [("no-such-site", P, P + H)]) == 0
        assert rebuild_market(cur) == len(WANT)  # all sites, bulk-loaded
    _same(_market(conn), WANT)
    _same(_claims(conn), WANT_CLAIMS)
    with conn.transaction(), conn.cursor() as cur:
        assert rebuild_market(cur, ["gb", "fr"]) == 5
    _same(_market(conn), WANT)
    _same(_claims(conn), WANT_CLAIMS)
    # the site moved out of the instrument's market boundary: no claims, nothing else changes
    conn.execute("UPDATE sites SET grid_region = 'DE' WHERE site_id = 'fr'")
    with caplog.at_level(logging.WARNING, "scopemeter.compute"), conn.transaction(), conn.cursor() as cur:
        assert rebuild_market(cur, ["fr", "gd"]) == 5
    assert [r.getMessage() for r in caplog.records] == [
        "instrument fr-ppa: site fr is on DE, outside market boundary FR: no claims"
    ]
    got = _market(conn)
    _same([r for r in got if r[0] == "gd"], [w for w in WANT if w[0] == "gd"])
    assert [(r[1], r[4], r[5], r[7]) for r in got if r[0] == "fr"] == [
        (datetime(2026, 10, 31, 22, tzinfo=UTC), 0.0, None, []),
        (P, 0.0, None, []),
        (P + H, 0.0, None, []),
    ]
    _same(_claims(conn), WANT_CLAIMS[2:])
    # retracting an instrument deletes its claims and re-allocates its site
    (tmp_path / "instruments.toml").write_text(INSTRUMENTS.split('\n[[instruments]]\nid = "fr-ppa"')[0])
    applied = apply_instruments(conn, tmp_path / "instruments.toml")
    assert applied.upserted == 1 and applied.retracted == ["fr-ppa"] and applied.sites == ["fr", "gd"]
    _same(_claims(conn), WANT_CLAIMS[2:])


def test_load_instruments_lines_dupes_and_serial_overlaps(tmp_path: Path) -> None:
    def cert(iid: str, first: int, last: int, prefix: str = "G") -> str:
        return (
            f'[[instruments]]\nid = "{iid}"\nsite = "s1"\nkind = "gec"\ncertificates = {last - first + 1}\n'
            f'serial_prefix = "{prefix}"\nserial_first = {first}\nserial_last = {last}\nevidence = "e"\n'
            'period_start = 2026-01-01\nperiod_end = 2027-01-01\nmarket_boundary = "CN"\nreference = "r"\n\n'
        )

    p = tmp_path / "instruments.toml"
    p.write_text("# ledger\n\n" + cert("a", 1, 10) + cert("b", 11, 20) + cert("c", 1, 5, "H"))
    ledger = load_instruments(p)
    assert [i.id for i in ledger.instruments] == ["a", "b", "c"]
    assert ledger.lines == {"a": 3, "b": 17, "c": 31} and ledger.where("b") == f"{p}:17"
    assert ledger.where("zz") == f"{p}:0"
    assert ledger.rules == Rules()
    # c lies within a, b shares serial 10 with a: each pair named once, the later one first
    p.write_text(cert("a", 1, 10) + cert("b", 10, 20) + cert("c", 2, 3) + cert("d", 21, 21))
    with pytest.raises(ConfigError) as e:
        load_instruments(p)
    assert str(e.value).splitlines() == [
        f"{p}:29: instrument 'c' serials G 2..3 overlap instrument 'a' ({p}:1) G 1..10:"
        " a certificate can be claimed once",
        f"{p}:15: instrument 'b' serials G 10..20 overlap instrument 'a' ({p}:1) G 1..10:"
        " a certificate can be claimed once",
    ]
    p.write_text(cert("a", 1, 1) + cert("a", 2, 2))
    with pytest.raises(ConfigError, match=r"duplicate instrument ids \['a'\]"):
        load_instruments(p)
    p.write_text(cert("a", 1, 1).replace("2027-01-01", "2027-02-01") + "[rules]\nboundaries = {}\n")
    with pytest.raises(ConfigError) as e:
        load_instruments(p)
    assert str(e.value) == (
        f"{p}:1: instrument 'a': generation period 2026-01-01..2027-02-01 is not within one reporting"
        " year (starting in month 1); split it per year"
    )
    p.write_text(cert("a", 1, 1) + "[other]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: unknown top-level keys ['other']")):
        load_instruments(p)
    p.write_text(cert("a", 1, 1).replace('kind = "gec"', 'kind = "coupon"'))
    with pytest.raises(ConfigError, match=re.escape(f"{p}: ")):
        load_instruments(p)
    p.write_text(cert("a", 1, 1) + "[rules]\nreporting_year_start_month = 13\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: [rules]: ")):
        load_instruments(p)
    p.write_text(
        cert("a", 1, 1).replace("2027-01-01", "2027-02-01")
        + "[rules]\ngeneration_within_reporting_year = false\n"
    )
    assert load_instruments(p).rules == Rules(generation_within_reporting_year=False)
    # entries written as an inline array have no [[instruments]] header line: line 0
    inline = (
        "instruments = [{"
        + ", ".join(
            line
            for line in cert("a", 1, 1).replace('"\n', '",').replace("\n", ",").split(",")[1:]
            if line.strip()
        )
        + "}]\n"
    )
    p.write_text(inline)
    assert load_instruments(p).lines == {"a": 0}
    # serial 0 exists (a registry may start there): 0..0 and 1..1 are apart, 0..0 and 0..3 overlap
    p.write_text(cert("z", 0, 0) + cert("y", 1, 1))
    assert [i.id for i in load_instruments(p).instruments] == ["z", "y"]
    p.write_text(cert("z", 0, 5) + cert("a", 1, 1))
    with pytest.raises(
        ConfigError, match=re.escape(f"{p}:15: instrument 'a' serials G 1..1 overlap instrument 'z'")
    ):
        load_instruments(p)
    p.write_text(cert("a", 0, 0) + cert("b", 0, 3))
    with pytest.raises(
        ConfigError, match=re.escape(f"{p}:15: instrument 'b' serials G 0..3 overlap instrument 'a'")
    ):
        load_instruments(p)


def test_apply_refusals_name_file_line_and_change_nothing(conn: Any, tmp_path: Path) -> None:
    p = tmp_path / "instruments.toml"
    p.write_text(
        INSTRUMENTS
        + '\n[[instruments]]\nid = "x1"\nsite = "nope"\nkind = "ppa"\nmwh = 1.0\nperiod_start = 2026-11-01\n'
        'period_end = 2026-11-02\nmarket_boundary = "CN"\nreference = "r"\n'
        '\n[[instruments]]\nid = "x2"\nsite = "gb"\nkind = "ppa"\nmwh = 1.0\nperiod_start = 2026-11-01\n'
        'period_end = 2026-11-02\nmarket_boundary = "FR"\nreference = "r"\n'
    )
    # INSTRUMENTS has its headers on lines 2 and 13; x1 follows on 24, x2 on 34
    with pytest.raises(ConfigError) as e:
        apply_instruments(conn, p)
    assert str(e.value).splitlines() == [
        f"{p}:24: instrument 'x1': unknown site 'nope' (apply the fleet first)",
        f"{p}:34: instrument 'x2': site 'gb' is on grid region GB, outside the instrument's market"
        " boundary FR",
    ]
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM contractual_instruments").fetchone() == (0,)
    assert _market(conn) == [] and _claims(conn) == []


def test_apply_waits_for_the_site_lock_of_a_recompute(conn: Any, tmp_path: Path, compute_dsn: str) -> None:
    """The ledger re-allocates a site only while no recompute of it runs (the same advisory lock)."""
    (tmp_path / "instruments.toml").write_text(INSTRUMENTS)
    with psycopg.connect(compute_dsn) as other:
        lock_site(other.cursor(), "fr")  # held until other's transaction ends
        conn.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            apply_instruments(conn, tmp_path / "instruments.toml")
        conn.rollback()
        other.rollback()
    apply_instruments(conn, tmp_path / "instruments.toml")
    conn.execute("RESET lock_timeout")
    conn.commit()
    _same(_claims(conn), WANT_CLAIMS)


def test_site_rebuild_does_not_lock_out_readers(conn: Any, tmp_path: Path, compute_dsn: str) -> None:
    """Re-allocating some sites locks their rows only: statements of other sites still read (the
    table-wide ACCESS EXCLUSIVE lock of a bulk load is for the full rebuild alone)."""
    (tmp_path / "instruments.toml").write_text(INSTRUMENTS)
    apply_instruments(conn, tmp_path / "instruments.toml")
    with psycopg.connect(compute_dsn) as other, conn.transaction(), conn.cursor() as cur:
        assert rebuild_market(cur, ["fr"]) == 3  # not committed yet: its locks are held
        other.execute("SET lock_timeout = '200ms'")
        assert other.execute("SELECT count(*) FROM site_market_1h WHERE site_id = 'gd'").fetchone() == (2,)
        assert other.execute("SELECT count(*) FROM instrument_claims WHERE site_id = 'gd'").fetchone() == (2,)
        other.rollback()
