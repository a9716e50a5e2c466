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
