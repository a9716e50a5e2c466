"""Meter drivers against pymodbus servers serving each device map: Modbus TCP and RTU framing
over TCP, CT/PT ratios, 1-based addressing, per-meter timeouts, and the simulator's faults showing
up as counted errors or quality bits."""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from edge.config import EdgeConfig
from edge.devices import PACKAGED_MAPS, load_model
from edge.modbus import ModbusPoller, PollResult
from edge.wire import Quality, Quantity
from ops.settings import ClockSettings, Settings
from simulators.config import SimulationConfig
from simulators.meters import RunningSimulator, start_simulator

CONFIG_DIR = Settings().config_dir
T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)
MODELS = [
    "eastron_sdm630",
    "eastron_sdm120",
    "carlo_gavazzi_em24",
    "carlo_gavazzi_em24_e1",
    "schneider_pm5xxx",
]
ALL_Q = ["energy_import_kwh", "energy_export_kwh", "power_w"]


def frozen_clock() -> ClockSettings:
    """Simulated time that barely moves: what the poller reads equals the truth at T0."""
    return ClockSettings(speed=1e-9, sim_start=T0, wall_start=time.time())


def sim_config(meters: list[dict[str, Any]], framer: str = "socket") -> SimulationConfig:
    flat_30kw = {"kind": "production", "base_kw": 30.0, "peak_kw": 30.0, "noise": 0.0}
    base = {"profile": flat_30kw, "initial_import_kwh": 12345.6}
    return SimulationConfig.model_validate(
        {"server": {"port": 0, "framer": framer}, "meters": [{**base, **m} for m in meters]}
    )


def edge_config(port: int, meters: list[dict[str, Any]], transport: str = "tcp", **extra: Any) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            **extra,
            "supplier": "s",
            "site": "x",
            "gateway": "g",
            "quantities": ALL_Q,
            "modbus_timeout_s": 0.3,
            "modbus_retries": 0,
            "meters": [{"host": "127.0.0.1", "port": port, "transport": transport, **m} for m in meters],
        }
    )


def run(
    sim_cfg: SimulationConfig,
    clock: ClockSettings,
    body: Callable[[RunningSimulator], Awaitable[None]],
    config_dir: Path = CONFIG_DIR,
) -> None:
    async def main() -> None:
        sim = await start_simulator(sim_cfg, clock, config_dir, host="127.0.0.1", port=0)
        try:
            await body(sim)
        finally:
            await sim.stop()

    asyncio.run(main())


def maps_for(config: EdgeConfig, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    return {m.model: load_model(config_dir, m.model) for m in config.meters}


@pytest.mark.parametrize("transport", ["tcp", "rtu_over_tcp"])
@pytest.mark.parametrize("model", MODELS)
def test_each_profile_reads_the_truth(model: str, transport: str) -> None:
    clock = frozen_clock()
    framer = "rtu" if transport == "rtu_over_tcp" else "socket"
    cfg = sim_config([{"id": "m1", "unit_id": 7, "model": model}], framer)

    async def body(sim: RunningSimulator) -> None:
        config = edge_config(sim.port, [{"id": "m1", "unit_id": 7, "model": model}], transport)
        poller = ModbusPoller(config, maps_for(config), clock)
        try:
            result = await poller.poll()
        finally:
            poller.close()
        assert result.failed_meters == [] and not result.errors
        got = {r.quantity: r.value for r in result.readings}
        truth = sim.meters["m1"].import_kwh(clock.now())
        resolution = {"carlo_gavazzi_em24": 0.1, "carlo_gavazzi_em24_e1": 0.1, "schneider_pm5xxx": 0.001}.get(
            model, truth * 2**-23
        )
        assert abs(got[Quantity.ENERGY_IMPORT_KWH] - truth) <= resolution
        assert got[Quantity.POWER_W] == pytest.approx(30_000.0, abs=0.1)
        assert all(r.quality == 0 for r in result.readings)

    run(cfg, clock, body)


def test_rtu_framing_is_really_rtu() -> None:
    """A Modbus TCP client cannot talk to the RTU server: the framing on the wire differs."""
    clock = frozen_clock()
    cfg = sim_config([{"id": "m1", "unit_id": 1}], "rtu")

    async def read(port: int, framer: FramerType) -> list[int] | None:
        """The registers, or None when the client got no valid answer."""
        client = AsyncModbusTcpClient("127.0.0.1", port=port, framer=framer, timeout=0.3, retries=0)
        await client.connect()
        try:
            resp = await client.read_input_registers(0x0048, count=2, device_id=1)
        except ModbusException:
            return None
        finally:
            client.close()
        return None if resp.isError() else list(resp.registers)

    async def body(sim: RunningSimulator) -> None:
        rtu = await read(sim.port, FramerType.RTU)
        assert rtu is not None and len(rtu) == 2
        assert await read(sim.port, FramerType.SOCKET) is None  # outside the try: this can fail

    run(cfg, clock, body)


def test_schneider_is_one_based_on_the_wire() -> None:
    """Register 3204 of the manual is protocol address 3203: an INT64 of Wh, high word first."""
    clock = frozen_clock()
    cfg = sim_config([{"id": "m1", "unit_id": 1, "model": "schneider_pm5xxx"}])

    async def body(sim: RunningSimulator) -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=1, retries=0)
        await client.connect()
        try:
            resp = await client.read_holding_registers(3203, count=4, device_id=1)
            wh = struct.unpack(">q", struct.pack(">4H", *resp.registers))[0]
            assert wh == round(sim.meters["m1"].import_kwh(clock.now()) * 1000)
            kw = await client.read_holding_registers(3059, count=2, device_id=1)
            assert struct.unpack(">f", struct.pack(">2H", *kw.registers))[0] == pytest.approx(30.0)
        finally:
            client.close()

    run(cfg, clock, body)


def test_em24_sends_the_low_word_first() -> None:
    clock = frozen_clock()
    cfg = sim_config([{"id": "m1", "unit_id": 1, "model": "carlo_gavazzi_em24"}])

    async def body(sim: RunningSimulator) -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=1, retries=0)
        await client.connect()
        try:
            resp = await client.read_input_registers(0x0042, count=2, device_id=1)  # kWh (+) TOT, RS-485
            lo, hi = resp.registers
            assert (hi << 16 | lo) == round(sim.meters["m1"].import_kwh(clock.now()) * 10)
        finally:
            client.close()

    run(cfg, clock, body)


def test_ct_pt_ratio_scales_energy_and_power() -> None:
    clock = frozen_clock()
    cfg = sim_config([{"id": "m1", "unit_id": 1, "model": "eastron_sdm120"}])

    async def body(sim: RunningSimulator) -> None:
        config = edge_config(
            sim.port, [{"id": "m1", "unit_id": 1, "model": "eastron_sdm120", "ct_ratio": 40, "pt_ratio": 100}]
        )
        poller = ModbusPoller(config, maps_for(config), clock)
        try:
            got = {r.quantity: r.value for r in (await poller.poll()).readings}
        finally:
            poller.close()
        assert got[Quantity.POWER_W] == pytest.approx(30_000.0 * 4000, rel=1e-6)
        truth = sim.meters["m1"].import_kwh(clock.now())
        assert got[Quantity.ENERGY_IMPORT_KWH] == pytest.approx(truth * 4000, rel=1e-6)

    run(cfg, clock, body)


async def poll_once(config: EdgeConfig, clock: ClockSettings) -> PollResult:
    poller = ModbusPoller(config, maps_for(config), clock)
    try:
        return await poller.poll()
    finally:
        poller.close()


def test_faults_are_counted_and_do_not_block_other_meters() -> None:
    clock = frozen_clock()
    meters = [
        {"id": "dead", "unit_id": 1, "faults": [{"kind": "timeout", "at_s": 0}]},
        {"id": "busy", "unit_id": 2, "faults": [{"kind": "exception", "at_s": 0, "code": 6}]},
        {"id": "nan", "unit_id": 3, "faults": [{"kind": "nan", "at_s": 0}]},
        {"id": "fine", "unit_id": 4},
    ]
    cfg = sim_config(meters)

    async def body(sim: RunningSimulator) -> None:
        edge_meters = [{"id": m["id"], "unit_id": m["unit_id"], "model": "eastron_sdm630"} for m in meters]
        edge_meters[0]["timeout_s"] = 0.2
        edge_meters[0]["retries"] = 1
        result = await poll_once(edge_config(sim.port, edge_meters), clock)
        assert sorted(result.failed_meters) == ["busy", "dead"]
        # Busy (code 6) already on the serial number at connect: the meter fails this poll.
        assert result.errors == {"timeout": 1, "exception_6": 1, "invalid_value": 3}
        by_meter = {(r.meter_id, r.quantity) for r in result.readings}
        assert by_meter == {("fine", Quantity(q)) for q in ALL_Q}  # NaN values dropped, never sent

    run(cfg, clock, body)


def counter_flags(
    meter: dict[str, Any],
    edge_extra: dict[str, Any],
    times_s: list[float],
    config_dir: Path = CONFIG_DIR,
    gateway: dict[str, Any] | None = None,
) -> list[tuple[float, int]]:
    """Import-counter (value, quality) polled at each simulated second of ``times_s``."""
    clock = ClockSettings(speed=1e-9, sim_start=T0, wall_start=time.time())
    cfg = sim_config([{"id": "m1", "unit_id": 1, **meter}])
    out: list[tuple[float, int]] = []

    async def body(sim: RunningSimulator) -> None:
        config = edge_config(
            sim.port, [{"id": "m1", "unit_id": 1, "model": meter["model"], **edge_extra}], **(gateway or {})
        )
        poller = ModbusPoller(config, maps_for(config, config_dir), clock)
        try:
            for t in times_s:
                clock.sim_start = T0 + timedelta(seconds=t)
                clock.wall_start = time.time()
                result = await poller.poll()
                assert not result.failed_meters
                out.extend(
                    (r.value, r.quality) for r in result.readings if r.quantity == Quantity.ENERGY_IMPORT_KWH
                )
        finally:
            poller.close()

    run(cfg, clock, body, config_dir)
    return out


OOR = Quality.OUT_OF_RANGE


def test_reset_is_flagged_once_confirmed() -> None:
    """A restart near zero is held as suspect (OUT_OF_RANGE) until three reads agree."""
    flags = counter_flags(
        {"model": "eastron_sdm630", "faults": [{"kind": "reset", "at_s": 100}]},
        {},
        [0, 60, 120, 180, 240, 300],
    )
    assert [q for _, q in flags] == [0, 0, OOR, OOR, Quality.COUNTER_RESET, 0]
    assert flags[2][0] < 1.0


def test_replacement_is_flagged_by_the_serial_number() -> None:
    # The new meter starts near zero: without its serial number this would look like a reset.
    flags = counter_flags(
        {"model": "eastron_sdm630", "faults": [{"kind": "replace", "at_s": 100, "replacement_kwh": 0.5}]},
        {},
        [0, 60, 120, 180],
        gateway={"serial_refresh_s": 1e-6},  # the serial is read again on every poll here
    )
    assert [q for _, q in flags] == [0, 0, Quality.METER_REPLACED, 0]


def test_replacement_without_serial_is_told_from_a_reset_by_its_reading() -> None:
    flags = counter_flags(
        {"model": "carlo_gavazzi_em24", "faults": [{"kind": "replace", "at_s": 100, "replacement_kwh": 500}]},
        {},
        [0, 60, 120, 180, 240],
    )
    assert [q for _, q in flags] == [0, 0, OOR, OOR, Quality.METER_REPLACED]


def test_wrap_at_the_registers_rollover(tmp_path: Path) -> None:
    # An EM24 whose counter rolls over at 100 000.0 kWh (a display-limited variant), started just below.
    (tmp_path / "devices").mkdir()  # the override directory: this map replaces the packaged one
    em24 = tmp_path / "devices/carlo_gavazzi_em24.toml"
    em24.write_text(
        (PACKAGED_MAPS / em24.name)
        .read_text()
        .replace('description = "kWh (+) TOT', 'rollover = 100000.0\ndescription = "')
    )
    flags = counter_flags(
        {"model": "carlo_gavazzi_em24", "initial_import_kwh": 99_999.0}, {}, [0, 60, 120, 180], tmp_path
    )
    # 30 kW: 0.5 kWh a minute, so the counter passes 100 000 between 60 s and 120 s.
    assert [q for _, q in flags] == [0, 0, Quality.COUNTER_WRAP, 0]
    assert flags[2][0] == pytest.approx(0.0, abs=0.11)


SPIKE = {"kind": "spike", "at_s": 100, "duration_s": 30, "factor": 3}


def test_spike_is_flagged_and_does_not_move_the_baseline() -> None:
    flags = counter_flags(
        {"model": "eastron_sdm630", "faults": [SPIKE]},
        {"max_power_w": 50_000},
        [0, 60, 120, 180],
    )
    assert [q for _, q in flags] == [0, 0, Quality.OUT_OF_RANGE, 0]  # no reset after the spike
    assert math.isclose(flags[3][0] - flags[1][0], 1.0, rel_tol=1e-3)  # 30 kW for 2 minutes
