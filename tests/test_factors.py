"""The emission factor library: every factor says what it is, vintages chain, applies are immutable,
and the shipped values equal the publishers' figures (typed here from the publishers' files)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import psycopg
import pytest

from compute.config import ConfigError
from compute.factors import Factor, apply_factors, load_factors
from compute.recompute import FACTOR_LOOKUP
from tests.test_compute_support import REPO, compute_dsn, reset

__all__ = ["compute_dsn"]

LIBRARY = REPO / "config" / "factors.toml"

BASE = """
[[factors]]
id = "cn-2022-v1"
publisher = "China MEE / NBS"
series = "national-power-average"
region = "CN"
carrier = "electricity"
unit = "kWh"
data_year = 2022
valid_from = 2022-01-01
valid_to = 2023-01-01
version = 1
gases = "CO2"
gwp_set = "none"
kg_co2_per_unit = 0.5366
source = "test"
"""

# A per-m3 DESNZ-like fuel factor with everything a fuel needs.
GAS = """
[[factors]]
id = "ng"
publisher = "UK DESNZ"
series = "ghg-conversion-factors"
region = "GB"
carrier = "natural_gas"
unit = "m3"
data_year = 2022
valid_from = 2022-01-01
valid_to = 2023-01-01
version = 1
gases = "CO2e"
gwp_set = "AR4"
kg_co2_per_unit = 2.0
kg_ch4_per_unit = 0.001
kg_n2o_per_unit = 0.0001
cv_basis = "net"
ncv = 10.0
ncv_unit = "kWh (net CV) per m3"
ncv_source = "test"
reference_conditions = "15C-101.325kPa"
source = "test"
"""


def entry(base: str = BASE, **changes: object) -> str:
    lines = []
    for line in base.strip().splitlines()[1:]:
        key = line.split("=")[0].strip()
        if key in changes:
            value = changes.pop(key)
            if value is None:
                continue
            line = f"{key} = {value}"
        lines.append(line)
    lines += [f"{k} = {v}" for k, v in changes.items()]
    return "[[factors]]\n" + "\n".join(lines) + "\n"


def write(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / "factors.toml"
    path.write_text("\n".join(entries))
    return path


def test_repo_library_loads() -> None:
    factors = load_factors(LIBRARY)
    assert any(f.series == "national-power-average" and f.region == "CN" for f in factors)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"carrier": '"plutonium"'}, "carrier"),
        ({"kg_co2_per_unit": "-1.0"}, "kg_co2_per_unit"),
        ({"kg_co2_per_unit": "nan"}, "kg_co2_per_unit"),
        ({"kg_co2_per_unit": None}, "kg_co2_per_unit is required"),
        ({"valid_to": "2021-01-01"}, "must be before"),
        ({"unit": '"MWh"'}, "per kWh"),
        ({"version": "0"}, "version"),
        ({"id": None}, "id: Field required"),
        ({"colour": '"green"'}, "colour: Extra inputs are not permitted"),
        ({"id": '"has space"'}, "id"),
        ({"publisher": None}, "publisher: Field required"),
        ({"series": None}, "series: Field required"),
        ({"data_year": None}, "data_year: Field required"),
        ({"gases": None}, "gases: Field required"),
        ({"gwp_set": None}, "gwp_set: Field required"),
        ({"source": None}, "source: Field required"),
        ({"region": '"UK"'}, "the United Kingdom is 'GB'"),
        ({"region": '"China"'}, "not an ISO 3166 code"),
        ({"gwp_set": '"AR5"'}, 'gases = "CO2" factors have no CH4/N2O parts'),
        ({"gases": '"CO2e"'}, 'gases = "CO2e" needs'),
        ({"cv_basis": '"gross"'}, "electricity is not a fuel"),
    ],
)
def test_bad_entry_named_in_error(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    # Two comment lines first: the error must give the line of the entry's [[factors]] header.
    path = write(tmp_path, "# library\n# of factors\n", entry(BASE, **changes))
    with pytest.raises(ConfigError, match=message) as err:
        load_factors(path)
    assert str(path) in str(err.value)
    assert "line 4" in str(err.value)
    if "id" not in changes:
        assert "'cn-2022-v1'" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cv_basis": None}, "fuel factors need cv_basis"),
        ({"ncv": None}, "needs ncv, ncv_unit and ncv_source"),
        ({"ncv_source": None}, "needs ncv, ncv_unit and ncv_source"),
        ({"reference_conditions": None}, "reference_conditions are required for per-m3"),
        ({"reference_conditions": '"25C"'}, "reference_conditions"),
        ({"kg_n2o_per_unit": None}, 'gases = "CO2e" needs'),
        ({"gwp_set": '"none"'}, 'gases = "CO2e" needs'),
        ({"unit": '"t"'}, "fuel factors are per"),
    ],
)
def test_fuel_factor_must_state_its_basis(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_factors(write(tmp_path, entry(GAS, **changes)))
    assert "line 1: factor 'ng'" in str(err.value)


def test_coal_needs_its_type_and_kwh_fuel_needs_no_ncv(tmp_path: Path) -> None:
    coal = entry(GAS, carrier='"coal"', unit='"kg"', reference_conditions=None)
    with pytest.raises(ConfigError, match="coal factors need a fuel_type"):
        load_factors(write(tmp_path, coal))
    typed = entry(GAS, carrier='"coal"', unit='"kg"', reference_conditions=None, fuel_type='"industrial"')
    kwh = entry(GAS, id='"ng-kwh"', unit='"kWh"', reference_conditions=None, ncv=None, ncv_unit=None)
    assert [f.id for f in load_factors(write(tmp_path, typed, kwh))] == ["ng", "ng-kwh"]


@pytest.mark.parametrize(
    ("gwp", "ch4", "n2o"), [("AR4", 25.0, 298.0), ("AR5", 28.0, 265.0), ("AR6", 29.8, 273.0)]
)
def test_co2e_from_gases_uses_the_stated_gwp_set(tmp_path: Path, gwp: str, ch4: float, n2o: float) -> None:
    (f,) = load_factors(write(tmp_path, entry(GAS, gwp_set=f'"{gwp}"')))
    assert f.kg_co2e_per_unit == pytest.approx(2.0 + 0.001 * ch4 + 0.0001 * n2o)
    with pytest.raises(ConfigError, match="disagrees with the gases"):
        load_factors(write(tmp_path, entry(GAS, gwp_set=f'"{gwp}"', kg_co2e_per_unit="2.0")))


def test_co2_only_factor_is_its_co2(tmp_path: Path) -> None:
    (f,) = load_factors(write(tmp_path, entry()))
    assert (f.gases, f.gwp_set, f.kg_co2e_per_unit, f.kg_ch4_per_unit) == ("CO2", "none", 0.5366, None)


def test_vintages_must_chain(tmp_path: Path) -> None:
    nxt = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2023-01-01", valid_to="2024-01-01")
    assert len(load_factors(write(tmp_path, entry(), nxt))) == 2
    overlap = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2022-06-01", valid_to="2024-01-01")
    with pytest.raises(ConfigError, match=r"'cn-2022-v1' \(line 1\).* overlaps 'cn-2023-v1' \(line 17\)"):
        load_factors(write(tmp_path, entry(), overlap))
    gap = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2023-02-01", valid_to="2024-01-01")
    with pytest.raises(ConfigError, match="leaves a gap before 'cn-2023-v1'"):
        load_factors(write(tmp_path, entry(), gap))


def test_a_revision_is_a_version_of_its_vintage(tmp_path: Path) -> None:
    """A revised 2022 value overlaps only its own vintage; once a 2023 vintage exists, the revision
    of 2022 must end where 2023 begins (it cannot reach over the newer vintage)."""
    nxt = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2023-01-01", valid_to="2024-01-01")
    revision = entry(id='"cn-2022-v2"', version="2", kg_co2_per_unit="0.55")
    factors = load_factors(write(tmp_path, entry(), revision, nxt))
    assert [f.id for f in factors] == ["cn-2022-v1", "cn-2022-v2", "cn-2023-v1"]
    reaching = entry(id='"cn-2022-v2"', version="2", valid_to="2030-01-01")
    with pytest.raises(ConfigError, match=r"'cn-2022-v2'.* overlaps 'cn-2023-v1'"):
        load_factors(write(tmp_path, entry(), reaching, nxt))
    same_version = entry(id='"cn-2022-again"', kg_co2_per_unit="0.55")
    with pytest.raises(ConfigError, match="both version 1 of vintage 2022"):
        load_factors(write(tmp_path, entry(), same_version))


def test_other_series_region_or_unit_are_separate_series(tmp_path: Path) -> None:
    other_series = entry(id='"cn-2022-stat-v1"', series='"statistical"')
    other_region = entry(id='"cn-2022-yn-v1"', region='"CN-YN"')
    grid = entry(id='"cn-2022-north-v1"', region='"CN-North"')
    assert len(load_factors(write(tmp_path, entry(), other_series, other_region, grid))) == 4


def test_duplicate_id_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate factor id 'cn-2022-v1'"):
        load_factors(write(tmp_path, entry(), entry(series='"x"')))


def test_invalid_toml_and_unknown_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_factors(write(tmp_path, "[[factors]\n"))
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        load_factors(write(tmp_path, entry(), "[[factor]]\nid = 'x'\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_factors(tmp_path / "missing.toml")


def test_apply_is_idempotent_and_immutable(compute_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        path = write(tmp_path, entry())
        first = apply_factors(conn, path)
        assert (first.inserted, first.updated, first.unchanged) == (1, 0, 0)
        again = apply_factors(conn, path)
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, 1)
        # The citation may be corrected in place ...
        fixed = apply_factors(conn, write(tmp_path, entry(source='"MEE 2024-04"')))
        assert fixed.updated == 1
        # ... the number, the gases or the GWP set may not: that is a new version.
        for change in ({"kg_co2_per_unit": "0.6"}, {"data_year": "2021"}):
            with pytest.raises(ConfigError, match="immutable"):
                apply_factors(conn, write(tmp_path, entry(**change)))
        rows = conn.execute(
            "SELECT factor_id, kg_co2e_per_unit, kg_co2_per_unit, gases, gwp_set, source"
            " FROM emission_factors"
        ).fetchall()
        assert rows == [("cn-2022-v1", 0.5366, 0.5366, "CO2", "none", "MEE 2024-04")]


def test_apply_rejects_overlap_with_factor_already_in_db(compute_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_factors(conn, write(tmp_path, entry()))
        other_vintage = entry(id='"cn-2021-renamed"', data_year="2021")
        with pytest.raises(ConfigError, match="already in the database"):
            apply_factors(conn, write(tmp_path, other_vintage))
        assert conn.execute("SELECT count(*) FROM emission_factors").fetchone() == (1,)


def test_repo_library_applies_with_its_metadata(compute_dsn: str) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        result = apply_factors(conn, LIBRARY)
        assert result.inserted == len(load_factors(LIBRARY))
        row = conn.execute(
            "SELECT gases, gwp_set, cv_basis, reference_conditions, ncv_unit FROM emission_factors"
            " WHERE factor_id = 'gb-desnz-2022-natural-gas-m3-v1'"
        ).fetchone()
        assert row == ("CO2e", "AR4", "net", "15C-101.325kPa", "kWh (net CV) per m3")


# The publishers' figures, typed from their documents (not read from the library): MEE/NBS 2023
# announcement (公告2025年第47号), attachment "2023年电力二氧化碳排放因子", Tables 1, 2, 4, 5, kgCO2/kWh.
CN_2023 = {
    ("national-power-average", "CN"): 0.5306,
    ("national-power-average-excl-market-nonfossil", "CN"): 0.6096,
    ("national-fossil-power", "CN"): 0.8273,
    ("national-power-average", "CN-North"): 0.6361,
    ("national-power-average", "CN-Northeast"): 0.5122,
    ("national-power-average", "CN-East"): 0.5500,
    ("national-power-average", "CN-Central"): 0.5271,
    ("national-power-average", "CN-Northwest"): 0.5543,
    ("national-power-average", "CN-South"): 0.4042,
    ("national-power-average", "CN-Southwest"): 0.2472,
}
# Table 3 of the same attachment (provincial averages, 30 provinces; Tibet is not published), by
# ISO 3166-2 code.
CN_2023_PROVINCES = {
    "CN-BJ": 0.5554, "CN-TJ": 0.6796, "CN-HE": 0.6516, "CN-SX": 0.6634, "CN-NM": 0.6479,
    "CN-LN": 0.4878, "CN-JL": 0.4671, "CN-HL": 0.5229, "CN-SH": 0.5737, "CN-JS": 0.5827,
    "CN-ZJ": 0.4974, "CN-AH": 0.6553, "CN-FJ": 0.4211, "CN-JX": 0.5836, "CN-SD": 0.6191,
    "CN-HA": 0.5897, "CN-HB": 0.4044, "CN-HN": 0.4976, "CN-GD": 0.4419, "CN-GX": 0.4476,
    "CN-HI": 0.3648, "CN-CQ": 0.5581, "CN-SC": 0.1564, "CN-GZ": 0.5683, "CN-YN": 0.1333,
    "CN-SN": 0.6335, "CN-GS": 0.4471, "CN-QH": 0.1796, "CN-NX": 0.6187, "CN-XJ": 0.6021,
}  # fmt: skip
# 2021 (公告2024年第12号) and 2022 (公告2024年第33号), as given by the transcriptions the library cites
# (their attachments were not found, so these stay UNVERIFIED): a sample per table.
CN_2021_2022 = {
    (2021, "national-power-average", "CN-North"): 0.7120,
    (2021, "national-power-average", "CN-Southwest"): 0.2113,
    (2021, "national-power-average", "CN-HE"): 0.7901,
    (2021, "national-power-average", "CN-YN"): 0.1235,
    (2021, "national-fossil-power", "CN"): 0.8426,
    (2022, "national-power-average", "CN-South"): 0.3869,
    (2022, "national-power-average", "CN-GD"): 0.4403,
    (2022, "national-power-average", "CN-YN"): 0.1073,
    (2022, "national-power-average", "CN-SC"): 0.1404,
    (2022, "national-fossil-power", "CN"): 0.8325,
    (2022, "national-power-average-excl-market-nonfossil", "CN"): 0.5856,
}


def test_china_2023_series_is_the_published_one() -> None:
    lib = [f for f in load_factors(LIBRARY) if f.publisher == "China MEE / NBS" and f.data_year == 2023]
    got = {(f.series, f.region): f.kg_co2e_per_unit for f in lib}
    assert got == CN_2023 | {("national-power-average", r): v for r, v in CN_2023_PROVINCES.items()}
    # All 2023 values were checked against the attachment itself.
    assert not [f.id for f in lib if "UNVERIFIED" in f.source]
    # 2023 and later activity at a national-average site must use 2023, not 2022 (0.5366).
    national = {
        f.data_year: f
        for f in load_factors(LIBRARY)
        if f.series == "national-power-average" and f.region == "CN"
    }
    assert (national[2022].valid_to, national[2023].valid_from) == (
        national[2023].valid_from,
        national[2023].valid_from,
    )
    assert all(f.gases == "CO2" and f.gwp_set == "none" for f in national.values())


def test_china_2021_2022_regions_and_provinces_chain_into_2023() -> None:
    """Every region and province has 2021, 2022 and 2023 (the newest version of 2022 ends where 2023
    begins); values not read from the publisher's attachment say UNVERIFIED."""
    cn = [f for f in load_factors(LIBRARY) if f.publisher == "China MEE / NBS"]
    newest: dict[tuple[str, str, int], Factor] = {}
    for f in sorted(cn, key=lambda f: f.version):
        newest[(f.series, f.region, f.data_year)] = f
    for (year, series, region), value in CN_2021_2022.items():
        f = newest[(series, region, year)]
        assert f.kg_co2_per_unit == value, (year, region)
        assert "UNVERIFIED" in f.source
    regions = [
        f"CN-{g}" for g in ("North", "Northeast", "East", "Central", "Northwest", "South", "Southwest")
    ]
    for region in [*regions, *CN_2023_PROVINCES]:
        years = [newest[("national-power-average", region, y)] for y in (2021, 2022, 2023)]
        assert [(f.valid_from, f.valid_to) for f in years] == [
            (date(2021, 1, 1), date(2022, 1, 1)),
            (date(2022, 1, 1), date(2023, 1, 1)),
            (date(2023, 1, 1), date(2027, 1, 1)),
        ], region
    assert newest[("national-power-average", "CN-YN", 2022)].version == 3
    assert all("UNVERIFIED" in f.source for f in cn if f.data_year in (2021, 2022))


def test_a_yunnan_site_gets_its_provinces_factor_of_the_year(compute_dsn: str) -> None:
    """The 2022 Yunnan factor applied before 2023 was added (v2, valid to 2027) is still in the
    database; the lookup must give 2023's value (0.1333) for 2024 activity and v3 for 2022."""
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_factors(conn, LIBRARY)
        lookup = (
            "SELECT f.factor_id, f.kg_co2e_per_unit FROM (SELECT 'electricity'::text AS carrier,"
            " 'kWh'::text AS unit, ''::text AS cv_basis, ''::text AS refc, ''::text AS fuel_type,"
            " 2 AS scope) e, (SELECT 'CN-YN'::text AS grid_region, NULL::text AS factor_series,"
            " NULL::text AS fuel_series) s,"
            " LATERAL ({}) f"
        )
        sql = lookup.format(FACTOR_LOOKUP.format(day="%(day)s::date"))
        args = {"series": "national-power-average", "fuel_series": "ipcc-2006-default"}
        for day, expected in (
            ("2021-06-01", ("cn-mee-stat-2021-yunnan-v1", 0.1235)),
            ("2022-06-01", ("cn-mee-stat-2022-yunnan-v3", 0.1073)),
            ("2024-06-01", ("cn-mee-stat-2023-yunnan-v1", 0.1333)),
        ):
            assert conn.execute(sql, {**args, "day": day}).fetchone() == expected
        assert conn.execute(sql, {**args, "day": "2027-06-01"}).fetchone() is None


# DESNZ/BEIS flat files, 'Factors by Category' (kg CO2e per unit): (year, carrier, unit, basis) → value.
DESNZ = {
    (2020, "electricity", "kWh", ""): 0.23314,
    (2021, "electricity", "kWh", ""): 0.21233,
    (2022, "electricity", "kWh", ""): 0.19338,
    (2023, "electricity", "kWh", ""): 0.20707,
    (2024, "electricity", "kWh", ""): 0.20705,
    (2020, "natural_gas", "kWh", "gross"): 0.18387,
    (2021, "natural_gas", "kWh", "gross"): 0.18316,
    (2022, "natural_gas", "kWh", "gross"): 0.18254,
    (2023, "natural_gas", "kWh", "gross"): 0.18293,
    (2024, "natural_gas", "kWh", "gross"): 0.18290,
    (2022, "natural_gas", "kWh", "net"): 0.20227,
    (2022, "natural_gas", "m3", "net"): 2.01574,
    (2024, "natural_gas", "m3", "net"): 2.04542,
    (2022, "diesel", "l", "net"): 2.69880,
    (2023, "lpg", "l", "net"): 1.55713,
}


def test_desnz_values_and_gwp_sets_are_the_published_ones() -> None:
    lib: dict[tuple[int, str, str, str, str], Factor] = {
        (f.data_year, f.carrier.value, f.unit, str(f.cv_basis or ""), f.fuel_type): f
        for f in load_factors(LIBRARY)
        if f.publisher == "UK DESNZ"
    }
    for (year, carrier, unit, basis), value in DESNZ.items():
        f = lib[(year, carrier, unit, basis, "")]
        assert f.kg_co2e_per_unit == pytest.approx(value, abs=6e-6), (year, carrier, unit)
        assert f.region == "GB"
        assert f.gwp_set == ("AR4" if year <= 2022 else "AR5")
    # Coal by type (2024, per tonne / 1000): industrial 2399.43994, domestic 2904.95234 kg CO2e/t.
    assert lib[(2024, "coal", "kg", "net", "industrial")].kg_co2e_per_unit == pytest.approx(2.39943994)
    assert lib[(2024, "coal", "kg", "net", "domestic")].kg_co2e_per_unit == pytest.approx(2.90495234)
    # Per-gas: DESNZ 2022 natural gas per m3 is CO2 2.01193 + CH4 0.00274 + N2O 0.00107 kg CO2e (AR4).
    m3 = lib[(2022, "natural_gas", "m3", "net", "")]
    assert m3.kg_ch4_per_unit is not None and m3.kg_n2o_per_unit is not None
    assert (m3.kg_co2_per_unit, m3.kg_ch4_per_unit * 25, m3.kg_n2o_per_unit * 298) == pytest.approx(
        (2.01193, 0.00274, 0.00107)
    )


# DESNZ 2025 flat file v1 and 2026 flat file v1.2, 'Factors by Category', as published (kg CO2e per
# unit: total, CO2, CH4, N2O parts): (year, carrier, unit, basis, fuel type) -> values.
DESNZ_2025_2026 = {
    (2025, "electricity", "kWh", "", ""): (0.17700, 0.17489, 0.00090, 0.00122),  # 7_400_4000_5
    (2025, "heat", "kWh", "", ""): (0.17529, 0.17355, 0.00122, 0.00052),  # 10_401_4003_5
    (2025, "natural_gas", "kWh", "gross", ""): (0.18296, 0.18259, 0.00028, 0.00009),  # 1_100_1004_6
    (2025, "natural_gas", "m3", "net", ""): (2.06672, 2.06270, 0.00307, 0.00095),  # 1_100_1004_1
    (2025, "coal", "kg", "net", "industrial"): (2.39528994, 2.37072, 0.0076384, 0.01693154),  # per t / 1000
    (2026, "electricity", "kWh", "", ""): (0.13096, 0.12943, 0.00067, 0.00086),
    (2026, "natural_gas", "kWh", "gross", ""): (0.18231, 0.18194, 0.00028, 0.00009),
    (2026, "natural_gas", "kWh", "net", ""): (0.20199, 0.20158, 0.00031, 0.00010),
    (2026, "diesel", "l", "net", ""): (2.66155, 2.62818, 0.00029, 0.03308),
}


def test_desnz_2025_and_2026_are_the_published_ones_and_chain_to_2027() -> None:
    """The per-gas parts are published as kg CO2e and stored as kg of gas under AR5 (CH4 28, N2O
    265); 2024 ends where 2025 begins, 2025 where 2026 begins, and 2026 ends at 2027-01-01."""
    lib: dict[tuple[int, str, str, str, str], Factor] = {
        (f.data_year, f.carrier.value, f.unit, str(f.cv_basis or ""), f.fuel_type): f
        for f in load_factors(LIBRARY)
        if f.publisher == "UK DESNZ"
    }
    for key, (co2e, co2, ch4, n2o) in DESNZ_2025_2026.items():
        f = lib[key]
        assert f.kg_ch4_per_unit is not None and f.kg_n2o_per_unit is not None, key
        got = (f.kg_co2e_per_unit, f.kg_co2_per_unit, f.kg_ch4_per_unit * 28, f.kg_n2o_per_unit * 265)
        assert got == pytest.approx((co2e, co2, ch4, n2o), abs=6e-6), key
        assert (f.gwp_set, f.gases, f.region) == ("AR5", "CO2e", "GB"), key
    # Same 17 carriers/rows in every year from 2024 on.
    per_year = {y: {k[1:] for k in lib if k[0] == y} for y in (2024, 2025, 2026)}
    assert per_year[2025] == per_year[2024] == per_year[2026] and len(per_year[2025]) == 17
    gas = {y: lib[(y, "natural_gas", "kWh", "gross", "")] for y in (2024, 2025, 2026)}
    assert [(g.valid_from, g.valid_to) for g in gas.values()] == [
        (date(2024, 1, 1), date(2025, 1, 1)),
        (date(2025, 1, 1), date(2026, 1, 1)),
        (date(2026, 1, 1), date(2027, 1, 1)),
    ]
    # 2025 was read from the publisher's workbook; 2026 only from a transcription of it.
    assert "UNVERIFIED" not in gas[2025].source and "UNVERIFIED" in gas[2026].source


# IPCC 2006 GL Vol. 2, typed from the IPCC's PDFs: Ch. 1 Table 1.2 (p. 1.18) default NCV in TJ/Gg
# and Ch. 2 Table 2.3 (p. 2.18, manufacturing industries and construction) CO2 / CH4 / N2O in kg per
# TJ (net CV). (carrier, fuel type) -> (NCV, CO2, CH4, N2O).
IPCC_2006 = {
    ("natural_gas", ""): (48.0, 56_100, 1, 0.1),
    ("diesel", ""): (43.0, 74_100, 3, 0.6),  # Gas/Diesel Oil
    ("lpg", ""): (47.3, 63_100, 1, 0.1),  # Liquefied Petroleum Gases
    ("coal", "other_bituminous"): (25.8, 94_600, 10, 1.5),
    ("coal", "anthracite"): (26.7, 98_300, 10, 1.5),
    ("coal", "coking"): (28.2, 94_600, 10, 1.5),
}


def test_ipcc_defaults_are_the_published_ones() -> None:
    """Per kg of fuel = kg/TJ x NCV (TJ/Gg = MJ/kg) x 1e-6; all six were checked against the IPCC's
    PDFs, so none is UNVERIFIED. The per-litre diesel factor is the per-kg one x its stated density."""
    lib = {
        (f.carrier.value, f.fuel_type, f.unit): f
        for f in load_factors(LIBRARY)
        if f.series == "ipcc-2006-default" and f.region == "GLOBAL"
    }
    assert {(c, t) for c, t, _ in lib} == set(IPCC_2006)
    for (carrier, fuel_type), (ncv, co2, ch4, n2o) in IPCC_2006.items():
        f = lib[(carrier, fuel_type, "kg")]
        assert (f.ncv, f.cv_basis, f.gwp_set) == (ncv, "net", "AR5"), carrier
        got = (f.kg_co2_per_unit, f.kg_ch4_per_unit, f.kg_n2o_per_unit)
        assert got == pytest.approx((co2 * ncv * 1e-6, ch4 * ncv * 1e-6, n2o * ncv * 1e-6), rel=1e-9)
        assert "UNVERIFIED" not in f.source + str(f.ncv_source), f.id
    per_litre, per_kg = lib[("diesel", "", "l")], lib[("diesel", "", "kg")]
    assert per_litre.ncv is not None and per_kg.ncv is not None and per_kg.kg_co2_per_unit is not None
    density = per_litre.ncv / per_kg.ncv
    assert density == pytest.approx(0.84) and "ASSUMED density 0.84" in str(per_litre.ncv_source)
    assert per_litre.kg_co2_per_unit == pytest.approx(per_kg.kg_co2_per_unit * density)


def test_no_mixed_source_gas_factor_for_the_uk() -> None:
    """The m3 factor built on China's NCV is a China factor; a GB site gets only DESNZ per m3."""
    factors = load_factors(LIBRARY)
    m3 = [f for f in factors if f.carrier.value == "natural_gas" and f.unit == "m3"]
    assert {f.region for f in m3 if "GB/T 32150" in f.publisher} == {"CN"}
    assert not [f for f in m3 if f.region == "GLOBAL"]


def test_library_applies_over_the_pre_issue_14_library_and_ignores_it(compute_dsn: str) -> None:
    """The old library's rows (no gases, open-ended to 2100) stay for the rollups citing them, the new
    library applies beside them, and no lookup uses them again: activity after the newest vintage
    (2027) gets no factor although a legacy row claims validity to 2100."""
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        conn.execute(
            "INSERT INTO emission_factors (factor_id, publisher, series, region, carrier, valid_from,"
            " valid_to, kg_co2e_per_unit, unit, version, source, data_year)"
            " VALUES ('cn-mee-stat-2022-national-v1', 'China MEE / NBS', 'national-power-average', 'CN',"
            " 'electricity', '2022-01-01', '2100-01-01', 0.5366, 'kWh', 1, 'pre-issue-14 library', 2022)"
        )
        conn.commit()
        assert apply_factors(conn, LIBRARY).inserted == len(load_factors(LIBRARY))
        lookup = (
            "SELECT f.factor_id FROM (SELECT 'electricity'::text AS carrier, 'kWh'::text AS unit,"
            " ''::text AS cv_basis, ''::text AS refc, ''::text AS fuel_type, 2 AS scope) e,"
            " (SELECT 'CN'::text AS grid_region, NULL::text AS factor_series, NULL::text AS fuel_series) s,"
            " LATERAL ({}) f"
        )
        sql = lookup.format(FACTOR_LOOKUP.format(day="%(day)s::date"))
        args = {"series": "national-power-average", "fuel_series": "ipcc-2006-default"}
        for day, expected in (
            ("2022-06-01", "cn-mee-stat-2022-national-v2"),
            ("2026-06-01", "cn-mee-stat-2023-national-v1"),
        ):
            assert conn.execute(sql, {**args, "day": day}).fetchone() == (expected,)
        assert conn.execute(sql, {**args, "day": "2027-06-01"}).fetchone() is None
