"""The fleet registry (``config/fleet.toml``): suppliers, sites, gateways, meters; validated and applied.

Unknown keys are rejected everywhere, with one temporary exception: meters may still carry the
simulation keys ``profile``, ``base_kw`` and ``peak_kw`` (moving to the simulator's own config);
they are accepted and ignored.

``apply_fleet`` upserts; it never deletes. Entities in the DB but no longer in the file are
reported so that a person decides (readings and rollups may still reference them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from compute.config import (
    SCOPE2_CARRIERS,
    Carrier,
    ConfigError,
    check_keys,
    read_toml,
    section_entries,
    validate,
)
from compute.factors import REFERENCE_CONDITIONS, Region
from edge.wire import Ident, Quantity

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
SIMULATION_KEYS = frozenset({"profile", "base_kw", "peak_kw"})
# The units a meter of each carrier may count in; the first is the default.
METER_UNITS: Final[dict[Carrier, tuple[str, ...]]] = {
    Carrier.ELECTRICITY: ("kWh",),
    Carrier.HEAT: ("kWh",),
    Carrier.STEAM: ("kWh",),
    Carrier.COOLING: ("kWh",),
    Carrier.NATURAL_GAS: ("m3", "kWh"),
    Carrier.DIESEL: ("l", "kg"),
    Carrier.LPG: ("kg", "l"),
    Carrier.COAL: ("kg",),
}


def _timezone(tz: str) -> str:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {tz!r}") from None
    return tz


def _ratio(v: float) -> float:
    if not math.isfinite(v) or v <= 0:
        raise ValueError("must be a finite number > 0")
    return v


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Supplier(_Entry):
    id: Ident
    name: Name


class Site(_Entry):
    id: Ident
    supplier: Ident
    name: Name
    grid_region: Region  # ISO 3166 (GB, CN, CN-YN) or a China grid region (CN-North); see compute.factors
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    # Published factor series for this site's location-based Scope 2 and its Scope 1 fuels
    # (default: settings), e.g. "ghg-conversion-factors" (UK DESNZ) for a site in GB.
    factor_series: Name | None = None
    fuel_series: Name | None = None


class Gateway(_Entry):
    id: Ident
    site: Ident


class FuelBasis(_Entry):
    """What an amount of a carrier is: its unit, the CV basis of gas in kWh, the reference
    conditions of gas in m3 and the fuel type (the coal type). Shared by meters and by fuel bought
    by invoice (``compute.activity``), so both are matched to factors the same way."""

    carrier: Carrier
    # Default per carrier: natural gas m3, diesel l, LPG and coal kg (``METER_UNITS``).
    unit: Literal["kWh", "m3", "l", "kg"] | None = None
    cv_basis: Literal["gross", "net"] | None = None
    reference_conditions: Literal[REFERENCE_CONDITIONS] | None = None  # type: ignore[valid-type]
    fuel_type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{0,40}$")] = ""

    @model_validator(mode="after")
    def _check_basis(self) -> FuelBasis:
        c = self.carrier.value
        allowed = METER_UNITS[self.carrier]
        if self.unit is not None and self.unit not in allowed:
            raise ValueError(f"{c} counts in {list(allowed)}, not {self.unit!r}")
        unit = self.activity_unit
        if self.carrier in SCOPE2_CARRIERS and (self.cv_basis or self.reference_conditions or self.fuel_type):
            raise ValueError(f"{c} takes no cv_basis, reference_conditions or fuel_type")
        if self.carrier is Carrier.NATURAL_GAS and unit == "kWh" and self.cv_basis is None:
            raise ValueError("natural gas in kWh needs cv_basis (gross or net)")
        if self.carrier is Carrier.NATURAL_GAS and unit == "m3" and self.reference_conditions is None:
            raise ValueError(
                f"natural gas in m3 needs reference_conditions (one of {list(REFERENCE_CONDITIONS)})"
            )
        if self.carrier is Carrier.COAL and not self.fuel_type:
            raise ValueError("coal needs fuel_type (the coal type, e.g. 'industrial')")
        if unit != "kWh" and self.cv_basis is not None:
            raise ValueError("cv_basis applies to amounts in kWh only")
        if unit != "m3" and self.reference_conditions is not None:
            raise ValueError("reference_conditions apply to gas in m3 only")
        return self

    @property
    def activity_unit(self) -> str:
        return self.unit or METER_UNITS[self.carrier][0]


class Meter(FuelBasis):
    id: Ident
    site: Ident
    gateway: Ident | None = None
    model: Name
    unit_id: Annotated[int, Field(ge=0, le=255)] | None = None
    ct_ratio: Annotated[float, AfterValidator(_ratio)] = 1.0
    pt_ratio: Annotated[float, AfterValidator(_ratio)] = 1.0
    # Register rollover value (e.g. 99999.9 for a 6-digit counter, 2**32 for a uint32 register):
    # lets compute undo wraps. Unset: wraps without a quality bit count as unexplained drops.
    counter_max: Annotated[float, AfterValidator(_ratio)] | None = None
    # Longest interval between readings still counted as measured (default: settings).
    max_gap_s: Annotated[float, AfterValidator(_ratio)] | None = None
    # Accuracy class in percent (IEC 62053-21 class 1 = 1.0, class 0.5S = 0.5; MID class B ~ 1):
    # statements state their measurement uncertainty from it. Unset: uncertainty not assessed.
    accuracy_class: Annotated[float, AfterValidator(_ratio)] | None = None
    # The most the metered circuit can draw, in the counter's unit per hour (kW for kWh counters,
    # m3/h, l/h, kg/h): a counter step above max_kw × the interval is implausible and quarantined
    # (compute.quarantine). E.g. a 400 A three-phase feeder at 400 V + 10 % (IEC 60038 supply range):
    # sqrt(3) × 440 V × 400 A ≈ 305 kW.
    # Unset: only the bridge's physical bounds per quantity apply.
    max_kw: Annotated[float, AfterValidator(_ratio)] | None = None
    # Tolerated simulation keys (see module doc); not stored.
    profile: Any = Field(default=None, exclude=True)
    base_kw: Any = Field(default=None, exclude=True)
    peak_kw: Any = Field(default=None, exclude=True)


class NodeMap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    group: str
    node: str
    gateway: str  # fleet-registry gateway id


MemberName = Annotated[str, StringConstraints(min_length=1)]


class MetricMap(BaseModel):
    """One Sparkplug metric → one meter quantity. ``metric`` is the name the node or device gives in
    its birth. For a Template (UDT) instance, ``metric`` names the instance and ``member`` the member:
    a name, or for a member of a nested instance the list of names from the outer instance inwards
    (``member = ["Phase A", "Energy kWh"]``). A separate key, not ``"Meter1/Energy"``, because '/' is
    also the folder separator inside Sparkplug metric names, so a joined path would be ambiguous."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    group: str
    node: str
    device: str | None = None  # None: a metric of the node itself
    metric: Annotated[str, StringConstraints(min_length=1)]
    member: MemberName | Annotated[list[MemberName], Field(min_length=1)] | None = None
    meter: str
    quantity: Quantity = Quantity.ENERGY_IMPORT_KWH
    scale: Annotated[float, Field(gt=0)] = 1.0

    @property
    def path(self) -> tuple[str, ...]:
        """The metric, then the member names down to the value: the host's key for this entry."""
        if self.member is None:
            return (self.metric,)
        return (self.metric, *([self.member] if isinstance(self.member, str) else self.member))

    @property
    def label(self) -> str:
        """How errors name the entry: ``'Meter1' member 'Phase A' / 'Energy kWh'``."""
        if self.member is None:
            return repr(self.metric)
        return f"{self.metric!r} member " + " / ".join(repr(n) for n in self.path[1:])


class SparkplugMap(BaseModel):
    """Sparkplug B edge nodes as fleet gateways, and their metrics as meter quantities
    (``scopemeter sparkplug host``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nodes: list[NodeMap] = []
    metrics: list[MetricMap] = []

    @model_validator(mode="after")
    def _consistent(self) -> SparkplugMap:
        nodes = [(n.group, n.node) for n in self.nodes]
        if len(set(nodes)) != len(nodes):
            raise ValueError("an edge node (group, node) is listed twice in [[nodes]]")
        seen: set[tuple[str, str, str | None, tuple[str, ...]]] = set()
        scalars = {(m.group, m.node, m.device, m.metric) for m in self.metrics if m.member is None}
        for i, m in enumerate(self.metrics):
            where = f"[[sparkplug.metrics]] #{i + 1} (metric {m.label})"
            if (m.group, m.node) not in nodes:
                raise ValueError(f"{where}: edge node {m.group}/{m.node} is not in [[nodes]]")
            key = (m.group, m.node, m.device, m.path)
            if key in seen:
                raise ValueError(f"{where} of {m.group}/{m.node}/{m.device} is mapped twice")
            seen.add(key)
            if m.member is not None and (m.group, m.node, m.device, m.metric) in scalars:
                raise ValueError(
                    f"{where}: {m.metric!r} of {m.group}/{m.node}/{m.device} is mapped both as a number "
                    "(no member) and as a Template instance (with member); it is one or the other"
                )
        return self


class Fleet(BaseModel):
    model_config = ConfigDict(frozen=True)

    suppliers: list[Supplier]
    sites: list[Site]
    gateways: list[Gateway]
    meters: list[Meter]
    sparkplug: SparkplugMap = SparkplugMap()


_SECTIONS: dict[str, type[_Entry]] = {
    "suppliers": Supplier,
    "sites": Site,
    "gateways": Gateway,
    "meters": Meter,
}


def load_fleet(path: Path) -> Fleet:
    """Parse and validate the registry, including references between entries."""
    data = read_toml(path)
    check_keys(data, path, [*_SECTIONS, "sparkplug"])
    parsed: dict[str, list[Any]] = {}
    for section, model in _SECTIONS.items():
        parsed[section] = section_entries(data, path, section, model)
        ids: set[str] = set()
        for entry in parsed[section]:
            if entry.id in ids:
                raise ConfigError(f"{path}: duplicate id {entry.id!r} in [[{section}]]")
            ids.add(entry.id)
    sparkplug = validate(SparkplugMap, data.get("sparkplug", {}), path, "[sparkplug]")
    fleet = Fleet(**parsed, sparkplug=sparkplug)
    suppliers = {s.id for s in fleet.suppliers}
    sites = {s.id for s in fleet.sites}
    gateway_site = {g.id: g.site for g in fleet.gateways}
    for s in fleet.sites:
        if s.supplier not in suppliers:
            raise ConfigError(f"{path}: site {s.id!r}: unknown supplier {s.supplier!r}")
    for g in fleet.gateways:
        if g.site not in sites:
            raise ConfigError(f"{path}: gateway {g.id!r}: unknown site {g.site!r}")
    for m in fleet.meters:
        if m.site not in sites:
            raise ConfigError(f"{path}: meter {m.id!r}: unknown site {m.site!r}")
        if m.gateway is not None:
            if m.gateway not in gateway_site:
                raise ConfigError(f"{path}: meter {m.id!r}: unknown gateway {m.gateway!r}")
            if gateway_site[m.gateway] != m.site:
                raise ConfigError(
                    f"{path}: meter {m.id!r} is at site {m.site!r} but its gateway {m.gateway!r} "
                    f"is at site {gateway_site[m.gateway]!r}"
                )
    meters = {m.id for m in fleet.meters}
    for n in fleet.sparkplug.nodes:
        if n.gateway not in gateway_site:
            raise ConfigError(f"{path}: [sparkplug] node {n.group}/{n.node}: unknown gateway {n.gateway!r}")
    for sm in fleet.sparkplug.metrics:
        if sm.meter not in meters:
            raise ConfigError(f"{path}: [sparkplug] metric {sm.label}: unknown meter {sm.meter!r}")
    return fleet


@dataclass
class FleetApplyResult:
    inserted: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    not_in_file: dict[str, list[str]] = field(default_factory=dict)


def _upsert(
    cur: psycopg.Cursor[Any], table: str, key: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> tuple[int, int]:
    cols = ", ".join(columns)
    rest = [c for c in columns if c != key]
    sql = (
        f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in rest)} "
        f"WHERE ({', '.join(f'{table}.{c}' for c in rest)}) IS DISTINCT FROM "
        f"({', '.join(f'EXCLUDED.{c}' for c in rest)}) "
        "RETURNING (xmax = 0)"
    )
    inserted = updated = 0
    for row in rows:
        cur.execute(sql, row)
        got = cur.fetchone()
        if got is None:
            continue  # unchanged
        if got[0]:
            inserted += 1
        else:
            updated += 1
    return inserted, updated


def apply_fleet(conn: psycopg.Connection[Any], path: Path) -> FleetApplyResult:
    """Validate ``path`` and upsert suppliers, sites, gateways and meters in one transaction."""
    fleet = load_fleet(path)
    result = FleetApplyResult()
    plan: list[tuple[str, str, tuple[str, ...], list[tuple[Any, ...]]]] = [
        ("suppliers", "supplier_id", ("supplier_id", "name"), [(s.id, s.name) for s in fleet.suppliers]),
        (
            "sites",
            "site_id",
            ("site_id", "supplier_id", "name", "grid_region", "timezone", "factor_series", "fuel_series"),
            [
                (s.id, s.supplier, s.name, s.grid_region, s.timezone, s.factor_series, s.fuel_series)
                for s in fleet.sites
            ],
        ),
        ("gateways", "gateway_id", ("gateway_id", "site_id"), [(g.id, g.site) for g in fleet.gateways]),
        (
            "meters",
            "meter_id",
            (
                "meter_id",
                "site_id",
                "gateway_id",
                "carrier",
                "model",
                "unit_id",
                "ct_ratio",
                "pt_ratio",
                "counter_max",
                "max_gap_s",
                "activity_unit",
                "cv_basis",
                "reference_conditions",
                "fuel_type",
                "accuracy_class",
                "max_kw",
            ),
            [
                (
                    m.id,
                    m.site,
                    m.gateway,
                    m.carrier.value,
                    m.model,
                    m.unit_id,
                    m.ct_ratio,
                    m.pt_ratio,
                    m.counter_max,
                    m.max_gap_s,
                    m.activity_unit,
                    m.cv_basis or "",
                    m.reference_conditions or "",
                    m.fuel_type,
                    m.accuracy_class,
                    m.max_kw,
                )
                for m in fleet.meters
            ],
        ),
    ]
    with conn.transaction(), conn.cursor() as cur:
        for table, key, columns, rows in plan:
            ins, upd = _upsert(cur, table, key, columns, rows)
            result.inserted[table], result.updated[table] = ins, upd
            cur.execute(f"SELECT {key} FROM {table} ORDER BY {key}")
            in_file = {r[0] for r in rows}
            result.not_in_file[table] = [r[0] for r in cur.fetchall() if r[0] not in in_file]
    return result
