"""The simulated site (``config/simulation/*.toml``): a Modbus TCP endpoint and its meters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.tomlfile import load_toml_model
from edge.wire import Ident
from simulators.faults import Fault
from simulators.loadprofile import ProfileSpec


class ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 15020  # 0: any free port (reported on start)
    # socket: Modbus TCP.  rtu: RTU frames over TCP, like an RS485-to-Ethernet converter.
    framer: Literal["socket", "rtu"] = "socket"
    # Set: serve RTU on this serial device instead of TCP (host and port unused), like meters on
    # an RS485 line; one end of a simulators.nullmodem.NullModem for tests.  Needs pyserial.
    serial_port: Annotated[str, Field(min_length=1)] | None = None
    baudrate: Annotated[int, Field(gt=0)] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class SimMeter(BaseModel):
    """One meter behind the gateway; its profile's noise stream is keyed by (seed, id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    unit_id: Annotated[int, Field(ge=1, le=247)]
    model: str = "eastron_sdm630"
    initial_import_kwh: Annotated[float, Field(ge=0)] = 0.0
    initial_export_kwh: Annotated[float, Field(ge=0)] = 0.0
    nominal_voltage: Annotated[float, Field(gt=0)] = 220.0  # line to neutral (China: 220/380 V)
    frequency_hz: Annotated[float, Field(gt=0)] = 50.0
    seed: int = 0
    serial: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None  # None: 20_000_000 + unit_id
    profile: ProfileSpec
    faults: tuple[Fault, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _bind_profile(cls, data: Any) -> Any:
        # The profile's noise identity comes from the meter, so it is written once in the file.
        if isinstance(data, dict) and isinstance(data.get("profile"), dict):
            profile = dict(data["profile"])
            profile.setdefault("key", data.get("id", ""))
            profile.setdefault("seed", data.get("seed", 0))
            data = {**data, "profile": profile}
        return data


class SimulationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    site: Ident | None = None
    server: ServerConfig = ServerConfig()
    meters: Annotated[tuple[SimMeter, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> SimulationConfig:
        for attr in ("id", "unit_id"):
            values = [getattr(m, attr) for m in self.meters]
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"meter {attr} must be unique; repeated: {', '.join(dupes)}")
        return self


class SimulationConfigError(ValueError):
    pass


def load_simulation(path: Path) -> SimulationConfig:
    """Load and validate; problems are raised as one SimulationConfigError naming the file."""
    return load_toml_model(path, SimulationConfig, SimulationConfigError)
