"""Register maps as data: the SDM630 map, the codecs (every byte order, checked against bytes
built with struct, not with the codec), request planning and clear errors for broken maps."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.devices import DataType, DeviceMapError, Register, RegisterType, load_device_map, load_model
from edge.modbus import decode_block, plan_blocks
from edge.wire import Quantity
from ops.settings import Settings

CONFIG_DIR = Settings().config_dir
# Failures must report within seconds (issue 17): bounded searches, no deadline flakiness.
FAST = settings(max_examples=100, deadline=None)


def test_sdm630_map_has_the_eastron_addresses() -> None:
    sdm = load_model(CONFIG_DIR, "eastron_sdm630")
    by_name = {r.name: r for r in sdm.registers}
    expected = {
        "voltage_l1": 0x0000,
        "voltage_l2": 0x0002,
        "voltage_l3": 0x0004,
        "current_l1": 0x0006,
        "total_power": 0x0034,
        "frequency": 0x0046,
        "total_import_kwh": 0x0048,
        "total_export_kwh": 0x004A,
    }
    assert {n: by_name[n].address for n in expected} == expected
    inputs = [r for r in sdm.registers if r.type is RegisterType.INPUT]
    assert all(r.data_type is DataType.FLOAT32 and r.byte_order == "ABCD" for r in inputs)
    serial = by_name["serial_number"]
    assert serial.type is RegisterType.HOLDING and serial.address == 0xFC00
    q = sdm.by_quantity()
    assert q[Quantity.ENERGY_IMPORT_KWH].name == "total_import_kwh"
    assert q[Quantity.POWER_W].unit == "W"


def test_float32_is_high_word_first() -> None:
    reg = Register(name="x", address=0)
    assert reg.encode(1.0) == [0x3F80, 0x0000]
    assert reg.decode([0x3F80, 0x0000]) == 1.0
    low_first = Register(name="x", address=0, byte_order="CDAB")
    assert low_first.encode(1.0) == [0x0000, 0x3F80]


def _wire(big_endian: bytes, order: str) -> list[int]:
    """The words a device with ``order`` sends for a value whose big-endian bytes are given,
    spelled out byte by byte (A = most significant), independent of edge.devices."""
    n = len(big_endian)
    letters = "ABCDEFGH"[:n]
    if n == 2:
        pattern = letters if order in ("ABCD", "CDAB") else letters[::-1]
    else:
        pairs = [letters[i : i + 2] for i in range(0, n, 2)]
        if order in ("CDAB", "DCBA"):
            pairs = pairs[::-1]
        if order in ("BADC", "DCBA"):
            pairs = [p[::-1] for p in pairs]
        pattern = "".join(pairs)
    data = bytes(big_endian[letters.index(c)] for c in pattern)
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, n, 2)]


def test_the_byte_order_names_mean_what_they_say() -> None:
    value = struct.pack(">I", 0x11223344)
    assert _wire(value, "ABCD") == [0x1122, 0x3344]
    assert _wire(value, "CDAB") == [0x3344, 0x1122]
    assert _wire(value, "BADC") == [0x2211, 0x4433]
    assert _wire(value, "DCBA") == [0x4433, 0x2211]
    assert _wire(struct.pack(">Q", 0x1122334455667788), "CDAB") == [0x7788, 0x5566, 0x3344, 0x1122]


ORDERS = st.sampled_from(["ABCD", "CDAB", "BADC", "DCBA"])


@FAST
@given(raw=st.integers(min_value=-(2**31), max_value=2**31 - 1), order=ORDERS)
def test_int32_in_every_byte_order(raw: int, order: str) -> None:
    reg = Register(name="x", address=0, data_type=DataType.INT32, byte_order=order)  # type: ignore[arg-type]
    assert reg.decode(_wire(struct.pack(">i", raw), order)) == raw
    assert reg.encode(raw) == _wire(struct.pack(">i", raw), order)


@FAST
@given(raw=st.integers(min_value=0, max_value=2**64 - 1), order=ORDERS)
def test_uint64_in_every_byte_order(raw: int, order: str) -> None:
    reg = Register(name="x", address=0, data_type=DataType.UINT64, byte_order=order)  # type: ignore[arg-type]
    assert reg.decode(_wire(struct.pack(">Q", raw), order)) == float(raw)


@FAST
@given(value=st.floats(allow_nan=False), order=ORDERS)
def test_float64_and_float32_in_every_byte_order(value: float, order: str) -> None:
    f64 = Register(name="x", address=0, data_type=DataType.FLOAT64, byte_order=order)  # type: ignore[arg-type]
    assert f64.decode(_wire(struct.pack(">d", value), order)) == value
    f32 = Register(name="x", address=0, byte_order=order)  # type: ignore[arg-type]
    v32 = struct.unpack(">f", struct.pack(">f", value))[0] if abs(value) < 3e38 else 1.5
    assert f32.decode(_wire(struct.pack(">f", v32), order)) == v32


def test_16_bit_byte_swap() -> None:
    swapped = Register(name="x", address=0, data_type=DataType.INT16, byte_order="BADC")
    assert swapped.decode([0x34FF]) == float(struct.unpack(">h", bytes([0xFF, 0x34]))[0])
    assert Register(name="x", address=0, data_type=DataType.UINT16).decode([0x34FF]) == 0x34FF


def test_not_available_sentinels_are_missing_values() -> None:
    pm = load_model(CONFIG_DIR, "schneider_pm5xxx")
    energy = pm.by_quantity()[Quantity.ENERGY_IMPORT_KWH]
    assert math.isnan(energy.decode([0x8000, 0, 0, 0]))  # INT64 "not available", not -9.22e15 kWh
    assert energy.decode([0, 0, 0, 1234]) == pytest.approx(1.234)
    assert math.isnan(Register(name="x", address=0).decode([0x7FC0, 0x0000]))  # a NaN float stays NaN


@FAST
@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_scaled_int32_round_trips(raw: int) -> None:
    reg = Register(name="e", address=0, data_type=DataType.INT32, byte_order="CDAB", scale=0.1)
    words = reg.encode(raw * 0.1)
    assert struct.unpack(">i", struct.pack(">HH", words[1], words[0]))[0] == raw
    assert math.isclose(reg.decode(words), raw * 0.1, rel_tol=1e-12, abs_tol=1e-9)


def test_reads_are_planned_as_few_contiguous_blocks() -> None:
    sdm = load_model(CONFIG_DIR, "eastron_sdm630")
    q = sdm.by_quantity()
    wanted = [q[Quantity.POWER_W], q[Quantity.ENERGY_IMPORT_KWH], q[Quantity.ENERGY_EXPORT_KWH]]
    # Strict (the default): only mapped registers, adjacent ones share a request.
    assert [(b.address, b.count) for b in plan_blocks(wanted, 80)] == [(0x0034, 2), (0x0048, 4)]
    [block] = plan_blocks(wanted, sdm.max_registers_per_read, max_gap=18)
    assert (block.address, block.count) == (0x0034, 0x004C - 0x0034)
    # A register far away, or a tight request limit, splits the read.
    far = [*wanted, Register(name="total_kwh", address=0x0156)]
    assert [(b.address, b.count) for b in plan_blocks(far, 80, 32)] == [(0x0034, 24), (0x0156, 2)]
    assert [(b.address, b.count) for b in plan_blocks(wanted, 20, 32)] == [(0x0034, 2), (0x0048, 4)]
    words = [0] * 24
    words[0x48 - 0x34 : 0x48 - 0x34 + 2] = Register(name="x", address=0).encode(1234.5)
    values = decode_block(block, words)
    assert values[q[Quantity.ENERGY_IMPORT_KWH]] == 1234.5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("model = 'broken'\nregisters = [", "invalid TOML"),
        ("model = 'broken'\n[[registers]]\nname = 'a'\naddress = 0\n", "source: Field required"),
        (
            "model = 'broken'\n[[registers]]\nname = 'a'\naddress = 0\n"
            "[[registers]]\nname = 'b'\naddress = 1\n",
            "'a' and 'b' overlap",
        ),
        (
            "model = 'broken'\n[[registers]]\nname = 'a'\naddress = 0\nquantity = 'volts'\n",
            "registers.0.quantity",
        ),
        ("model = 'broken'\n[[registers]]\nname = 'a'\naddress = 70000\n", "registers.0.address"),
        ("model = 'other'\n[[registers]]\nname = 'a'\naddress = 0\n", "does not match the file name"),
        (
            "model = 'broken'\n[[registers]]\nname = 'a'\naddress = 0\nquantity = 'power_w'\n"
            "[[registers]]\nname = 'b'\naddress = 2\nquantity = 'power_w'\n",
            "mapped by two registers",
        ),
    ],
)
def test_broken_maps_are_named_and_explained(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "broken.toml"
    if "invalid TOML" not in message and "source" not in message:
        body = f"source = 'the manual, version 1'\n{body}"
    path.write_text(body)
    with pytest.raises(DeviceMapError) as err:
        load_device_map(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
