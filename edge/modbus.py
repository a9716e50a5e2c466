"""Polling Modbus meters (TCP, RTU frames over TCP, or RTU on a serial line) into wire readings.

Each meter's wanted values are read in as few requests as possible (contiguous blocks within the
device's per-request limit), decoded with the device's register map, scaled by the meter's CT/PT
ratio, checked for counter wraps/resets/replacements and spikes, and stamped with the shared clock
at the moment the response arrived.  Meters behind one endpoint (an RS485 line behind a gateway or
converter) share one connection and are polled one after another, each with its own timeout and
retries; different endpoints are polled concurrently.  A meter that does not answer yields no
readings this round (a gap, flagged downstream), never a made-up value; a NaN is dropped and
counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import termios
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from edge.clock import now_ms
from edge.config import EdgeConfig, EdgeMeter, Transport
from edge.counters import CounterGuard
from edge.devices import DeviceMap, Register, RegisterType
from edge.wire import COUNTER_QUANTITIES, EARLIEST_TS, LATEST_TS, Quality, Quantity, Reading
from ops.settings import ClockSettings

log = logging.getLogger("scopemeter.edge.modbus")

# Reading a few unused registers is cheaper than another round trip on a slow RS485 line.
MAX_GAP_REGISTERS = 32
# A map register with this name is read with the values: a changed serial means a new meter.
SERIAL_REGISTER = "serial_number"
_FRAMERS: dict[Transport, FramerType] = {"tcp": FramerType.SOCKET, "rtu_over_tcp": FramerType.RTU}
Client = AsyncModbusTcpClient | AsyncModbusSerialClient


@dataclass(frozen=True)
class ReadBlock:
    """One request: ``count`` registers of ``type`` from ``address``, holding ``registers``."""

    type: RegisterType
    address: int
    count: int
    registers: tuple[Register, ...]


def plan_blocks(
    registers: Sequence[Register], max_count: int, max_gap: int = MAX_GAP_REGISTERS
) -> list[ReadBlock]:
    """Group registers into contiguous read requests of at most ``max_count`` registers."""
    blocks: list[ReadBlock] = []
    for rtype in RegisterType:
        regs = sorted((r for r in registers if r.type == rtype), key=lambda r: r.address)
        group: list[Register] = []
        for reg in regs:
            if group:
                start = group[0].address
                end = max(r.address + r.count for r in group)
                if reg.address - end > max_gap or reg.address + reg.count - start > max_count:
                    blocks.append(_block(rtype, group))
                    group = []
            group.append(reg)
        if group:
            blocks.append(_block(rtype, group))
    return blocks


def _block(rtype: RegisterType, group: list[Register]) -> ReadBlock:
    start = group[0].address
    end = max(r.address + r.count for r in group)
    return ReadBlock(rtype, start, end - start, tuple(group))


def decode_block(block: ReadBlock, words: Sequence[int]) -> dict[Register, float]:
    if len(words) != block.count:
        raise ValueError(f"expected {block.count} registers, got {len(words)}")
    return {
        r: r.decode(list(words[r.address - block.address : r.address - block.address + r.count]))
        for r in block.registers
    }


@dataclass
class MeterPlan:
    meter: EdgeMeter
    blocks: list[ReadBlock]
    timeout_s: float
    retries: int


@dataclass
class PollResult:
    readings: list[Reading] = field(default_factory=list)
    failed_meters: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # by kind: timeout, exception_N, …
    # Values stamped outside the wire's time window (a gateway clock at 1970): not Readings at all.
    quarantined: list[dict[str, object]] = field(default_factory=list)


class ModbusPoller:
    """Polls every meter of a gateway config; keep one per agent (it holds the connections)."""

    def __init__(
        self,
        config: EdgeConfig,
        maps: dict[str, DeviceMap],
        clock: ClockSettings,
        guard: CounterGuard | None = None,
    ) -> None:
        self.clock = clock
        self.guard = guard if guard is not None else CounterGuard()
        self._endpoints: dict[str, list[MeterPlan]] = {}
        self._first: dict[str, EdgeMeter] = {}  # how to connect: meters of an endpoint agree on it
        for meter in config.meters:
            device = maps[meter.model].on_wire()
            by_q = device.by_quantity()
            wanted = [by_q[q] for q in config.quantities_of(meter)]
            wanted += [r for r in device.registers if r.name == SERIAL_REGISTER]
            plan = MeterPlan(
                meter,
                plan_blocks(wanted, device.max_registers_per_read),
                config.timeout_of(meter),
                config.retries_of(meter),
            )
            self._endpoints.setdefault(meter.endpoint, []).append(plan)
            self._first.setdefault(meter.endpoint, meter)
        self._clients: dict[str, Client] = {}

    async def poll(self) -> PollResult:
        results = await asyncio.gather(
            *(self._poll_endpoint(ep, plans) for ep, plans in self._endpoints.items())
        )
        out = PollResult()
        for r in results:
            out.readings.extend(r.readings)
            out.failed_meters.extend(r.failed_meters)
            out.errors.update(r.errors)
        return out

    async def _client(self, endpoint: str, timeout_s: float) -> Client:
        client = self._clients.get(endpoint)
        if client is None:
            # No background reconnects: the next poll reconnects, so a dead endpoint costs one timeout.
            m = self._first[endpoint]
            client = (
                AsyncModbusSerialClient(
                    endpoint,
                    framer=FramerType.RTU,
                    baudrate=m.baudrate,
                    parity=m.parity,
                    stopbits=m.stopbits,
                    bytesize=m.bytesize,
                    timeout=timeout_s,
                    retries=0,
                    reconnect_delay=0,
                )
                if m.transport == "rtu"
                else AsyncModbusTcpClient(
                    str(m.host),
                    port=m.port,
                    framer=_FRAMERS[m.transport],
                    timeout=timeout_s,
                    retries=0,
                    reconnect_delay=0,
                )
            )
            self._clients[endpoint] = client
        if not client.connected:
            try:
                await client.connect()
            except termios.error as exc:  # a serial device refusing the line settings
                raise OSError(f"cannot configure {endpoint}: {exc}") from None
            if not client.connected:
                raise ConnectionError(f"cannot connect to {endpoint}")
        return client

    async def _poll_endpoint(self, endpoint: str, plans: list[MeterPlan]) -> PollResult:
        out = PollResult()
        for plan in plans:
            try:
                client = await self._client(endpoint, plan.timeout_s)
                _set_limits(client, plan.timeout_s, plan.retries)
                out.readings.extend(await self._read_meter(client, plan, out))
            except (ModbusException, OSError, ValueError) as exc:
                log.warning("meter %s (%s unit %d): %s", plan.meter.id, endpoint, plan.meter.unit_id, exc)
                out.failed_meters.append(plan.meter.id)
                out.errors[_error_kind(exc)] += 1
                if endpoint in self._clients and not self._clients[endpoint].connected:
                    self._clients.pop(endpoint).close()
        return out

    async def _read_meter(
        self, client: Client, plan: MeterPlan, out: PollResult
    ) -> list[Reading]:
        values: dict[Register, float] = {}
        unit = plan.meter.unit_id
        ts = now_ms(self.clock)
        for block in plan.blocks:
            if block.type == RegisterType.INPUT:
                resp = await client.read_input_registers(block.address, count=block.count, device_id=unit)
            else:
                resp = await client.read_holding_registers(block.address, count=block.count, device_id=unit)
            ts = now_ms(self.clock)
            if resp.isError():
                raise _ExceptionResponse(resp.exception_code)
            values.update(decode_block(block, resp.registers))
        serial = next((int(v) for r, v in values.items() if r.name == SERIAL_REGISTER), None)
        readings: list[Reading] = []
        meter = plan.meter
        if not EARLIEST_TS <= ts < LATEST_TS:
            out.quarantined.extend(
                {"meter_id": meter.id, "quantity": r.quantity.value, "ts": ts.isoformat(), "value": v}
                for r, v in values.items()
                if r.quantity is not None
            )
            return []
        for reg, raw in values.items():
            if reg.quantity is None:
                continue
            if not math.isfinite(raw):
                log.warning("meter %s: %s is %r; dropped", meter.id, reg.name, raw)
                out.errors["invalid_value"] += 1
                continue
            value = raw * meter.ratio
            readings.append(
                Reading(
                    meter_id=meter.id,
                    quantity=reg.quantity,
                    ts=ts,
                    value=value,
                    quality=self._quality(meter, reg, value, ts, serial),
                )
            )
        return readings

    def _quality(
        self, meter: EdgeMeter, reg: Register, value: float, ts: datetime, serial: int | None
    ) -> int:
        assert reg.quantity is not None
        if reg.quantity in COUNTER_QUANTITIES:
            rate = None
            if meter.max_power_w is not None and reg.quantity != Quantity.GAS_M3:
                rate = meter.max_power_w / 3.6e6  # kWh per second
            return int(
                self.guard.check(
                    f"{meter.id}/{reg.quantity.value}",
                    value,
                    ts,
                    wraps_at=reg.wraps_at * meter.ratio,
                    serial=serial,
                    max_rate_per_s=rate,
                )
            )
        limit = meter.max_power_w
        if reg.quantity == Quantity.POWER_W and limit is not None and abs(value) > SPIKE_POWER_FACTOR * limit:
            return int(Quality.OUT_OF_RANGE)
        return int(Quality.GOOD)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


SPIKE_POWER_FACTOR = 1.5  # instantaneous power above 1.5 x max_power_w is not a measurement


class _ExceptionResponse(ModbusException):
    def __init__(self, code: int) -> None:
        super().__init__(f"exception response code {code}")
        self.code = code


def _error_kind(exc: Exception) -> str:
    if isinstance(exc, _ExceptionResponse):
        return f"exception_{exc.code}"
    if isinstance(exc, ModbusIOException):
        return "timeout"
    if isinstance(exc, OSError):
        return "connect"
    return "decode"


def _set_limits(client: Client, timeout_s: float, retries: int) -> None:
    """Per-meter response timeout and retries on the endpoint's shared connection.

    pymodbus keeps both on the client's transaction manager; meters of one endpoint are polled one
    after another, so setting them before each meter's requests is exact.
    """
    client.ctx.comm_params.timeout_connect = timeout_s
    client.ctx.retries = retries
