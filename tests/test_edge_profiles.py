"""Every device profile against its per-device case (tests/devices/<model>/case.toml).

A case holds the registers as the device serves them -- words written from the manufacturer's
document, not produced by edge.devices -- and the values that document says they mean.  A plain
pymodbus server (not the project's simulator) serves exactly those registers and refuses every
other address, as a strict device does; the real poller reads and decodes them.  A profile without
a case, or a map register without a word in its case, fails here.
"""

from __future__ import annotations

import asyncio
import math
import time
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymodbus.datastore import ModbusDeviceContext, ModbusServerContext, ModbusSparseDataBlock
from pymodbus.server import ModbusTcpServer

from edge.config import EdgeConfig
from edge.devices import PACKAGED_MAPS, load_device_map
from edge.modbus import ModbusPoller, PollResult
from edge.wire import Quantity
from ops.settings import ClockSettings

CASES = Path(__file__).parent / "devices"
PROFILES = sorted(p.stem for p in PACKAGED_MAPS.glob("*.toml"))
T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)


def load_case(model: str) -> dict[str, Any]:
    path = CASES / model / "case.toml"
    assert path.is_file(), f"profile {model} has no device case at {path}"
    return tomllib.loads(path.read_text())


def served(case: dict[str, Any]) -> dict[str, dict[int, int]]:
    """Register space by type ("input"/"holding"): address -> word."""
    space: dict[str, dict[int, int]] = {"input": {}, "holding": {}}
    entries = [*case["registers"], *([case["identification"]] if "identification" in case else [])]
    for entry in entries:
        for i, word in enumerate(entry["words"]):
            space[entry["type"]][entry["address"] + i] = word
    return space


async def serving(
    space: dict[str, dict[int, int]], unit: int, body: Callable[[int], Awaitable[None]]
) -> None:
    device = ModbusDeviceContext(
        ir=ModbusSparseDataBlock(space["input"] or {0xFFFE: 0}),
        hr=ModbusSparseDataBlock(space["holding"] or {0xFFFE: 0}),
    )
    server = ModbusTcpServer(
        ModbusServerContext(devices={unit: device}, single=False), address=("127.0.0.1", 0)
    )
    await server.serve_forever(background=True)
    try:
        await body(server.transport.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


def config(port: int, model: str, unit: int, quantities: list[str] | None = None) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "supplier": "s",
            "site": "x",
            "gateway": "g",
            "quantities": quantities or ["energy_import_kwh"],
            "modbus_timeout_s": 1.0,
            "modbus_retries": 0,
            "meters": [{"id": "m1", "host": "127.0.0.1", "port": port, "unit_id": unit, "model": model}],
        }
    )


def clock() -> ClockSettings:
    return ClockSettings(speed=1e-9, sim_start=T0, wall_start=time.time())


async def read_all(port: int, model: str, unit: int, maps_model: str | None = None) -> PollResult:
    device = load_device_map(PACKAGED_MAPS / f"{maps_model or model}.toml")
    cfg = config(port, maps_model or model, unit)
    poller = ModbusPoller(cfg, {device.model: device}, clock(), all_registers=True)
    try:
        return await poller.poll()
    finally:
        poller.close()


def test_every_profile_has_a_case() -> None:
    cases = sorted(p.name for p in CASES.iterdir() if (p / "case.toml").is_file())
    assert cases == PROFILES


@pytest.mark.parametrize("model", PROFILES)
def test_profile_decodes_its_device_case(model: str) -> None:
    case = load_case(model)
    device = load_device_map(PACKAGED_MAPS / f"{model}.toml")
    expected = {r["name"]: r["expected"] for r in case["registers"]}
    assert sorted(expected) == sorted(r.name for r in device.registers), "the case covers every map register"
    result: list[PollResult] = []

    async def body(port: int) -> None:
        result.append(await read_all(port, model, case["unit_id"]))

    asyncio.run(serving(served(case), case["unit_id"], body))
    [res] = result
    assert res.status == {"m1": "ok"} and not res.failed_meters
    assert not {k: v for k, v in res.errors.items() if k != "invalid_value"}
    decoded = {reg.name: value for reg, value in res.decoded["m1"]}
    serial_expected = expected.pop("serial_number", None)
    for name, want in expected.items():
        if want == "not available":
            assert math.isnan(decoded[name]), name
        else:
            assert decoded[name] == pytest.approx(want, rel=1e-9, abs=1e-9), name
    if serial_expected is not None:  # read at connect, kept as the meter's serial
        assert "serial_number" not in decoded
    # What the agent would publish: the import counter, never a "not available" sentinel.
    readings = {r.quantity: r.value for r in res.readings}
    assert readings[Quantity.ENERGY_IMPORT_KWH] == pytest.approx(expected["total_import_kwh"])


def test_an_rs485_em24_is_refused_by_the_e1_profile_and_read_by_its_own() -> None:
    """The bench finding of issue 12: an RS-485 EM24 read with the E1 map gave 6 232 550.1 kWh
    with quality good.  Its model code now refuses the wrong profile; the right one reads 123 456.7."""
    case = load_case("carlo_gavazzi_em24")
    results: dict[str, PollResult] = {}

    async def body(port: int) -> None:
        results["e1"] = await read_all(port, "carlo_gavazzi_em24", case["unit_id"], "carlo_gavazzi_em24_e1")
        results["rs485"] = await read_all(port, "carlo_gavazzi_em24", case["unit_id"])

    asyncio.run(serving(served(case), case["unit_id"], body))
    assert results["e1"].status == {"m1": "wrong_model"} and results["e1"].readings == []
    assert results["e1"].errors == {"wrong_model": 1}
    got = {r.quantity: r.value for r in results["rs485"].readings}
    assert got[Quantity.ENERGY_IMPORT_KWH] == pytest.approx(123456.7)
    assert got[Quantity.ENERGY_EXPORT_KWH] == pytest.approx(2345.6)
