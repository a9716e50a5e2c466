"""Simulated Modbus meters served over TCP, one unit id per meter (an RS485 line behind a gateway).

Register values are computed when a request arrives, from the shared clock and the meter's load
profile, and encoded with the same device register map the edge agent decodes with (any model in
edge/device_maps: register names are shared across maps).  The import counter is ``initial +
energy since the simulation origin``: exactly the profile's ground truth, so tests and the demo
can check what reached the database against ``loadprofile.energy_kwh``.  Counters are served
modulo the register's rollover, and configured faults (simulators/faults.py) change what is
served.  The server speaks Modbus TCP or RTU frames over TCP (``[server].framer``), or RTU on a
serial device (``[server].serial_port``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import termios
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimDataType
from pymodbus.simulator import SimData, SimDevice

from edge.devices import DataType, DeviceMap, Register, RegisterType, load_model
from edge.wire import COUNTER_QUANTITIES
from ops.settings import ClockSettings
from simulators.config import SimMeter, SimulationConfig
from simulators.faults import STEP_KINDS, FaultKind
from simulators.loadprofile import UJ_PER_KWH, energy_uj, power_w, unit_noise

log = logging.getLogger("scopemeter.sim")
_SECOND = timedelta(seconds=1)

_FC_TYPE = {3: RegisterType.HOLDING, 4: RegisterType.INPUT}


class SimulatedMeter:
    """Electrical values of one meter at any simulated instant."""

    def __init__(self, meter: SimMeter, device: DeviceMap, origin: datetime) -> None:
        self.meter = meter
        device = device.on_wire()
        self.model_code = 0
        if (ident := device.identification) is not None:  # the model code the agent checks at connect
            device = device.model_copy(update={"registers": (*device.registers, ident.register())})
            self.model_code = min(ident.codes)
        self.device = device
        self.origin = origin  # the counter equals ``initial_import_kwh`` at this instant

    def import_kwh(self, now: datetime) -> float:
        """The energy truth: what the meter measured since the origin, plus its initial reading."""
        return self.meter.initial_import_kwh + energy_uj(self.meter.profile, self.origin, now) / UJ_PER_KWH

    def elapsed_s(self, now: datetime) -> float:
        return (now - self.origin).total_seconds()

    def active_faults(self, now: datetime) -> set[FaultKind]:
        elapsed = self.elapsed_s(now)
        return {f.kind for f in self.meter.faults if f.kind not in STEP_KINDS and f.active(elapsed)}

    def counter_kwh(self, now: datetime) -> tuple[float, int]:
        """What the import register shows (before rollover) and the serial number, after any
        reset or replacement."""
        elapsed = self.elapsed_s(now)
        serial = self.meter.serial if self.meter.serial is not None else 20_000_000 + self.meter.unit_id
        counter = self.import_kwh(now)
        for fault in sorted(self.meter.faults, key=lambda f: f.at_s):
            if fault.kind in STEP_KINDS and fault.active(elapsed):
                at = self.origin + fault.at_s * _SECOND
                counter = counter - self.import_kwh(at) + (
                    fault.replacement_kwh if fault.kind == FaultKind.REPLACE else 0.0
                )
                serial += fault.kind == FaultKind.REPLACE
        return counter, serial

    def values(self, now: datetime) -> dict[str, float]:
        """Values by register name (names shared by the maps in edge/device_maps)."""
        m, p = self.meter, self.meter.profile
        step = int((now - self.origin).total_seconds() // p.step_s)
        total_w = float(power_w(p, now))
        imported, serial = self.counter_kwh(now)
        out: dict[str, float] = {
            "identification": self.model_code,
            "serial_number": serial,
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
        out["voltage"], out["current"] = out["voltage_l1"], total_w / (out["voltage_l1"] * p.power_factor)
        return out

    def served(self, reg: Register, values: dict[str, float], faults: set[FaultKind]) -> list[int]:
        """The registers of one value as the (possibly faulty) device sends them."""
        value = values.get(reg.name, 0.0)
        if FaultKind.SPIKE in faults and reg.name != "serial_number":
            value *= next(f.factor for f in self.meter.faults if f.kind == FaultKind.SPIKE)
        if reg.quantity in COUNTER_QUANTITIES and math.isfinite(reg.wraps_at):
            value %= reg.wraps_at
        if reg.data_type == DataType.FLOAT32:
            return reg.encode(math.nan if FaultKind.NAN in faults else value)
        return reg.encode(min(max(value, reg.min_raw), reg.max_raw))


def _device(unit_id: int, sim: SimulatedMeter, clock: ClockSettings) -> SimDevice:
    """A pymodbus device whose registers are rewritten from the meter's values on every request."""
    # Read-only; unmapped addresses inside a span read as 0, like many real meters; addresses far
    # from any mapped register (e.g. between the values and the serial number at 0xFC00) are illegal.
    blocks = [
        SimData(address=lo, count=hi - lo, values=0, datatype=SimDataType.REGISTERS, readonly=True)
        for lo, hi in _spans(sim.device.registers)
    ]

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
        now = clock.now()
        faults = sim.active_faults(now)
        if FaultKind.TIMEOUT in faults:
            raise NoSuchIdException("simulated timeout")  # the server then sends nothing
        if FaultKind.EXCEPTION in faults:
            return next(f.code for f in sim.meter.faults if f.kind == FaultKind.EXCEPTION)
        lo, hi = address - start_address, address - start_address + count
        registers[lo:hi] = [0] * count
        values = sim.values(now)
        for reg in sim.device.registers:
            if reg.type != rtype or reg.address + reg.count <= address or reg.address >= address + count:
                continue
            words = sim.served(reg, values, faults)
            for i, word in enumerate(words):
                pos = reg.address - start_address + i
                if lo <= pos < hi:
                    registers[pos] = word
        return None

    return SimDevice(id=unit_id, simdata=blocks, action=on_request)


def _spans(registers: tuple[Register, ...], gap: int = 256) -> list[tuple[int, int]]:
    """Address ranges [lo, hi) covering every register, starting at 0, merged across small gaps."""
    spans: list[tuple[int, int]] = []
    for reg in sorted(registers, key=lambda r: r.address):
        lo, hi = reg.address, reg.address + reg.count
        if spans and lo - spans[-1][1] <= gap:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((0 if not spans else lo, hi))
    return spans


def _absent_units(serial: bool = False) -> SimDevice:
    """Catch-all for unit ids with no meter: answer like a TCP/RTU gateway whose RS485 device is
    silent (exception 0x0B); on a serial line nobody answers at all.  pymodbus 3.16 would otherwise
    fail with an internal KeyError."""

    async def no_response(*_args: object) -> ExcCodes:
        if serial:
            raise NoSuchIdException("no meter with this unit id on the line")
        return ExcCodes.GATEWAY_NO_RESPONSE

    block = SimData(address=0, count=0xFFFF, values=0, datatype=SimDataType.REGISTERS)
    return SimDevice(id=0, simdata=[block], action=no_response)


@dataclass
class RunningSimulator:
    """A started simulator: where it listens and how to stop it."""

    server: ModbusTcpServer | ModbusSerialServer
    host: str
    port: int
    meters: dict[str, SimulatedMeter]
    origin: datetime
    serial_port: str | None = None  # set when serving RTU on a serial device (host/port unused)

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
    srv = config.server
    if srv.serial_port is not None:
        serial_server = ModbusSerialServer(
            [*devices, _absent_units(serial=True)],
            framer=FramerType.RTU,
            port=srv.serial_port,
            baudrate=srv.baudrate,
            parity=srv.parity,
            stopbits=srv.stopbits,
            bytesize=srv.bytesize,
            ignore_missing_devices=True,
        )
        try:
            await serial_server.serve_forever(background=True)
        except (RuntimeError, termios.error) as exc:  # no such device, or settings it refuses
            raise OSError(f"cannot open serial port {srv.serial_port}: {exc}") from None
        log.info("simulator serving RTU on %s with %d meters", srv.serial_port, len(meters))
        return RunningSimulator(serial_server, host, 0, meters, origin, serial_port=srv.serial_port)
    framer = FramerType.RTU if config.server.framer == "rtu" else FramerType.SOCKET
    # ignore_missing_devices: a simulated timeout raises NoSuchIdException and gets no answer.
    server = ModbusTcpServer(
        [*devices, _absent_units()], address=(host, port), framer=framer, ignore_missing_devices=True
    )
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
