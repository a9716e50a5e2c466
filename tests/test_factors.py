"""The emission factor library: validation errors people can act on, and immutable applies."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from compute.config import ConfigError
from compute.factors import apply_factors, load_factors
from tests.test_compute_support import REPO, compute_dsn, reset

__all__ = ["compute_dsn"]

BASE = """
[[factors]]
id = "cn-2022-v1"
publisher = "China MEE / NBS"
series = "national-power-average"
region = "CN"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2023-01-01
kg_co2e_per_unit = 0.5366
unit = "kWh"
version = 1
source = "test"
"""


def entry(**changes: object) -> str:
    lines = []
    for line in BASE.strip().splitlines()[1:]:
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
    factors = load_factors(REPO / "config" / "factors.toml")
    assert any(f.series == "national-power-average" and f.region == "CN" for f in factors)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"carrier": '"plutonium"'}, "carrier"),
        ({"kg_co2e_per_unit": "-1.0"}, "kg_co2e_per_unit"),
        ({"kg_co2e_per_unit": "nan"}, "kg_co2e_per_unit"),
        ({"valid_to": "2021-01-01"}, "must be before"),
        ({"unit": '"MWh"'}, "per kWh"),
        ({"version": "0"}, "version"),
        ({"id": None}, "id: Field required"),
        ({"colour": '"green"'}, "colour: Extra inputs are not permitted"),
        ({"id": '"has space"'}, "id"),
    ],
)
def test_bad_entry_named_in_error(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_factors(write(tmp_path, entry(**changes)))
    assert "[[factors]] #1" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_overlap_same_key_and_version_rejected(tmp_path: Path) -> None:
    second = entry(id='"cn-2022b-v1"', valid_from="2022-06-01", valid_to="2023-06-01")
    with pytest.raises(ConfigError, match="'cn-2022-v1' and 'cn-2022b-v1' overlap"):
        load_factors(write(tmp_path, entry(), second))


def test_adjacent_periods_other_series_and_higher_versions_allowed(tmp_path: Path) -> None:
    adjacent = entry(id='"cn-2023-v1"', valid_from="2023-01-01", valid_to="2024-01-01")
    other_series = entry(id='"cn-2022-stat-v1"', series='"statistical"')
    revision = entry(id='"cn-2022-v2"', version="2", kg_co2e_per_unit="0.55")
    factors = load_factors(write(tmp_path, entry(), adjacent, other_series, revision))
    assert [f.id for f in factors] == ["cn-2022-v1", "cn-2023-v1", "cn-2022-stat-v1", "cn-2022-v2"]


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
        # ... the number may not: that is a new version.
        with pytest.raises(ConfigError, match="immutable"):
            apply_factors(conn, write(tmp_path, entry(kg_co2e_per_unit="0.6")))
        rows = conn.execute("SELECT factor_id, kg_co2e_per_unit, source FROM emission_factors").fetchall()
        assert rows == [("cn-2022-v1", 0.5366, "MEE 2024-04")]


def test_apply_rejects_overlap_with_factor_already_in_db(compute_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_factors(conn, write(tmp_path, entry()))
        renamed = entry(id='"cn-2022-renamed"')
        with pytest.raises(ConfigError, match="already in the database"):
            apply_factors(conn, write(tmp_path, renamed))
        assert conn.execute("SELECT count(*) FROM emission_factors").fetchone() == (1,)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "factors.toml"
    p.write_text(text)
    return p


GAS = """
[[factors]]
id = "ng"
publisher = "IPCC"
series = "ipcc-2006-default"
region = "GLOBAL"
carrier = "natural_gas"
valid_from = 2006-01-01
valid_to = 2100-01-01
kg_co2_per_unit = 2.0
kg_ch4_per_unit = 0.001
kg_n2o_per_unit = 0.0001
unit = "m3"
version = 1
source = "test"
"""


@pytest.mark.parametrize(("gwp", "ch4", "n2o"), [("AR5", 28.0, 265.0), ("AR6", 29.8, 273.0)])
def test_co2e_from_gases_uses_the_stated_gwp_set(tmp_path: Path, gwp: str, ch4: float, n2o: float) -> None:
    (f,) = load_factors(_write(tmp_path, GAS + f'gwp_set = "{gwp}"\n'))
    assert f.kg_co2e_per_unit == pytest.approx(2.0 + 0.001 * ch4 + 0.0001 * n2o)


def test_gas_factor_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need a gwp_set"):
        load_factors(_write(tmp_path, GAS))
    with pytest.raises(ConfigError, match="disagrees with the gases"):
        load_factors(_write(tmp_path, GAS + 'gwp_set = "AR5"\nkg_co2e_per_unit = 2.0\n'))
    with pytest.raises(ConfigError, match="give kg_co2e_per_unit or the per-gas"):
        load_factors(_write(tmp_path, entry(kg_co2e_per_unit=None)))


def test_same_key_in_other_units_may_overlap(tmp_path: Path) -> None:
    other = GAS.replace('id = "ng"', 'id = "ng-kg"').replace('unit = "m3"', 'unit = "kg"')
    assert len(load_factors(_write(tmp_path, GAS + 'gwp_set = "AR5"\n' + other + 'gwp_set = "AR5"\n'))) == 2


def test_repo_library_has_both_china_series_uk_and_ipcc_fuels() -> None:
    by_id = {f.id: f for f in load_factors(REPO / "config" / "factors.toml")}
    assert by_id["cn-mee-stat-2022-national-v1"].kg_co2e_per_unit == 0.5366
    assert by_id["cn-mee-ets-2022-national-v1"].kg_co2e_per_unit == 0.5703
    assert by_id["cn-mee-stat-2022-national-v1"].series != by_id["cn-mee-ets-2022-national-v1"].series
    assert {
        f.data_year for f in by_id.values() if f.publisher == "UK DESNZ" and f.carrier == "electricity"
    } == {2022, 2023, 2024, 2025}
    fuels = {f.carrier.value for f in by_id.values() if f.series == "ipcc-2006-default"}
    assert fuels == {"natural_gas", "diesel", "lpg", "coal"}
    assert all(
        f.gwp_set and f.kg_ch4_per_unit and f.kg_n2o_per_unit
        for f in by_id.values()
        if f.series == "ipcc-2006-default"
    )
