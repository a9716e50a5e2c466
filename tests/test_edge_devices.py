"""Register maps as data: the SDM630 map, the codecs, and clear errors for broken maps."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.devices import DataType, DeviceMapError, Register, RegisterType, load_device_map, load_model
from edge.modbus import decode_block, plan_blocks
from edge.wire import Quantity
from ops.settings import Settings

CONFIG_DIR = Settings().config_dir


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
    assert all(r.data_type is DataType.FLOAT32 and r.word_order == "big" for r in inputs)
    serial = by_name["serial_number"]
    assert serial.type is RegisterType.HOLDING and serial.address == 0xFC00
    q = sdm.by_quantity()
    assert q[Quantity.ENERGY_IMPORT_KWH].name == "total_import_kwh"
    assert q[Quantity.POWER_W].unit == "W"


def test_float32_is_high_word_first() -> None:
    reg = Register(name="x", address=0)
    assert reg.encode(1.0) == [0x3F80, 0x0000]
    assert reg.decode([0x3F80, 0x0000]) == 1.0
    low_first = Register(name="x", address=0, word_order="little")
    assert low_first.encode(1.0) == [0x0000, 0x3F80]


@given(
    value=st.floats(width=32, allow_nan=False, allow_infinity=False),
    word_order=st.sampled_from(["big", "little"]),
)
def test_float32_round_trips(value: float, word_order: str) -> None:
    reg = Register(name="x", address=0, word_order=word_order)  # type: ignore[arg-type]
    assert reg.decode(reg.encode(value)) == value


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_scaled_int32_round_trips(raw: int) -> None:
    reg = Register(name="e", address=0, data_type=DataType.INT32, word_order="little", scale=0.1)
    words = reg.encode(raw * 0.1)
    assert struct.unpack(">i", struct.pack(">HH", words[1], words[0]))[0] == raw
    assert math.isclose(reg.decode(words), raw * 0.1, rel_tol=1e-12, abs_tol=1e-9)


def test_reads_are_planned_as_few_contiguous_blocks() -> None:
    sdm = load_model(CONFIG_DIR, "eastron_sdm630")
    q = sdm.by_quantity()
    wanted = [q[Quantity.POWER_W], q[Quantity.ENERGY_IMPORT_KWH], q[Quantity.ENERGY_EXPORT_KWH]]
    [block] = plan_blocks(wanted, sdm.max_registers_per_read)
    assert (block.address, block.count) == (0x0034, 0x004C - 0x0034)
    # A register far away, or a tight request limit, splits the read.
    far = [*wanted, Register(name="total_kwh", address=0x0156)]
    assert [(b.address, b.count) for b in plan_blocks(far, 80)] == [(0x0034, 24), (0x0156, 2)]
    assert [(b.address, b.count) for b in plan_blocks(wanted, 20)] == [(0x0034, 2), (0x0048, 4)]
    words = [0] * 24
    words[0x48 - 0x34 : 0x48 - 0x34 + 2] = Register(name="x", address=0).encode(1234.5)
    values = decode_block(block, words)
    assert values[q[Quantity.ENERGY_IMPORT_KWH]] == 1234.5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("model = 'broken'\nregisters = [", "invalid TOML"),
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
    path.write_text(body)
    with pytest.raises(DeviceMapError) as err:
        load_device_map(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
