"""A gateway's configuration (``config/edge/<gateway>.toml``): who it is, what it polls, how it
batches and where its outbox lives."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.devices import DeviceMap, DeviceMapError, format_validation_error, load_model
from edge.wire import MAX_READINGS_PER_BATCH, Ident, Quantity

DEFAULT_QUANTITIES = (Quantity.ENERGY_IMPORT_KWH, Quantity.POWER_W)


class EdgeMeter(BaseModel):
    """A meter the gateway polls: a Modbus TCP endpoint and unit id, decoded with ``model``'s map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=0, le=255)]
    model: Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]
    quantities: tuple[Quantity, ...] | None = None  # None: the gateway's default


class EdgeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    supplier: Ident
    site: Ident
    gateway: Ident
    poll_interval_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    quantities: Annotated[tuple[Quantity, ...], Field(min_length=1)] = DEFAULT_QUANTITIES
    max_readings_per_batch: Annotated[int, Field(ge=1, le=MAX_READINGS_PER_BATCH)] = 1000
    # Bounded outbox: past this many unacknowledged batches the oldest are dropped (and counted),
    # so a long broker outage cannot fill the gateway's disk.
    outbox_max_batches: Annotated[int, Field(ge=1)] = 100_000
    # Relative paths are under the state directory (Settings().stack.state_dir).
    outbox_path: Path = Path("edge/outbox.sqlite")
    modbus_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Batches handed to the MQTT client at once; the rest wait in the outbox.
    max_inflight: Annotated[int, Field(ge=1, le=10_000)] = 100
    meters: Annotated[tuple[EdgeMeter, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> EdgeConfig:
        ids = [m.id for m in self.meters]
        if dupes := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"meter ids must be unique; repeated: {', '.join(dupes)}")
        units = [(m.host, m.port, m.unit_id) for m in self.meters]
        if dupes_u := sorted({f"{h}:{p}/{u}" for h, p, u in units if units.count((h, p, u)) > 1}):
            raise ValueError(f"two meters share an endpoint and unit id: {', '.join(dupes_u)}")
        return self

    def quantities_of(self, meter: EdgeMeter) -> tuple[Quantity, ...]:
        return meter.quantities if meter.quantities is not None else self.quantities

    def resolved_outbox(self, state_dir: Path) -> Path:
        return self.outbox_path if self.outbox_path.is_absolute() else state_dir / self.outbox_path


class EdgeConfigError(ValueError):
    """A config that cannot be used; the message names the file and every problem."""


def load_edge_config(path: Path) -> EdgeConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgeConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return EdgeConfig.model_validate(data)
    except ValidationError as exc:
        raise EdgeConfigError(f"{path}: {format_validation_error(exc)}") from None


def load_device_maps(config: EdgeConfig, config_dir: Path) -> dict[str, DeviceMap]:
    """The register map of every model the config uses, checked to map every wanted quantity."""
    maps: dict[str, DeviceMap] = {}
    problems: list[str] = []
    for meter in config.meters:
        if meter.model not in maps:
            try:
                maps[meter.model] = load_model(config_dir, meter.model)
            except DeviceMapError as exc:
                problems.append(str(exc))
                continue
        mapped = maps[meter.model].by_quantity()
        missing = [q.value for q in config.quantities_of(meter) if q not in mapped]
        if missing:
            problems.append(
                f"meter {meter.id}: model {meter.model} maps no register for {', '.join(missing)}"
            )
    if problems:
        raise EdgeConfigError("; ".join(dict.fromkeys(problems)))
    return maps
