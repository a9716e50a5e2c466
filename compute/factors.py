"""The emission factor library (``config/factors.toml``): validation and ``apply_factors``.

A factor is keyed by publisher + series + region + carrier + unit + validity and carries a version.
Within one version, validity periods of the same publisher+series+region+carrier+unit must not overlap (the
lookup would be ambiguous); a higher version of the same key may overlap and then supersedes the
lower one where both are valid (recompute picks the highest version).

Provenance: every factor names its publisher, series, region, the year its data describe
(``data_year``), validity, unit and — where it has CH4/N2O parts — the GWP set converting them to
CO2e (``gwp_set``, AR5 or AR6). Give either ``kg_co2e_per_unit`` alone (published CO2e or CO2-only
grid factors) or the per-gas ``kg_co2_per_unit``/``kg_ch4_per_unit``/``kg_n2o_per_unit`` with a
``gwp_set``; CO2e is then computed here, and if both are given they must agree.

Applied factors are immutable: rollups record ``factor_id``, so re-applying an id with different
numbers, key or validity is refused — publish a new version under a new id. Only the descriptive
``source``, ``data_year`` and ``gwp_set`` may be corrected in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from itertools import combinations
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import psycopg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from compute.config import Carrier, ConfigError, check_keys, read_toml, section_entries
from edge.wire import Ident

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


def _finite_non_negative(v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError("must be a finite number >= 0")
    return v


# 100-year GWPs. AR5: IPCC AR5 WG1 Table 8.7 (no climate-carbon feedback). AR6: IPCC AR6 WG1
# Table 7.15, fossil CH4 (29.8) because the fuels here are fossil.
GWP: Final[dict[str, tuple[float, float]]] = {"AR5": (28.0, 265.0), "AR6": (29.8, 273.0)}


def _opt_non_negative(v: float | None) -> float | None:
    return None if v is None else _finite_non_negative(v)


OptAmount = Annotated[float | None, AfterValidator(_opt_non_negative)]


class Factor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    publisher: NonEmpty
    series: NonEmpty
    region: NonEmpty
    carrier: Carrier
    valid_from: date
    valid_to: date  # exclusive
    kg_co2e_per_unit: OptAmount = None
    kg_co2_per_unit: OptAmount = None
    kg_ch4_per_unit: OptAmount = None
    kg_n2o_per_unit: OptAmount = None
    gwp_set: Literal["AR5", "AR6"] | None = None
    data_year: Annotated[int, Field(ge=1990, le=2100)] | None = None
    unit: NonEmpty
    version: Annotated[int, Field(ge=1)]
    source: NonEmpty

    @model_validator(mode="after")
    def _check(self) -> Factor:
        gases = (self.kg_co2_per_unit, self.kg_ch4_per_unit, self.kg_n2o_per_unit)
        if any(g is not None for g in gases):
            if self.kg_co2_per_unit is None:
                raise ValueError("per-gas factors need kg_co2_per_unit")
            if (self.kg_ch4_per_unit or self.kg_n2o_per_unit) and self.gwp_set is None:
                raise ValueError("CH4/N2O factors need a gwp_set (AR5 or AR6) to convert them to CO2e")
            ch4, n2o = GWP[self.gwp_set] if self.gwp_set else (0.0, 0.0)
            co2e = (
                self.kg_co2_per_unit
                + (self.kg_ch4_per_unit or 0.0) * ch4
                + (self.kg_n2o_per_unit or 0.0) * n2o
            )
            if self.kg_co2e_per_unit is None:
                object.__setattr__(self, "kg_co2e_per_unit", co2e)
            elif not math.isclose(self.kg_co2e_per_unit, co2e, rel_tol=1e-4):
                raise ValueError(
                    f"kg_co2e_per_unit {self.kg_co2e_per_unit} disagrees with the gases under "
                    f"{self.gwp_set}: {co2e:.6g}"
                )
        elif self.kg_co2e_per_unit is None:
            raise ValueError(
                "give kg_co2e_per_unit or the per-gas kg_co2_per_unit/kg_ch4_per_unit/kg_n2o_per_unit"
            )
        if self.valid_from >= self.valid_to:
            raise ValueError(f"valid_from {self.valid_from} must be before valid_to {self.valid_to}")
        if self.carrier is Carrier.ELECTRICITY and self.unit != "kWh":
            raise ValueError(f"electricity factors must be per kWh, not per {self.unit!r}")
        return self

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.publisher, self.series, self.region, self.carrier.value, self.unit)

    def row(self) -> tuple[Any, ...]:
        """Values of ``_IMMUTABLE`` then ``_DESCRIPTIVE``, in that order."""
        return (
            self.id,
            self.publisher,
            self.series,
            self.region,
            self.carrier.value,
            self.valid_from,
            self.valid_to,
            self.kg_co2e_per_unit,
            self.unit,
            self.version,
            self.kg_co2_per_unit,
            self.kg_ch4_per_unit,
            self.kg_n2o_per_unit,
            self.source,
            self.data_year,
            self.gwp_set,
        )


def load_factors(path: Path) -> list[Factor]:
    """Parse and validate the library; raises ``ConfigError`` naming the offending entries."""
    data = read_toml(path)
    check_keys(data, path, ["factors"])
    factors = section_entries(data, path, "factors", Factor)
    seen: dict[str, int] = {}
    for i, f in enumerate(factors):
        if f.id in seen:
            raise ConfigError(
                f"{path}: duplicate factor id {f.id!r} (entries #{seen[f.id] + 1} and #{i + 1})"
            )
        seen[f.id] = i
    for a, b in combinations(factors, 2):
        if (
            a.key == b.key
            and a.version == b.version
            and a.valid_from < b.valid_to
            and b.valid_from < a.valid_to
        ):
            raise ConfigError(
                f"{path}: factors {a.id!r} and {b.id!r} overlap: same publisher/series/region/carrier/unit "
                f"{a.key} and version {a.version}, validity [{a.valid_from}, {a.valid_to}) and "
                f"[{b.valid_from}, {b.valid_to}); end one period earlier or version the revision higher"
            )
    return factors


@dataclass(frozen=True)
class ApplyResult:
    inserted: int
    updated: int
    unchanged: int


_IMMUTABLE = (
    "factor_id, publisher, series, region, carrier, valid_from, valid_to, kg_co2e_per_unit, unit, "
    "version, kg_co2_per_unit, kg_ch4_per_unit, kg_n2o_per_unit"
)
_DESCRIPTIVE = "source, data_year, gwp_set"
_COLUMNS = f"{_IMMUTABLE}, {_DESCRIPTIVE}"
_N_IMMUTABLE = len(_IMMUTABLE.split(","))
_N_COLUMNS = len(_COLUMNS.split(","))


def apply_factors(conn: psycopg.Connection[Any], path: Path) -> ApplyResult:
    """Validate ``path`` and upsert it into ``emission_factors`` in one transaction."""
    factors = load_factors(path)
    inserted = updated = unchanged = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("LOCK TABLE emission_factors IN SHARE ROW EXCLUSIVE MODE")
        cur.execute(f"SELECT {_COLUMNS} FROM emission_factors")
        existing = {r[0]: r for r in cur.fetchall()}
        for f in factors:
            new = f.row()
            old = existing.get(f.id)
            if old is None:
                cur.execute(
                    f"INSERT INTO emission_factors ({_COLUMNS}) VALUES ({', '.join(['%s'] * _N_COLUMNS)})",
                    new,
                )
                inserted += 1
            elif tuple(old[:_N_IMMUTABLE]) != new[:_N_IMMUTABLE]:
                raise ConfigError(
                    f"{path}: factor {f.id!r} was already applied with different values; applied factors "
                    "are immutable (rollups cite them) — add a new version under a new id"
                )
            elif tuple(old[_N_IMMUTABLE:]) != new[_N_IMMUTABLE:]:
                cur.execute(
                    "UPDATE emission_factors SET source = %s, data_year = %s, gwp_set = %s"
                    " WHERE factor_id = %s",
                    (*new[_N_IMMUTABLE:], f.id),
                )
                updated += 1
            else:
                unchanged += 1
        # The library in the DB as a whole (including ids no longer in the file) must stay unambiguous.
        cur.execute(
            "SELECT a.factor_id, b.factor_id FROM emission_factors a JOIN emission_factors b"
            " ON a.factor_id < b.factor_id"
            " AND (a.publisher, a.series, a.region, a.carrier, a.unit, a.version)"
            " = (b.publisher, b.series, b.region, b.carrier, b.unit, b.version)"
            " AND a.valid_from < b.valid_to AND b.valid_from < a.valid_to LIMIT 1"
        )
        clash = cur.fetchone()
        if clash:
            raise ConfigError(
                f"{path}: factor {clash[0]!r} overlaps {clash[1]!r} already in the database "
                "(same key, version and overlapping validity)"
            )
    return ApplyResult(inserted, updated, unchanged)
