"""The emission factor library (``config/factors.toml``): validation and ``apply_factors``.

A factor is keyed by publisher + series + region + carrier + validity and carries a version. Within
one version, validity periods of the same publisher+series+region+carrier must not overlap (the
lookup would be ambiguous); a higher version of the same key may overlap and then supersedes the
lower one where both are valid (recompute picks the highest version).

Applied factors are immutable: rollups record ``factor_id``, so re-applying an id with different
numbers or validity is refused — publish a new version under a new id. Only ``source`` (the
citation text) may be corrected in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from itertools import combinations
from pathlib import Path
from typing import Annotated, Any

import psycopg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from compute.config import Carrier, ConfigError, entry_name, read_toml, validate
from edge.wire import Ident

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


def _finite_non_negative(v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError("must be a finite number >= 0")
    return v


class Factor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    publisher: NonEmpty
    series: NonEmpty
    region: NonEmpty
    carrier: Carrier
    valid_from: date
    valid_to: date  # exclusive
    kg_co2e_per_unit: Annotated[float, AfterValidator(_finite_non_negative)]
    unit: NonEmpty
    version: Annotated[int, Field(ge=1)]
    source: NonEmpty

    @model_validator(mode="after")
    def _check(self) -> Factor:
        if self.valid_from >= self.valid_to:
            raise ValueError(f"valid_from {self.valid_from} must be before valid_to {self.valid_to}")
        if self.carrier is Carrier.ELECTRICITY and self.unit != "kWh":
            raise ValueError(f"electricity factors must be per kWh, not per {self.unit!r}")
        return self

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.publisher, self.series, self.region, self.carrier.value)

    def row(self) -> tuple[Any, ...]:
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
            self.source,
        )


def load_factors(path: Path) -> list[Factor]:
    """Parse and validate the library; raises ``ConfigError`` naming the offending entries."""
    data = read_toml(path)
    unknown = set(data) - {"factors"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected only [[factors]]")
    raw = data.get("factors", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'factors' must be an array of tables ([[factors]])")
    factors = [validate(Factor, item, path, entry_name(item, "factors", i)) for i, item in enumerate(raw)]
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
                f"{path}: factors {a.id!r} and {b.id!r} overlap: same publisher/series/region/carrier "
                f"{a.key} and version {a.version}, validity [{a.valid_from}, {a.valid_to}) and "
                f"[{b.valid_from}, {b.valid_to}); end one period earlier or version the revision higher"
            )
    return factors


@dataclass(frozen=True)
class ApplyResult:
    inserted: int
    updated: int
    unchanged: int


_COLUMNS = (
    "factor_id, publisher, series, region, carrier, valid_from, valid_to, kg_co2e_per_unit, unit, "
    "version, source"
)


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
                    f"INSERT INTO emission_factors ({_COLUMNS}) VALUES ({', '.join(['%s'] * 11)})", new
                )
                inserted += 1
            elif tuple(old[:-1]) != new[:-1]:
                raise ConfigError(
                    f"{path}: factor {f.id!r} was already applied with different values; applied factors "
                    "are immutable (rollups cite them) — add a new version under a new id"
                )
            elif old[-1] != new[-1]:
                cur.execute("UPDATE emission_factors SET source = %s WHERE factor_id = %s", (f.source, f.id))
                updated += 1
            else:
                unchanged += 1
        # The library in the DB as a whole (including ids no longer in the file) must stay unambiguous.
        cur.execute(
            "SELECT a.factor_id, b.factor_id FROM emission_factors a JOIN emission_factors b"
            " ON a.factor_id < b.factor_id AND (a.publisher, a.series, a.region, a.carrier, a.version)"
            " = (b.publisher, b.series, b.region, b.carrier, b.version)"
            " AND a.valid_from < b.valid_to AND b.valid_from < a.valid_to LIMIT 1"
        )
        clash = cur.fetchone()
        if clash:
            raise ConfigError(
                f"{path}: factor {clash[0]!r} overlaps {clash[1]!r} already in the database "
                "(same key, version and overlapping validity)"
            )
    return ApplyResult(inserted, updated, unchanged)
