"""The factor library's refusals say exactly what is wrong and where (file, line, id), and its edge
cases hold: zero amounts, inline arrays, counts of an apply, series told apart in the database.
Written to kill the mutants ``make mutate`` found alive in compute/factors.py (issue 17)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from compute.config import ConfigError
from compute.factors import apply_factors, load_factors
from tests.test_compute_support import compute_dsn, reset
from tests.test_factors import GAS, entry, write

__all__ = ["compute_dsn"]

NEXT = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2023-01-01", valid_to="2024-01-01")


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_factors(path)
    return str(err.value)


def test_fuel_refusals_are_exact(tmp_path: Path) -> None:
    p = write(tmp_path, entry(GAS, cv_basis=None))
    assert refusal(p) == (
        f"{p}: line 1: factor 'ng': (entry): Value error, fuel factors need cv_basis (gross or net)"
    )
    p = write(tmp_path, entry(GAS, reference_conditions=None))
    assert refusal(p).endswith(
        "Value error, reference_conditions are required for per-m3 factors and only for them "
        "(one of ['15C-101.325kPa', '0C-101.325kPa', '20C-101.325kPa'])"
    )
    coal = entry(GAS, id='"coal"', carrier='"coal"', unit='"kg"', reference_conditions=None)
    assert refusal(write(tmp_path, coal)).endswith(
        "Value error, coal factors need a fuel_type (the coal type, e.g. 'industrial')"
    )


def test_region_refusals_are_exact(tmp_path: Path) -> None:
    assert refusal(write(tmp_path, entry(region='"UK-ENG"'))).endswith(
        "region: Value error, region 'UK' is not an ISO 3166 code: the United Kingdom is 'GB'"
    )
    assert refusal(write(tmp_path, entry(region='"uk-x"'))).endswith(
        "region: Value error, region 'uk-x' is not an ISO 3166 code (e.g. 'GB', 'CN', 'CN-YN'), a China "
        "grid region (CN-North/Northeast/East/Central/Northwest/South/Southwest) or 'GLOBAL'"
    )
    assert refusal(write(tmp_path, entry(kg_co2_per_unit="-0.1"))).endswith(
        "kg_co2_per_unit: Value error, must be a finite number >= 0"
    )


def test_zero_gas_amounts_are_valid(tmp_path: Path) -> None:
    (f,) = load_factors(write(tmp_path, entry(GAS, kg_ch4_per_unit="0.0", kg_n2o_per_unit="0.0")))
    assert f.kg_co2e_per_unit == 2.0


def test_library_shape_refusals_name_the_file_and_entry(tmp_path: Path) -> None:
    p = write(tmp_path, "factors = 1\n")
    assert refusal(p) == f"{p}: 'factors' must be an array of tables ([[factors]])"
    p = write(tmp_path, "colour = 1\n")
    assert refusal(p) == f"{p}: unknown top-level keys ['colour']; expected only [[factors]]"
    assert load_factors(write(tmp_path, "# nothing yet\n")) == []
    # An inline array has no [[factors]] headers: entries are named by position.
    p = write(tmp_path, "factors = [{ id = 'a' }, 7]\n")
    assert refusal(p).startswith(f"{p}: entry #1: factor 'a': ")
    p = write(tmp_path, "factors = [7]\n")
    assert refusal(p).startswith(f"{p}: entry #1: (entry): ")
    p = write(tmp_path, entry(id=None))
    assert refusal(p).startswith(f"{p}: line 1: id: Field required")


def test_duplicate_and_vintage_refusals_give_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "# header\n", entry(), entry(series='"x"'))
    assert refusal(p) == f"{p}: duplicate factor id 'cn-2022-v1' (line 19)"
    revision = entry(id='"cn-2022-v1b"')  # same vintage, same version
    p = write(tmp_path, entry(), revision)
    assert refusal(p) == (
        f"{p}: factors 'cn-2022-v1' (line 1) and 'cn-2022-v1b' (line 17) are both version 1 of vintage "
        "2022 of ('China MEE / NBS', 'national-power-average', 'CN', 'electricity', 'kWh', '', '', ''): "
        "a revision needs a higher version"
    )
    overlap = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2022-06-01", valid_to="2024-01-01")
    p = write(tmp_path, entry(), overlap)
    assert refusal(p) == (
        f"{p}: factor 'cn-2022-v1' (line 1) (vintage 2022, valid [2022-01-01, 2023-01-01)) overlaps "
        "'cn-2023-v1' (line 17) (vintage 2023, from 2022-06-01): a vintage must end where the next begins"
    )


def test_apply_counts_every_factor_and_stores_no_basis_as_empty(compute_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        path = write(tmp_path, entry(), NEXT)
        assert apply_factors(conn, path).inserted == 2
        again = apply_factors(conn, path)
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
        cited = write(tmp_path, entry(source='"MEE"'), NEXT.replace('source = "test"', 'source = "MEE"'))
        assert apply_factors(conn, cited).updated == 2
        rows = conn.execute(
            "SELECT cv_basis, reference_conditions, fuel_type FROM emission_factors"
        ).fetchall()
        assert rows == [("", "", ""), ("", "", "")]


def test_the_database_check_reads_each_series_whole(compute_dsn: str, tmp_path: Path) -> None:
    """Series differing only by publisher are separate; a revision (version 2) in the database is
    read with its version; an overlap with the database names both factors and their dates."""
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        revision = entry(id='"cn-2022-v2"', version="2")
        apply_factors(conn, write(tmp_path, entry(), revision))
        other_publisher = entry(id='"other"', publisher='"Other"', valid_from="2022-06-01")
        assert apply_factors(conn, write(tmp_path, other_publisher)).inserted == 1
        overlap = entry(id='"cn-2023-v1"', data_year="2023", valid_from="2022-06-01", valid_to="2024-01-01")
        p = write(tmp_path, overlap)
        with pytest.raises(ConfigError) as err:
            apply_factors(conn, p)
        assert str(err.value) == (
            f"{p} together with the factors already in the database: factor 'cn-2022-v2' (vintage 2022, "
            "valid [2022-01-01, 2023-01-01)) overlaps 'cn-2023-v1' (vintage 2023, from 2022-06-01): a "
            "vintage must end where the next begins"
        )


def test_changing_an_applied_factor_is_refused_with_the_reason(compute_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_factors(conn, write(tmp_path, entry()))
        p = write(tmp_path, entry(kg_co2_per_unit="0.6"))
        with pytest.raises(ConfigError) as err:
            apply_factors(conn, p)
        assert str(err.value) == (
            f"{p}: factor 'cn-2022-v1' was already applied with different values; applied factors are "
            "immutable (rollups cite them) — add a new version under a new id"
        )


def test_two_applied_factors_of_one_version_are_named_without_lines(compute_dsn: str, tmp_path: Path) -> None:
    """Each file alone is a clean series; together in the database they are two version-1 factors of
    one vintage. The refusal names both ids (no file lines: they come from different files)."""
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        apply_factors(conn, write(tmp_path, entry()))
        p = write(tmp_path, entry(id='"cn-2022-other"'))
        with pytest.raises(ConfigError) as err:
            apply_factors(conn, p)
        assert str(err.value) == (
            f"{p} together with the factors already in the database: factors 'cn-2022-v1' and "
            "'cn-2022-other' are both version 1 of vintage 2022 of ('China MEE / NBS', "
            "'national-power-average', 'CN', 'electricity', 'kWh', '', '', ''): a revision needs a "
            "higher version"
        )
