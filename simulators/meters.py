"""Simulated Modbus meters served over TCP, one unit id per meter (an RS485 line behind a gateway).

Register values are computed when a request arrives, from the shared clock and the meter's load
profile, and encoded with the same device register map the edge agent decodes with.  The import
counter is ``initial + energy since the simulation origin``: exactly the profile's ground truth,
so tests and the demo can check what reached the database against ``loadprofile.energy_kwh``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimDataType
from pymodbus.simulator import SimData, SimDevice

from edge.devices import DeviceMap, RegisterType, load_model
from ops.settings import ClockSettings
from simulators.config import SimMeter, SimulationConfig
from simulators.loadprofile import UJ_PER_KWH, energy_uj, power_w, unit_noise

log = logging.getLogger("scopemeter.sim")

_FC_TYPE = {3: RegisterType.HOLDING, 4: RegisterType.INPUT}


class SimulatedMeter:
    """Electrical values of one meter at any simulated instant."""

    def __init__(self, meter: SimMeter, device: DeviceMap, origin: datetime) -> None:
        self.meter = meter
        self.device = device
        self.origin = origin  # the counter equals ``initial_import_kwh`` at this instant

    def import_kwh(self, now: datetime) -> float:
        return self.meter.initial_import_kwh + energy_uj(self.meter.profile, self.origin, now) / UJ_PER_KWH

    def values(self, now: datetime) -> dict[str, float]:
        """Values by register name (the names of ``config/devices/eastron_sdm630.toml``)."""
        m, p = self.meter, self.meter.profile
        step = int((now - self.origin).total_seconds() // p.step_s)
        total_w = float(power_w(p, now))
        imported = self.import_kwh(now)
        out: dict[str, float] = {
            "total_power": total_w,
            "total_import_kwh": imported,
            "total_export_kwh": m.initial_export_kwh,
            "total_kwh": imported + m.initial_export_kwh,
            "total_power_factor": p.power_factor,
            "frequency": m.frequency_hz + 0.04 * (unit_noise(m.seed, f"{m.id}:f", step) - 0.5),
        }
        # Slightly unbalanced phases that still add up to the total exactly.
        shares = [1.0 + 0.06 * (unit_noise(m.seed, f"{m.id}:i{ph}", step) - 0.5) for ph in (1, 2, 3)]
        for ph, share in zip((1, 2, 3), shares, strict=True):
            volts = m.nominal_voltage * (1.0 + 0.02 * (unit_noise(m.seed, f"{m.id}:v{ph}", step) - 0.5))
            phase_w = total_w * share / sum(shares)
            out[f"voltage_l{ph}"] = volts
            out[f"power_l{ph}"] = phase_w
            out[f"current_l{ph}"] = phase_w / (volts * p.power_factor)
            out[f"power_factor_l{ph}"] = p.power_factor
        return out


def _device(unit_id: int, sim: SimulatedMeter, clock: ClockSettings) -> SimDevice:
    """A pymodbus device whose registers are rewritten from the meter's values on every request."""
    end = max(r.address + r.count for r in sim.device.registers)
    # Read-only; unmapped addresses inside the span read as 0, like many real meters.
    block = SimData(address=0, count=end, values=0, datatype=SimDataType.REGISTERS, readonly=True)

    async def on_request(
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        rtype = _FC_TYPE.get(func_code)
        if rtype is None or set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        lo, hi = address - start_address, address - start_address + count
        registers[lo:hi] = [0] * count
        values = sim.values(clock.now())
        for reg in sim.device.registers:
            if reg.type != rtype or reg.address + reg.count <= address or reg.address >= address + count:
                continue
            words = reg.encode(values.get(reg.name, 0.0))
            for i, word in enumerate(words):
                pos = reg.address - start_address + i
                if lo <= pos < hi:
                    registers[pos] = word
        return None

    return SimDevice(id=unit_id, simdata=[block], action=on_request)


def _absent_units() -> SimDevice:
    """Catch-all for unit ids with no meter: answer like a TCP/RTU gateway whose RS485 device is
    silent (exception 0x0B).  pymodbus 3.16 would otherwise fail with an internal KeyError."""

    async def no_response(*_args: object) -> ExcCodes:
        return ExcCodes.GATEWAY_NO_RESPONSE

    block = SimData(address=0, count=0xFFFF, values=0, datatype=SimDataType.REGISTERS)
    return SimDevice(id=0, simdata=[block], action=no_response)


@dataclass
class RunningSimulator:
    """A started simulator: where it listens and how to stop it."""

    server: ModbusTcpServer
    host: str
    port: int
    meters: dict[str, SimulatedMeter]
    origin: datetime

    async def stop(self) -> None:
        await self.server.shutdown()  # type: ignore[no-untyped-call]


async def start_simulator(
    config: SimulationConfig,
    clock: ClockSettings,
    config_dir: Path,
    *,
    host: str | None = None,
    port: int | None = None,
) -> RunningSimulator:
    """Start serving in the running event loop; returns once the socket listens.

    Counters start at each meter's initial value at ``clock.sim_start`` (or now, if the clock is
    real time).  ``port=0`` binds any free port; the bound one is in the result.
    """
    origin = clock.sim_start if clock.sim_start is not None else clock.now()
    maps: dict[str, DeviceMap] = {}
    meters: dict[str, SimulatedMeter] = {}
    devices = []
    for meter in config.meters:
        if meter.model not in maps:
            maps[meter.model] = load_model(config_dir, meter.model)
        sim = SimulatedMeter(meter, maps[meter.model], origin)
        meters[meter.id] = sim
        devices.append(_device(meter.unit_id, sim, clock))
    host = host if host is not None else config.server.host
    port = port if port is not None else config.server.port
    server = ModbusTcpServer([*devices, _absent_units()], address=(host, port))
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:  # pymodbus reports a failed bind this way
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from None
    sockets = getattr(server.transport, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("simulator listening on %s:%d with %d meters", host, bound, len(meters))
    return RunningSimulator(server=server, host=host, port=bound, meters=meters, origin=origin)


async def serve(
    config: SimulationConfig,
    clock: ClockSettings,
    config_dir: Path,
    stop: asyncio.Event,
    *,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[RunningSimulator], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (the CLI entry point's body)."""
    sim = await start_simulator(config, clock, config_dir, host=host, port=port)
    try:
        if on_ready is not None:
            on_ready(sim)
        await stop.wait()
    finally:
        await sim.stop()
