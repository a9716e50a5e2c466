"""The wire contract between edge agents and the ingest bridge: the MQTT batch, its topic and codec.

This is the one place that defines what a gateway may send. The bridge validates every payload
against it, Kafka carries it unchanged (``readings.v1``), and the writer flattens it into rows.
Identifiers are restricted to a topic-safe alphabet so that no id can smuggle MQTT wildcards or
extra topic levels.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import IntFlag, StrEnum
from typing import Annotated, Any, Final, NotRequired

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import TypedDict

WIRE_VERSION: Final = 1
TOPIC_ROOT: Final = "scopemeter/v1"
MAX_READINGS_PER_BATCH: Final = 10_000
# What the DB columns hold (ingest/migrations/0002_readings.sql): ``batch_seq bigint`` and
# ``quality integer``. A number past these would make the writer's COPY fail on every restart.
MAX_SEQ: Final = 2**63 - 1
# ``value double precision`` holds any finite double, but sums of values near 1.8e308 overflow to
# Infinity in compute. No meter reads more than 1e15 in any unit of ``Quantity`` (the whole world
# uses about 2.7e13 kWh of electricity a year: 26,991 TWh in 2022, IEA Electricity Market Report,
# July 2023 update), so this bound is
# physical and leaves sums of a million values finite. Per-quantity bounds are in ``PLAUSIBLE``.
MAX_ABS_VALUE: Final = 1e15

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


# Outside this window a timestamp is a broken gateway clock, not a measurement.
EARLIEST_TS: Final = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TS: Final = datetime(2100, 1, 1, tzinfo=UTC)

# An instant: the offset is required and kept as sent (PostgreSQL stores the instant). Constraints
# are pydantic's own, checked in Rust: a Python validator per reading cost the bridge a quarter of
# its CPU (``scopemeter bench ingest``).
Instant = Annotated[AwareDatetime, Field(ge=EARLIEST_TS, lt=LATEST_TS)]


class Quantity(StrEnum):
    """What a reading measures; the unit is part of the name so it can never be ambiguous."""

    ENERGY_IMPORT_KWH = "energy_import_kwh"  # cumulative counter
    ENERGY_EXPORT_KWH = "energy_export_kwh"  # cumulative counter
    POWER_W = "power_w"  # instantaneous total active power
    GAS_M3 = "gas_m3"  # cumulative counter
    # Fuel meters (flow totalisers, weighbridges): the meter's carrier in the fleet registry says
    # which fuel (diesel, lpg, coal, ...).
    FUEL_L = "fuel_l"  # cumulative counter, litres
    FUEL_KG = "fuel_kg"  # cumulative counter, kg


COUNTER_QUANTITIES: Final = frozenset(
    {
        Quantity.ENERGY_IMPORT_KWH,
        Quantity.ENERGY_EXPORT_KWH,
        Quantity.GAS_M3,
        Quantity.FUEL_L,
        Quantity.FUEL_KG,
    }
)


# Physical bounds per quantity, in the quantity's unit: a value outside is no measurement (a
# decoding error, a wrong register map, or a forged batch) and goes to the DLQ as
# ``implausible_value``. Counters cannot be negative. 1e12 kWh (1,000 TWh) is over 3 % of the
# world's yearly electricity use (26,991 TWh in 2022, IEA Electricity Market Report, July 2023
# update): no single site's register reaches it. 1e11 W is four times the largest power station
# (Three Gorges: 32 × 700 MW + 2 × 50 MW = 22,500 MW installed). The same 1e12 bound is used for
# gas and fuel totalisers (m3, L, kg), which no site approaches either.
PLAUSIBLE: Final[dict[str, tuple[float, float]]] = {
    "energy_import_kwh": (0.0, 1e12),
    "energy_export_kwh": (0.0, 1e12),
    "power_w": (-1e11, 1e11),
    "gas_m3": (0.0, 1e12),
    "fuel_l": (0.0, 1e12),
    "fuel_kg": (0.0, 1e12),
}


class Quality(IntFlag):
    """Quality bits set at the source; 0 means a plain good measurement."""

    GOOD = 0
    ESTIMATED = 1
    COUNTER_WRAP = 2
    COUNTER_RESET = 4
    METER_REPLACED = 8
    CLOCK_SUSPECT = 16
    OUT_OF_RANGE = 32


class Reading(BaseModel):
    """One measurement; (meter_id, quantity, ts) is its identity everywhere downstream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    meter_id: Ident
    quantity: Quantity
    ts: Instant
    # Strict: JSON numbers only (``true`` and ``"12.5"`` are refused, not coerced).
    value: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
    quality: Annotated[int, Field(strict=True, ge=0, le=0xFFFF)] = 0


class Batch(BaseModel):
    """What one MQTT message carries: readings of one gateway, numbered by a per-gateway sequence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Annotated[int, Field(strict=True, ge=WIRE_VERSION, le=WIRE_VERSION)] = WIRE_VERSION  # not `true`
    supplier: Ident
    site: Ident
    gateway: Ident
    seq: Annotated[int, Field(strict=True, ge=0, le=MAX_SEQ)]
    sent_at: Instant
    readings: Annotated[list[Reading], Field(min_length=1, max_length=MAX_READINGS_PER_BATCH)]

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, payload: bytes | str) -> Batch:
        """Parse and validate; raises ``pydantic.ValidationError`` on anything off-contract."""
        return cls.model_validate_json(payload)


def _as_typed_dict(model: type[BaseModel], **replace: Any) -> Any:
    """``model``'s fields (types, constraints, optionality, extra="forbid") as a TypedDict."""
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        t = replace.get(name) or (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation)
        fields[name] = t if f.is_required() else NotRequired[t]
    typed = TypedDict(model.__name__ + "Fields", fields)  # type: ignore[misc]
    typed.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return typed


# The same contract as Batch, derived from it field by field, validating into plain dicts: a
# third cheaper than building a thousand Reading models that the bridge would only throw away.
_ReadingFields = _as_typed_dict(Reading)
_READINGS_LIMITS = Batch.model_fields["readings"].metadata
_BATCH_CHECK: TypeAdapter[dict[str, Any]] = TypeAdapter(
    _as_typed_dict(Batch, readings=Annotated[(list.__class_getitem__(_ReadingFields), *_READINGS_LIMITS)])
)


def check_batch(payload: bytes | str) -> dict[str, Any]:
    """Validate exactly as ``Batch.decode`` does (a test holds them equal) and return the plain
    data; raises ``pydantic.ValidationError`` on anything off-contract."""
    return _BATCH_CHECK.validate_json(payload)


class TopicIdentity(BaseModel):
    """The identity an MQTT topic claims; must equal the payload's."""

    model_config = ConfigDict(frozen=True)

    supplier: Ident
    site: Ident
    gateway: Ident


def readings_topic(supplier: str, site: str, gateway: str) -> str:
    return f"{TOPIC_ROOT}/{supplier}/{site}/{gateway}/readings"


def status_topic(supplier: str, site: str, gateway: str) -> str:
    return f"{TOPIC_ROOT}/{supplier}/{site}/{gateway}/status"


READINGS_SUBSCRIPTION: Final = f"{TOPIC_ROOT}/+/+/+/readings"


def parse_readings_topic(topic: str) -> TopicIdentity:
    """Return the identity in a readings topic; raises ValueError for any other topic."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != TOPIC_ROOT or parts[5] != "readings":
        raise ValueError(f"not a readings topic: {topic!r}")
    return TopicIdentity(supplier=parts[2], site=parts[3], gateway=parts[4])
