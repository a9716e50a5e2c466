"""Non-metered activity data (``config/activity.toml`` or a CSV): refrigerant top-ups, fuel bought
by invoice and on-site generation, each with its provenance. ``apply_activity`` validates the file,
computes the emissions and upserts ``activity_records``; statements report them as not metered.

- Refrigerants (Scope 1, HFCs): emissions = kg topped up x the gas's 100-year GWP in the stated
  set (the GHG Protocol's simplified mass-balance: what is refilled is what leaked). Blends are
  computed from their mass composition (ASHRAE 34), e.g. R-410A = 50 % HFC-32 + 50 % HFC-125.
- Fuel by invoice (Scope 1): amount in the fuel's unit with the same basis a meter states (CV
  basis, reference conditions, coal type), matched to a factor exactly like metered fuel
  (``compute.recompute.FACTOR_LOOKUP``). The whole invoice period must lie in one factor's validity;
  otherwise it is refused (split the invoice at the vintage boundary).
- On-site generation (PV, wind): self-consumed and exported kWh, for disclosure; no emissions.

Re-applying replaces records by id; records no longer in the file are reported, not deleted.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

import psycopg
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, model_validator

from compute.config import SCOPE2_CARRIERS, ConfigError, check_keys, read_toml, section_entries, validate
from compute.fleet import FuelBasis
from compute.recompute import DEFAULT_FUEL_SERIES, FACTOR_LOOKUP
from edge.wire import Ident

Provenance = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=500)]

# 100-year GWPs of the pure HFCs. AR4: IPCC AR4 WG1 Table 2.14 (checked against US EPA 40 CFR 98
# Subpart A Table A-1, which uses AR4). AR6: AR6 WG1 Table 7.SM.7 (checked against the IIR/RTOC
# 2022 table as reproduced by Project Drawdown). AR5: AR5 WG1 Table 8.A.1 — UNVERIFIED here.
HFC_GWP: Final[dict[str, dict[str, float]]] = {
    "HFC-32": {"AR4": 675.0, "AR5": 677.0, "AR6": 771.0},
    "HFC-125": {"AR4": 3500.0, "AR5": 3170.0, "AR6": 3740.0},
    "HFC-134a": {"AR4": 1430.0, "AR5": 1300.0, "AR6": 1530.0},
    "HFC-143a": {"AR4": 4470.0, "AR5": 4800.0, "AR6": 5810.0},
}
# Blend compositions by mass (ASHRAE Standard 34); checked against the IIR/RTOC AR6 blend GWPs
# (R-410A 2,256, R-404A 4,728, R-407C 1,908), which these fractions reproduce.
BLENDS: Final[dict[str, dict[str, float]]] = {
    "R-410A": {"HFC-32": 0.5, "HFC-125": 0.5},
    "R-404A": {"HFC-125": 0.44, "HFC-143a": 0.52, "HFC-134a": 0.04},
    "R-407C": {"HFC-32": 0.23, "HFC-125": 0.25, "HFC-134a": 0.52},
}
REFRIGERANTS: Final = (*HFC_GWP, *BLENDS)


def gwp(gas: str, gwp_set: str) -> float:
    """The 100-year GWP of a pure HFC or a blend in one IPCC assessment's set."""
    if gas in HFC_GWP:
        return HFC_GWP[gas][gwp_set]
    return sum(share * HFC_GWP[part][gwp_set] for part, share in BLENDS[gas].items())


def _positive(v: float) -> float:
    if not math.isfinite(v) or v <= 0:
        raise ValueError("must be a finite number > 0")
    return v


def _non_negative(v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError("must be a finite number >= 0")
    return v


Positive = Annotated[float, AfterValidator(_positive)]
NonNegative = Annotated[float, AfterValidator(_non_negative)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str]

    id: Ident
    site: Ident
    period_start: date
    period_end: date  # exclusive
    provenance: Provenance  # the document behind the number: service report, invoice, inverter log

    @model_validator(mode="after")
    def _period(self) -> _Record:
        if self.period_start >= self.period_end:
            raise ValueError(f"period_start {self.period_start} must be before period_end {self.period_end}")
        return self


class Refrigerant(_Record):
    kind = "refrigerant"
    gas: Literal[REFRIGERANTS]  # type: ignore[valid-type]
    kg: Positive
    gwp_set: Literal["AR4", "AR5", "AR6"]


class FuelPurchase(_Record, FuelBasis):
    kind = "fuel_purchase"
    amount: Positive

    @model_validator(mode="after")
    def _fuel(self) -> FuelPurchase:
        if self.carrier in SCOPE2_CARRIERS:
            raise ValueError(f"{self.carrier.value} is not a fuel; purchased energy is metered Scope 2")
        return self


class Generation(_Record):
    kind = "generation"
    source: Literal["pv", "wind"]
    self_consumed_kwh: NonNegative
    exported_kwh: NonNegative


_SECTIONS: Final[dict[str, type[_Record]]] = {
    "refrigerants": Refrigerant,
    "fuel_purchases": FuelPurchase,
    "generation": Generation,
}
Record = _Record


def load_activity(path: Path) -> list[Record]:
    """A TOML file with [[refrigerants]], [[fuel_purchases]], [[generation]], or a CSV with a
    ``section`` column naming one of those and the same keys as columns (empty cell = not given)."""
    records: list[Record] = []
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        for i, row in enumerate(rows, 2):  # line 1 is the header
            section = (row.pop("section", None) or "").strip()
            model = _SECTIONS.get(section)
            if model is None:
                raise ConfigError(
                    f"{path}: line {i}: section must be one of {sorted(_SECTIONS)}, not {section!r}"
                )
            data = {k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip()}
            records.append(validate(model, data, path, f"line {i} ({section}, id={data.get('id')!r})"))
    else:
        data = read_toml(path)
        check_keys(data, path, list(_SECTIONS))
        for section, model in _SECTIONS.items():
            records += section_entries(data, path, section, model)
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ConfigError(f"{path}: duplicate activity record id {r.id!r}")
        seen.add(r.id)
    return records


@dataclass
class ActivityApplyResult:
    written: int = 0
    refused: list[str] = field(default_factory=list)  # record ids without a factor, with the reason
    not_in_file: list[str] = field(default_factory=list)


_FACTOR = (
    "WITH e AS (SELECT %(carrier)s::text AS carrier, %(unit)s::text AS unit, %(cv)s::text AS cv_basis,"
    " %(refc)s::text AS refc, %(fuel_type)s::text AS fuel_type, 1 AS scope)"
    " SELECT f.* FROM e CROSS JOIN (SELECT * FROM sites WHERE site_id = %(site)s) s,"
    " LATERAL ({lookup}) f"
)

_COLUMNS: Final = (
    "record_id, site_id, kind, period_start, period_end, scope, carrier, gas, amount, unit, cv_basis,"
    " reference_conditions, fuel_type, exported_kwh, gwp_set, kg_co2e, kg_co2, kg_ch4, kg_n2o, kg_hfc,"
    " factor_id, refusal, provenance"
)


def _factor(cur: psycopg.Cursor[Any], p: FuelPurchase, day: date, fuel_series: str) -> tuple[Any, ...] | None:
    sql = _FACTOR.format(lookup=FACTOR_LOOKUP.format(day="%(day)s::date"))
    args = {
        "carrier": p.carrier.value,
        "unit": p.activity_unit,
        "cv": p.cv_basis or "",
        "refc": p.reference_conditions or "",
        "fuel_type": p.fuel_type,
        "site": p.site,
        "day": day,
        "series": "",
        "fuel_series": fuel_series,
    }
    row = cur.execute(sql, args).fetchone()
    return tuple(row) if row else None


def _row(cur: psycopg.Cursor[Any], r: Record, fuel_series: str) -> tuple[Any, ...]:
    base = (r.id, r.site, r.kind, r.period_start, r.period_end)
    if isinstance(r, Refrigerant):
        kg = r.kg * gwp(r.gas, r.gwp_set)
        return (*base, 1, None, r.gas, r.kg, "kg", "", "", "", None, r.gwp_set, kg, None, None, None, r.kg,
                None, None, r.provenance)  # fmt: skip
    if isinstance(r, Generation):
        return (*base, None, "electricity", r.source, r.self_consumed_kwh, "kWh", "", "", "", r.exported_kwh,
                None, None, None, None, None, None, None, None, r.provenance)  # fmt: skip
    if not isinstance(r, FuelPurchase):
        raise TypeError(f"unknown activity record type {type(r).__name__}")
    first = _factor(cur, r, r.period_start, fuel_series)
    last = _factor(cur, r, r.period_end - timedelta(days=1), fuel_series)
    basis = (r.carrier.value, None, r.amount, r.activity_unit, r.cv_basis or "", r.reference_conditions or "",
             r.fuel_type, None)  # fmt: skip
    if first is None or last is None or first[0] != last[0]:
        why = (
            f"no emission factor for {r.carrier.value} per {r.activity_unit} at site {r.site!r} in series "
            f"{fuel_series!r} (or the site's own) for {r.period_start}..{r.period_end}"
            if first is None or last is None
            else f"the period spans factors {first[0]!r} and {last[0]!r}: split the invoice at the boundary"
        )
        return (*base, 1, *basis, None, None, None, None, None, None, None, why, r.provenance)
    fid, co2e, co2, ch4, n2o = first
    a = r.amount
    return (
        *base,
        1,
        *basis,
        None,
        a * co2e,
        a * co2,
        _mul(a, ch4),
        _mul(a, n2o),
        None,
        fid,
        None,
        r.provenance,
    )


def _mul(a: float, x: float | None) -> float | None:
    return None if x is None else a * x


def apply_activity(
    conn: psycopg.Connection[Any], path: Path, fuel_series: str = DEFAULT_FUEL_SERIES
) -> ActivityApplyResult:
    """Validate ``path``, compute each record's emissions and upsert them in one transaction."""
    records = load_activity(path)
    result = ActivityApplyResult()
    with conn.transaction(), conn.cursor() as cur:
        sites = {r[0] for r in cur.execute("SELECT site_id FROM sites").fetchall()}
        for r in records:
            if r.site not in sites:
                raise ConfigError(
                    f"{path}: activity record {r.id!r}: unknown site {r.site!r} (apply the fleet first)"
                )
            row = _row(cur, r, fuel_series)
            n = len(row)
            cur.execute(
                f"INSERT INTO activity_records ({_COLUMNS}) VALUES ({', '.join(['%s'] * n)})"
                " ON CONFLICT (record_id) DO UPDATE SET "
                + ", ".join(f"{c.strip()} = EXCLUDED.{c.strip()}" for c in _COLUMNS.split(",")[1:])
                + ", applied_at = now()",
                row,
            )
            result.written += 1
            if row[21] is not None:
                result.refused.append(f"{r.id}: {row[21]}")
        ids = {r.id for r in records}
        result.not_in_file = [
            x[0]
            for x in cur.execute("SELECT record_id FROM activity_records ORDER BY 1").fetchall()
            if x[0] not in ids
        ]
    return result
