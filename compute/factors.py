"""The emission factor library (``config/factors.toml``): validation and ``apply_factors``.

Every factor must say what it is, or the loader refuses it with an error naming the file, the line
of its ``[[factors]]`` header and its id:

- ``publisher``, ``series``, ``region``, ``carrier``, ``unit``, ``source`` (document and table);
- ``region``: an ISO 3166-1 alpha-2 country (``GB``, never ``UK``) or ISO 3166-2 subdivision
  (``CN-YN``); China's regional grids, which have no ISO code, as ``CN-`` + the English grid name
  (``CN-North``, ``CN-Northeast``, ``CN-East``, ``CN-Central``, ``CN-Northwest``, ``CN-South``,
  ``CN-Southwest``); ``GLOBAL`` only for IPCC defaults that describe no place;
- ``data_year`` (the year the numbers describe: a *vintage*) and the validity ``[valid_from,
  valid_to)`` of activity dates it applies to;
- ``gases``: ``"CO2"`` for CO2-only factors (China's grid factors; then ``gwp_set = "none"``) or
  ``"CO2e"`` with the per-gas ``kg_co2/kg_ch4/kg_n2o_per_unit`` (kg of each gas) and the
  ``gwp_set`` (AR4, AR5, AR6) that weighs them; ``kg_co2e_per_unit`` is computed and, if also given,
  must agree;
- for fuels (Scope 1 carriers): ``cv_basis`` (``gross``/``net``: the basis of a kWh unit, or of the
  calorific value behind a mass/volume factor); for mass/volume units the energy content per unit
  (``ncv`` in ``ncv_unit``) and where it comes from (``ncv_source``); for m3 the gas volume's
  ``reference_conditions`` (``15C-101.325kPa``, ``0C-101.325kPa`` or ``20C-101.325kPa``); for coal
  the ``fuel_type`` (industrial, electricity_generation, domestic, coking, other_bituminous, ...).

Vintages and revisions: factors with the same key (publisher, series, region, carrier, unit,
cv_basis, reference_conditions, fuel_type) form a time series of vintages (``data_year``). The
newest version of each vintage must end exactly where the next vintage begins (no overlap, no gap),
so a vintage is never open-ended past its successor. A *revision* is a higher ``version`` of the
same vintage; it may overlap its vintage only. Lookups (``compute.recompute``) pick the newest
vintage, then the highest version, so a revised old vintage can never override a newer one.

Applied factors are immutable: rollups record ``factor_id``, so re-applying an id with different
numbers, key or validity is refused — publish a new version under a new id. Only the descriptive
``source`` and ``ncv_source`` may be corrected in place.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import psycopg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from compute.config import SCOPE2_CARRIERS, Carrier, ConfigError, check_keys, read_toml, validate
from edge.wire import Ident

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]

# 100-year GWPs (CH4, N2O). AR4: IPCC AR4 WG1 Table 2.14 (DESNZ sets up to 2022). AR5: AR5 WG1
# Table 8.7, no climate-carbon feedback (DESNZ 2023 onwards). AR6: AR6 WG1 Table 7.15, fossil CH4.
GWP: Final[dict[str, tuple[float, float]]] = {
    "AR4": (25.0, 298.0),
    "AR5": (28.0, 265.0),
    "AR6": (29.8, 273.0),
}
CN_GRIDS: Final = ("North", "Northeast", "East", "Central", "Northwest", "South", "Southwest")
_REGION = re.compile(r"^(GLOBAL|[A-Z]{2}|[A-Z]{2}-[A-Z0-9]{1,3}|CN-(" + "|".join(CN_GRIDS) + "))$")
# Unit vocabulary: energy, volume, mass. Meters count in the same words (compute.fleet).
ENERGY_UNITS: Final = frozenset({"kWh"})
FUEL_UNITS: Final = frozenset({"kWh", "m3", "l", "kg"})
REFERENCE_CONDITIONS: Final = ("15C-101.325kPa", "0C-101.325kPa", "20C-101.325kPa")
FUEL_CARRIERS: Final = frozenset(c for c in Carrier if c not in SCOPE2_CARRIERS)


def _finite_non_negative(v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError("must be a finite number >= 0")
    return v


def _region(v: str) -> str:
    if v == "UK" or v.startswith("UK-"):
        raise ValueError("region 'UK' is not an ISO 3166 code: the United Kingdom is 'GB'")
    if not _REGION.match(v):
        raise ValueError(
            f"region {v!r} is not an ISO 3166 code (e.g. 'GB', 'CN', 'CN-YN'), a China grid region "
            f"(CN-{'/'.join(CN_GRIDS)}) or 'GLOBAL'"
        )
    return v


def _opt_non_negative(v: float | None) -> float | None:
    return None if v is None else _finite_non_negative(v)


OptAmount = Annotated[float | None, AfterValidator(_opt_non_negative)]
Region = Annotated[str, AfterValidator(_region)]


class Factor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    publisher: NonEmpty
    series: NonEmpty
    region: Region
    carrier: Carrier
    unit: NonEmpty
    data_year: Annotated[int, Field(ge=1990, le=2100)]
    valid_from: date
    valid_to: date  # exclusive
    version: Annotated[int, Field(ge=1)]
    source: NonEmpty
    gases: Literal["CO2", "CO2e"]
    gwp_set: Literal["AR4", "AR5", "AR6", "none"]
    kg_co2e_per_unit: OptAmount = None
    kg_co2_per_unit: OptAmount = None
    kg_ch4_per_unit: OptAmount = None
    kg_n2o_per_unit: OptAmount = None
    cv_basis: Literal["gross", "net"] | None = None
    reference_conditions: Literal[REFERENCE_CONDITIONS] | None = None  # type: ignore[valid-type]
    ncv: OptAmount = None
    ncv_unit: NonEmpty | None = None
    ncv_source: NonEmpty | None = None
    fuel_type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{0,40}$")] = ""

    @model_validator(mode="after")
    def _check(self) -> Factor:
        if self.kg_co2_per_unit is None:
            raise ValueError("kg_co2_per_unit is required (CO2-only factors: the CO2 value)")
        if self.gases == "CO2":
            if self.gwp_set != "none" or self.kg_ch4_per_unit is not None or self.kg_n2o_per_unit is not None:
                raise ValueError('gases = "CO2" factors have no CH4/N2O parts and gwp_set = "none"')
            co2e = self.kg_co2_per_unit
        else:
            if self.gwp_set == "none" or self.kg_ch4_per_unit is None or self.kg_n2o_per_unit is None:
                raise ValueError(
                    'gases = "CO2e" needs kg_ch4_per_unit, kg_n2o_per_unit and a gwp_set (AR4, AR5, AR6)'
                )
            ch4, n2o = GWP[self.gwp_set]
            co2e = self.kg_co2_per_unit + self.kg_ch4_per_unit * ch4 + self.kg_n2o_per_unit * n2o
        if self.kg_co2e_per_unit is None:
            object.__setattr__(self, "kg_co2e_per_unit", co2e)
        elif not math.isclose(self.kg_co2e_per_unit, co2e, rel_tol=1e-4):
            raise ValueError(
                f"kg_co2e_per_unit {self.kg_co2e_per_unit} disagrees with the gases under "
                f"{self.gwp_set}: {co2e:.6g}"
            )
        if self.valid_from >= self.valid_to:
            raise ValueError(f"valid_from {self.valid_from} must be before valid_to {self.valid_to}")
        if self.carrier in FUEL_CARRIERS:
            self._check_fuel()
        else:
            if self.unit not in ENERGY_UNITS:
                raise ValueError(f"{self.carrier.value} factors must be per kWh, not per {self.unit!r}")
            extra = [k for k in ("cv_basis", "reference_conditions", "ncv") if getattr(self, k) is not None]
            if extra or self.fuel_type:
                raise ValueError(f"{self.carrier.value} is not a fuel: remove {extra or ['fuel_type']}")
        return self

    def _check_fuel(self) -> None:
        if self.unit not in FUEL_UNITS:
            raise ValueError(f"fuel factors are per {sorted(FUEL_UNITS)}, not per {self.unit!r}")
        if self.cv_basis is None:
            raise ValueError("fuel factors need cv_basis (gross or net)")
        if self.unit != "kWh" and (self.ncv is None or self.ncv_unit is None or self.ncv_source is None):
            raise ValueError(f"a per-{self.unit} fuel factor needs ncv, ncv_unit and ncv_source")
        if (self.unit == "m3") != (self.reference_conditions is not None):
            raise ValueError(
                "reference_conditions are required for per-m3 factors and only for them "
                f"(one of {list(REFERENCE_CONDITIONS)})"
            )
        if self.carrier is Carrier.COAL and not self.fuel_type:
            raise ValueError("coal factors need a fuel_type (the coal type, e.g. 'industrial')")

    @property
    def key(self) -> tuple[str, ...]:
        """What a lookup matches on; vintages of one key form a time series."""
        return (
            self.publisher,
            self.series,
            self.region,
            self.carrier.value,
            self.unit,
            self.cv_basis or "",
            self.reference_conditions or "",
            self.fuel_type,
        )

    def row(self) -> tuple[Any, ...]:
        """Values of ``_COLUMNS``: the immutable ones, then ``_DESCRIPTIVE``."""
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
            self.data_year,
            self.gwp_set,
            self.gases,
            self.cv_basis or "",
            self.reference_conditions or "",
            self.fuel_type,
            self.ncv,
            self.ncv_unit,
            self.source,
            self.ncv_source,
        )


def _header_lines(path: Path) -> list[int]:
    """1-based line numbers of the ``[[factors]]`` headers, in order (tomllib gives no positions)."""
    text = path.read_text(encoding="utf-8")
    return [i for i, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\[\[\s*factors\s*\]\]", line)]


@dataclass(frozen=True)
class _Vintage:
    """One factor as the vintage check sees it (from the file or the database)."""

    id: str
    key: tuple[str, ...]
    data_year: int
    version: int
    valid_from: date
    valid_to: date


def _vintage(f: Factor) -> _Vintage:
    return _Vintage(f.id, f.key, f.data_year, f.version, f.valid_from, f.valid_to)


def check_vintages(factors: Iterable[_Vintage], where: str, line_of: dict[str, str] | None = None) -> None:
    """Per key: the newest version of each vintage, in date order, must tile time without overlaps
    or gaps; versions of one vintage must differ."""
    at = line_of or {}
    by_key: dict[tuple[str, ...], dict[int, list[_Vintage]]] = defaultdict(lambda: defaultdict(list))
    for v in factors:
        by_key[v.key][v.data_year].append(v)
    for key, vintages in by_key.items():
        newest: list[_Vintage] = []
        for versions in vintages.values():
            versions.sort(key=lambda v: v.version)
            for a, b in itertools.pairwise(versions):
                if a.version == b.version:
                    raise ConfigError(
                        f"{where}: factors {a.id!r}{at.get(a.id, '')} and {b.id!r}{at.get(b.id, '')} are "
                        f"both version {a.version} of vintage {a.data_year} of {key}: a revision needs a "
                        "higher version"
                    )
            newest.append(versions[-1])
        newest.sort(key=lambda v: v.valid_from)
        for a, b in itertools.pairwise(newest):
            if a.valid_to != b.valid_from:
                what = "overlaps" if a.valid_to > b.valid_from else "leaves a gap before"
                raise ConfigError(
                    f"{where}: factor {a.id!r}{at.get(a.id, '')} (vintage {a.data_year}, valid "
                    f"[{a.valid_from}, {a.valid_to})) {what} {b.id!r}{at.get(b.id, '')} (vintage "
                    f"{b.data_year}, from {b.valid_from}): a vintage must end where the next begins"
                )


def load_factors(path: Path) -> list[Factor]:
    """Parse and validate the library; errors name the file, the entry's line and its id."""
    data = read_toml(path)
    check_keys(data, path, ["factors"])
    raw = data.get("factors", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'factors' must be an array of tables ([[factors]])")
    lines = _header_lines(path)
    factors: list[Factor] = []
    line_of: dict[str, str] = {}
    for i, item in enumerate(raw):
        line = f"line {lines[i]}" if i < len(lines) else f"entry #{i + 1}"
        ident = item.get("id") if isinstance(item, dict) else None
        factors.append(validate(Factor, item, path, f"{line}: factor {ident!r}" if ident else line))
        line_of[factors[-1].id] = f" ({line})"
    seen: dict[str, int] = {}
    for i, f in enumerate(factors):
        if f.id in seen:
            raise ConfigError(f"{path}: duplicate factor id {f.id!r} ({line_of[f.id].strip(' ()')})")
        seen[f.id] = i
    check_vintages((_vintage(f) for f in factors), str(path), line_of)
    return factors


@dataclass(frozen=True)
class ApplyResult:
    inserted: int
    updated: int
    unchanged: int


_IMMUTABLE: Final[Sequence[str]] = (
    "factor_id", "publisher", "series", "region", "carrier", "valid_from", "valid_to",
    "kg_co2e_per_unit", "unit", "version", "kg_co2_per_unit", "kg_ch4_per_unit", "kg_n2o_per_unit",
    "data_year", "gwp_set", "gases", "cv_basis", "reference_conditions", "fuel_type", "ncv", "ncv_unit",
)  # fmt: skip
_DESCRIPTIVE: Final[Sequence[str]] = ("source", "ncv_source")
_COLUMNS: Final = ", ".join((*_IMMUTABLE, *_DESCRIPTIVE))
_N_IMMUTABLE: Final = len(_IMMUTABLE)


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
                    f"INSERT INTO emission_factors ({_COLUMNS}) VALUES ({', '.join(['%s'] * len(new))})", new
                )
                inserted += 1
            elif tuple(old[:_N_IMMUTABLE]) != new[:_N_IMMUTABLE]:
                raise ConfigError(
                    f"{path}: factor {f.id!r} was already applied with different values; applied factors "
                    "are immutable (rollups cite them) — add a new version under a new id"
                )
            elif tuple(old[_N_IMMUTABLE:]) != new[_N_IMMUTABLE:]:
                cur.execute(
                    "UPDATE emission_factors SET source = %s, ncv_source = %s WHERE factor_id = %s",
                    (*new[_N_IMMUTABLE:], f.id),
                )
                updated += 1
            else:
                unchanged += 1
        # The library in the DB as a whole (including ids no longer in the file) must stay a clean
        # series of vintages.
        cur.execute(
            "SELECT factor_id, publisher, series, region, carrier, unit, cv_basis, reference_conditions,"
            " fuel_type, data_year, version, valid_from, valid_to FROM emission_factors"
            " WHERE gases IS NOT NULL"  # legacy rows (before 0004) are never looked up again
        )
        everything = [_Vintage(r[0], tuple(r[1:9]), r[9], r[10], r[11], r[12]) for r in cur.fetchall()]
        check_vintages(everything, f"{path} together with the factors already in the database")
    return ApplyResult(inserted, updated, unchanged)
