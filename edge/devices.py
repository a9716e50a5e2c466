"""Device register maps as data (``edge/device_maps/<model>.toml``) and their register codecs.

A map says where each value lives (register type and address), how it is encoded (data type,
byte order, scale), which wire ``Quantity`` it is, if any, and which manufacturer document it was
taken from (``source``).  Maps ship inside the package (a gateway install has them); a file of the
same name in the override directory (``<config_dir>/devices/``) takes precedence, for a site's own
or corrected map.  The edge poller reads maps to decide what to request and how to decode; the
simulator reads the same map to encode.  The maps are checked against the per-device cases in
``tests/devices/``, encoded from the manufacturers' documents without this module.
Only the standard library and pydantic are used: this runs on gateways.
"""

from __future__ import annotations

import itertools
import math
import struct
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.tomlfile import load_toml_model
from edge.wire import Quantity

MAX_REGISTERS_PER_READ: Final = 125  # Modbus limit for function codes 3 and 4


class RegisterType(StrEnum):
    INPUT = "input"  # function code 4
    HOLDING = "holding"  # function code 3


class DataType(StrEnum):
    FLOAT32 = "float32"
    INT32 = "int32"
    UINT32 = "uint32"
    INT16 = "int16"
    UINT16 = "uint16"
    INT64 = "int64"  # Schneider PM5xxx energy counters (Wh)
    UINT64 = "uint64"
    FLOAT64 = "float64"


_STRUCT: Final = {
    DataType.FLOAT32: ">f",
    DataType.INT32: ">i",
    DataType.UINT32: ">I",
    DataType.INT16: ">h",
    DataType.UINT16: ">H",
    DataType.INT64: ">q",
    DataType.UINT64: ">Q",
    DataType.FLOAT64: ">d",
}
_FLOATS: Final = (DataType.FLOAT32, DataType.FLOAT64)
_SIGNED: Final = (DataType.INT16, DataType.INT32, DataType.INT64)

# The order of the value's bytes on the wire, A being the most significant byte, in the usual
# 32-bit names; a 64-bit value follows the same rule over its four words (ABCD = ABCDEFGH,
# CDAB = GHEFCDAB, BADC = BADCFEHG, DCBA = HGFEDCBA) and a 16-bit value has only AB (= ABCD,
# CDAB) and BA (= BADC, DCBA).
#   ABCD: high word first, each word big-endian (Modbus default: Eastron, Schneider)
#   CDAB: low word first, each word big-endian (Carlo Gavazzi INT32)
#   BADC: high word first, bytes of each word swapped
#   DCBA: low word first, bytes swapped: plain little-endian
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
# Manuals number registers from 0 (protocol addresses, Eastron, Carlo Gavazzi) or from 1
# (Schneider: "register 3204" is protocol address 3203).  A map states which, once.
AddressBase = Literal[0, 1]


class Register(BaseModel):
    """One value in a device's register space."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    address: Annotated[int, Field(ge=0, le=0xFFFF)]
    type: RegisterType = RegisterType.INPUT
    data_type: DataType = DataType.FLOAT32
    byte_order: ByteOrder = "ABCD"
    scale: float = 1.0  # engineering value = raw * scale
    unit: str = ""
    quantity: Quantity | None = None  # set when the value maps to a wire quantity
    # Where a counter rolls over to 0 if not at the data type's limit (e.g. a 99999.9 kWh display).
    rollover: Annotated[float, Field(gt=0)] | None = None
    # Raw values the device sends for "not available" (e.g. Schneider's INT64 0x8000000000000000,
    # given as the raw integer): decoded as NaN, i.e. missing, like a NaN float.
    not_available: tuple[int, ...] = ()
    description: str = ""

    @property
    def wraps_at(self) -> float:
        return self.rollover if self.rollover is not None else self.max_raw

    @property
    def max_raw(self) -> float:
        """The largest engineering value the register can hold: where a counter wraps."""
        if self.data_type in _FLOATS:
            return math.inf
        bits = 8 * struct.calcsize(_STRUCT[self.data_type])
        signed = self.data_type in _SIGNED
        return float((1 << (bits - 1 if signed else bits)) - 1) * self.scale

    @property
    def min_raw(self) -> float:
        """The smallest engineering value the register can hold."""
        if self.data_type in _FLOATS:
            return -math.inf
        if self.data_type in _SIGNED:
            return -float(1 << (8 * struct.calcsize(_STRUCT[self.data_type]) - 1)) * self.scale
        return 0.0

    @property
    def count(self) -> int:
        """Number of 16-bit registers the value occupies."""
        return struct.calcsize(_STRUCT[self.data_type]) // 2

    def decode(self, words: list[int]) -> float:
        """Engineering value from the value's own registers (as received, in wire order);
        NaN for a "not available" sentinel."""
        if len(words) != self.count:
            raise ValueError(f"{self.name}: expected {self.count} registers, got {len(words)}")
        raw = struct.unpack(_STRUCT[self.data_type], _reorder(self.byte_order, words))[0]
        if raw in self.not_available and self.data_type not in _FLOATS:
            return math.nan
        return float(raw) * self.scale

    def encode(self, value: float) -> list[int]:
        """Registers (in wire order) holding engineering ``value``; integers are rounded."""
        raw: float | int = value / self.scale
        if self.data_type not in _FLOATS:
            raw = round(raw)
        data = struct.pack(_STRUCT[self.data_type], raw)
        words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
        return _to_wire(self.byte_order, words)


def _swap_bytes(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _to_wire(order: ByteOrder, words: list[int]) -> list[int]:
    """Big-endian words (most significant first) as the device with ``order`` sends them."""
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    if order in ("BADC", "DCBA"):
        words = [_swap_bytes(w) for w in words]
    return words


def _reorder(order: ByteOrder, wire: list[int]) -> bytes:
    """The big-endian bytes of a value received as ``wire`` words in ``order``."""
    words = list(wire)
    if order in ("BADC", "DCBA"):
        words = [_swap_bytes(w) for w in words]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    return b"".join(w.to_bytes(2, "big") for w in words)


class Identification(BaseModel):
    """A model-code register read at connect time: a device answering a code not listed here is
    not this model, and the meter is refused rather than decoded with the wrong map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: Annotated[int, Field(ge=0, le=0xFFFF)]
    type: RegisterType = RegisterType.INPUT
    data_type: Literal[DataType.UINT16, DataType.UINT32] = DataType.UINT16
    # code -> the manufacturer's model name for it
    codes: Annotated[dict[int, str], Field(min_length=1)]

    def register(self) -> Register:
        return Register(name="identification", address=self.address, type=self.type, data_type=self.data_type)


class DeviceMap(BaseModel):
    """A meter model's register map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]
    manufacturer: str = ""
    description: str = ""
    # The manufacturer's document (title, version, table) the addresses were taken from.
    source: Annotated[str, Field(min_length=10)]
    address_base: AddressBase = 0  # 1: addresses below are the manual's 1-based register numbers
    # Some devices refuse long reads; the poller never asks for more than this in one request.
    max_registers_per_read: Annotated[int, Field(ge=1, le=MAX_REGISTERS_PER_READ)] = MAX_REGISTERS_PER_READ
    # Unmapped registers a request may span to save a round trip.  0 (the default) is strict: a
    # request covers only mapped registers, for devices that refuse undocumented addresses.
    max_gap_registers: Annotated[int, Field(ge=0, le=MAX_REGISTERS_PER_READ)] = 0
    identification: Identification | None = None
    registers: Annotated[tuple[Register, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _check(self) -> DeviceMap:
        names: set[str] = set()
        quantities: set[Quantity] = set()
        for reg in self.registers:
            if reg.address < self.address_base:
                raise ValueError(
                    f"register {reg.name!r}: address {reg.address} is below address_base {self.address_base}"
                )
            if reg.name in names:
                raise ValueError(f"register name {reg.name!r} appears twice")
            names.add(reg.name)
            if reg.quantity is not None:
                if reg.quantity in quantities:
                    raise ValueError(f"quantity {reg.quantity.value!r} is mapped by two registers")
                quantities.add(reg.quantity)
        for rtype in RegisterType:
            spans = sorted(
                (r.address, r.address + r.count, r.name) for r in self.registers if r.type == rtype
            )
            for (_, end, name), (start, _, nxt) in itertools.pairwise(spans):
                if start < end:
                    raise ValueError(f"{rtype.value} registers {name!r} and {nxt!r} overlap")
        return self

    def by_quantity(self) -> dict[Quantity, Register]:
        return {r.quantity: r for r in self.registers if r.quantity is not None}

    def on_wire(self) -> DeviceMap:
        """The same map with protocol (0-based) addresses: what pollers and simulators use."""
        if self.address_base == 0:
            return self
        base = self.address_base
        shifted = tuple(r.model_copy(update={"address": r.address - base}) for r in self.registers)
        ident = self.identification
        if ident is not None:
            ident = ident.model_copy(update={"address": ident.address - base})
        return self.model_copy(update={"address_base": 0, "registers": shifted, "identification": ident})


class DeviceMapError(ValueError):
    """A register map that cannot be loaded; the message names the file and the problem."""


PACKAGED_MAPS: Final = Path(__file__).parent / "device_maps"


def devices_dir(config_dir: Path) -> Path:
    """The override directory: a map here replaces the packaged map of the same model."""
    return config_dir / "devices"


def available_models(config_dir: Path) -> list[str]:
    found = {p.stem for d in (PACKAGED_MAPS, devices_dir(config_dir)) if d.is_dir() for p in d.glob("*.toml")}
    return sorted(found)


def model_path(config_dir: Path, model: str) -> Path:
    """Where ``model``'s map is read from: the override directory first, then the package."""
    override = devices_dir(config_dir) / f"{model}.toml"
    return override if override.is_file() else PACKAGED_MAPS / f"{model}.toml"


def load_device_map(path: Path) -> DeviceMap:
    """Load and validate one map; every problem is reported as a DeviceMapError naming the file."""
    device = load_toml_model(path, DeviceMap, DeviceMapError, missing="no such device map")
    if device.model != path.stem:
        raise DeviceMapError(f"{path}: model {device.model!r} does not match the file name")
    return device


def load_model(config_dir: Path, model: str) -> DeviceMap:
    path = model_path(config_dir, model)
    if not path.is_file():
        models = ", ".join(available_models(config_dir))
        raise DeviceMapError(f"no device map for model {model!r}; available models: {models}")
    return load_device_map(path)
