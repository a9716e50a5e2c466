"""Polling Modbus meters (TCP, RTU frames over TCP, or RTU on a serial line) into wire readings.

Each meter's wanted values are read in few requests (blocks within the device's per-request limit,
spanning at most the map's ``max_gap_registers`` unmapped registers: none by default), decoded with
the device's register map, scaled by the meter's CT/PT ratio, checked for counter wraps, resets,
replacements, glitches and spikes, and stamped with the shared clock when the response arrived.

When a connection opens, each meter's model code is read where its map names an identification
register (a device that is another model is refused, never decoded with the wrong map), and its
serial number, which is read again every ``serial_refresh_s`` -- not on every poll.  A meter
without a serial register still gives readings.  An exception response loses only its block's
quantities; a meter that does not answer yields no readings this round (a gap, flagged
downstream), never a made-up value.  NaNs and "not available" sentinels are dropped and counted.

Modbus TCP goes through pymodbus (its transaction ids match replies); RTU, on a serial line or over
TCP, through ``edge.rtu.RtuMaster``, which checks every reply against its request.  Meters behind
one endpoint share its connection and are polled one after another; endpoints run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from edge.clock import now_ms
from edge.config import EdgeConfig, EdgeMeter
from edge.counters import CounterGuard
from edge.devices import DeviceMap, Identification, Register, RegisterType
from edge.rtu import (
    TCP_SILENCE_S,
    BadReply,
    ExceptionResponse,
    ModbusError,
    ModbusTimeout,
    RtuMaster,
    SerialLine,
    TcpLine,
    char_silence_s,
)
from edge.wire import COUNTER_QUANTITIES, EARLIEST_TS, LATEST_TS, Quality, Quantity, Reading
from ops.settings import ClockSettings

log = logging.getLogger("scopemeter.edge.modbus")

# A map register with this name is the meter's serial number (read at connect, then periodically).
SERIAL_REGISTER = "serial_number"
_FUNCTION = {RegisterType.HOLDING: 3, RegisterType.INPUT: 4}
# Exception codes that say "this device has no such register": illegal function, illegal address.
NO_SUCH_REGISTER = (1, 2)


@dataclass(frozen=True)
class ReadBlock:
    """One request: ``count`` registers of ``type`` from ``address``, holding ``registers``."""

    type: RegisterType
    address: int
    count: int
    registers: tuple[Register, ...]


def plan_blocks(registers: Sequence[Register], max_count: int, max_gap: int = 0) -> list[ReadBlock]:
    """Group registers into read requests of at most ``max_count`` registers that span at most
    ``max_gap`` unmapped registers between two values (0: strict, only mapped registers)."""
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
        raise BadReply(f"expected {block.count} registers, got {len(words)}")
    return {
        r: r.decode(list(words[r.address - block.address : r.address - block.address + r.count]))
        for r in block.registers
    }


class WrongModel(ModbusError):
    kind = "wrong_model"


class Endpoint:
    """One connection (a TCP server, a converter or a serial line) shared by its meters."""

    def __init__(self, meter: EdgeMeter) -> None:
        self.meter = meter  # how to connect: meters of an endpoint agree on it
        self.epoch = 0  # incremented at each (re)connection: meters re-identify
        self._tcp: AsyncModbusTcpClient | None = None
        self._rtu: RtuMaster | None = None

    @property
    def connected(self) -> bool:
        return (self._tcp is not None and self._tcp.connected) or self._rtu is not None

    async def connect(self, timeout_s: float) -> bool:
        """Open the connection if it is not open; True when it was (re)opened now."""
        if self.connected:
            return False
        m = self.meter
        self.close()  # a connection the peer ended: its client still holds a socket and a task
        if m.transport == "tcp":
            client = AsyncModbusTcpClient(
                str(m.host),
                port=m.port,
                framer=FramerType.SOCKET,
                timeout=timeout_s,
                retries=0,
                reconnect_delay=0,
            )
            # pymodbus turns a refused, unreachable or timed-out connect into False (and no
            # termios.error: that was its serial client's, replaced by edge.rtu.SerialLine).
            await client.connect()
            if not client.connected:
                client.close()
                raise ConnectionError(f"cannot connect to {m.endpoint}")
            self._tcp = client
        elif m.transport == "rtu_over_tcp":
            line = await asyncio.to_thread(TcpLine, str(m.host), m.port, timeout_s)
            self._rtu = RtuMaster(line, max(TCP_SILENCE_S, char_silence_s(9600)))
        else:
            serial_line = await asyncio.to_thread(
                SerialLine, str(m.serial_port), m.baudrate, m.parity, m.stopbits, m.bytesize
            )
            self._rtu = RtuMaster(serial_line, char_silence_s(m.baudrate, m.bytesize, m.parity, m.stopbits))
        self.epoch += 1
        return True

    async def read(self, block: ReadBlock, unit: int, timeout_s: float, retries: int) -> list[int]:
        """The block's registers; raises a ModbusError (or OSError when the connection broke)."""
        for attempt in range(retries + 1):
            try:
                return await self._read_once(block, unit, timeout_s)
            except (ModbusTimeout, BadReply):
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")

    async def _read_once(self, block: ReadBlock, unit: int, timeout_s: float) -> list[int]:
        function = _FUNCTION[block.type]
        if self._rtu is not None:
            rtu = self._rtu
            return await asyncio.to_thread(
                rtu.read_registers, unit, function, block.address, block.count, timeout_s
            )
        assert self._tcp is not None
        self._tcp.ctx.comm_params.timeout_connect = timeout_s
        try:
            if function == 4:
                resp = await self._tcp.read_input_registers(block.address, count=block.count, device_id=unit)
            else:
                resp = await self._tcp.read_holding_registers(
                    block.address, count=block.count, device_id=unit
                )
        except ModbusIOException as exc:
            if not self._tcp.connected:
                raise ConnectionError(f"connection to {self.meter.endpoint} lost") from None
            raise ModbusTimeout(str(exc)) from None
        except ModbusException as exc:
            raise BadReply(str(exc)) from None
        if resp.isError():
            raise ExceptionResponse(resp.exception_code)
        # pymodbus pairs a reply with its request by transaction id alone (it drops another unit's).
        if resp.function_code != function:
            got = resp.function_code
            raise BadReply(f"reply carries function {got}, the request was function {function}")
        if len(resp.registers) != block.count:
            raise BadReply(f"expected {block.count} registers, got {len(resp.registers)}")
        return list(resp.registers)

    def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        if self._rtu is not None:
            self._rtu.close()
            self._rtu = None


@dataclass
class MeterPlan:
    meter: EdgeMeter
    device: DeviceMap  # protocol addresses
    blocks: list[ReadBlock]  # the wanted values
    serial: ReadBlock | None  # the serial number's request, if the map has one
    timeout_s: float
    retries: int
    pause_s: float


@dataclass
class MeterState:
    """What the poller knows about a meter between polls."""

    epoch: int = -1  # the endpoint connection it was identified on
    serial: int | None = None
    serial_read_at: float = -math.inf  # monotonic
    has_serial: bool = True  # False once the device refused the serial register
    consecutive_failures: int = 0
    last_success: float | None = None  # wall time of the last read that gave values
    status: str = "unknown"  # ok, partial, failed, wrong_model


@dataclass
class PollResult:
    readings: list[Reading] = field(default_factory=list)
    failed_meters: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # by kind: timeout, exception_N, …
    meter_errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (meter, kind)
    status: dict[str, str] = field(default_factory=dict)  # meter -> ok, partial, failed, wrong_model
    # Every decoded register of every meter read (probe prints these): meter -> [(register, value)]
    decoded: dict[str, list[tuple[Register, float]]] = field(default_factory=dict)
    # Values stamped outside the wire's time window (a gateway clock at 1970): not Readings at all.
    quarantined: list[dict[str, object]] = field(default_factory=list)

    def count(self, meter: str, kind: str, n: int = 1) -> None:
        self.errors[kind] += n
        self.meter_errors[(meter, kind)] += n

    def merge(self, other: PollResult) -> None:
        self.readings.extend(other.readings)
        self.failed_meters.extend(other.failed_meters)
        self.errors.update(other.errors)
        self.meter_errors.update(other.meter_errors)
        self.status.update(other.status)
        self.decoded.update(other.decoded)
        self.quarantined.extend(other.quarantined)


class ModbusPoller:
    """Polls every meter of a gateway config; keep one per agent (it holds the connections)."""

    def __init__(
        self,
        config: EdgeConfig,
        maps: dict[str, DeviceMap],
        clock: ClockSettings,
        guard: CounterGuard | None = None,
        *,
        all_registers: bool = False,
    ) -> None:
        """``all_registers``: read every register of the map, not only the wanted quantities
        (``edge probe``)."""
        self.clock = clock
        self.serial_refresh_s = config.serial_refresh_s
        self.guard = (
            guard
            if guard is not None
            else CounterGuard(
                tolerance=config.counter_dip_tolerance, confirmations=config.counter_drop_confirmations
            )
        )
        self.guard.tolerance = config.counter_dip_tolerance
        self.guard.confirmations = config.counter_drop_confirmations
        self._plans: dict[str, list[MeterPlan]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._pause_after_connect: dict[str, float] = {}
        self.states: dict[str, MeterState] = {}
        for meter in config.meters:
            device = maps[meter.model].on_wire()
            by_q = device.by_quantity()
            if all_registers:
                wanted = [r for r in device.registers if r.name != SERIAL_REGISTER]
            else:
                wanted = [by_q[q] for q in config.quantities_of(meter)]
            serial = [r for r in device.registers if r.name == SERIAL_REGISTER]
            plan = MeterPlan(
                meter,
                device,
                plan_blocks(wanted, device.max_registers_per_read, device.max_gap_registers),
                _block(serial[0].type, serial) if serial else None,
                config.timeout_of(meter),
                config.retries_of(meter),
                config.pause_between_of(meter),
            )
            self._plans.setdefault(meter.endpoint, []).append(plan)
            self._endpoints.setdefault(meter.endpoint, Endpoint(meter))
            pause = config.pause_after_connect_of(meter)
            self._pause_after_connect[meter.endpoint] = max(
                pause, self._pause_after_connect.get(meter.endpoint, 0.0)
            )
            self.states[meter.id] = MeterState()

    async def poll(self) -> PollResult:
        results = await asyncio.gather(*(self._poll_endpoint(ep, plans) for ep, plans in self._plans.items()))
        out = PollResult()
        for r in results:
            out.merge(r)
        return out

    async def _poll_endpoint(self, endpoint: str, plans: list[MeterPlan]) -> PollResult:
        out = PollResult()
        conn = self._endpoints[endpoint]
        for plan in plans:
            meter = plan.meter
            state = self.states[meter.id]
            try:
                if await conn.connect(plan.timeout_s):
                    log.info("connected to %s", endpoint)
                    if pause := self._pause_after_connect[endpoint]:
                        await asyncio.sleep(pause)
                await self._read_meter(conn, plan, state, out)
            except (ModbusError, OSError) as exc:
                kind = exc.kind if isinstance(exc, ModbusError) else "connect"
                if isinstance(exc, WrongModel):
                    log.error("meter %s: %s", meter.id, exc)
                else:
                    log.warning("meter %s (%s unit %d): %s", meter.id, endpoint, meter.unit_id, exc)
                out.count(meter.id, kind)
                out.status[meter.id] = "wrong_model" if isinstance(exc, WrongModel) else "failed"
                if isinstance(exc, OSError):
                    conn.close()
            if out.status.get(meter.id) in ("failed", "wrong_model"):
                out.failed_meters.append(meter.id)
                state.consecutive_failures += 1
            else:
                state.consecutive_failures = 0
                state.last_success = time.time()
            state.status = out.status[meter.id]
        return out

    async def _request(
        self, conn: Endpoint, plan: MeterPlan, block: ReadBlock, first: list[bool]
    ) -> list[int]:
        """One request, after the meter's pause when it is not the meter's first this poll."""
        if not first[0] and plan.pause_s:
            await asyncio.sleep(plan.pause_s)
        first[0] = False
        return await conn.read(block, plan.meter.unit_id, plan.timeout_s, plan.retries)

    async def _read_meter(self, conn: Endpoint, plan: MeterPlan, state: MeterState, out: PollResult) -> None:
        meter = plan.meter
        first = [True]
        fresh = state.epoch != conn.epoch
        if fresh and plan.device.identification is not None:
            ident = plan.device.identification
            block = _block(ident.type, [ident.register()])
            words = await self._request(conn, plan, block, first)
            code = int(ident.register().decode(words))
            if code not in ident.codes:
                raise WrongModel(_wrong_model(meter, plan.device, ident, code))
        state.epoch = conn.epoch
        if (
            plan.serial is not None
            and state.has_serial
            and (fresh or time.monotonic() - state.serial_read_at >= self.serial_refresh_s)
        ):
            try:
                words = await self._request(conn, plan, plan.serial, first)
                state.serial = int(plan.serial.registers[0].decode(words))
                state.serial_read_at = time.monotonic()
            except ExceptionResponse as exc:
                if exc.code not in NO_SUCH_REGISTER:
                    raise  # busy, failing or unreachable behind a gateway: not an answer about the register
                log.warning("meter %s: no serial number (%s); readings continue without it", meter.id, exc)
                state.has_serial, state.serial = False, None
        values: dict[Register, float] = {}
        ts = now_ms(self.clock)
        lost = 0
        for block in plan.blocks:
            try:
                words = await self._request(conn, plan, block, first)
            except (ExceptionResponse, BadReply) as exc:
                log.warning("meter %s: block %d+%d lost: %s", meter.id, block.address, block.count, exc)
                out.count(meter.id, exc.kind)
                lost += 1
                continue
            ts = now_ms(self.clock)
            values.update(decode_block(block, words))
        if not values:
            out.status[meter.id] = "failed"
            return
        out.status[meter.id] = "partial" if lost else "ok"
        out.decoded[meter.id] = sorted(values.items(), key=lambda kv: (kv[0].type.value, kv[0].address))
        out.readings.extend(self._readings(plan, state, values, ts, out))

    def _readings(
        self, plan: MeterPlan, state: MeterState, values: dict[Register, float], ts: datetime, out: PollResult
    ) -> list[Reading]:
        meter = plan.meter
        if not EARLIEST_TS <= ts < LATEST_TS:
            out.quarantined.extend(
                {"meter_id": meter.id, "quantity": r.quantity.value, "ts": ts.isoformat(), "value": v}
                for r, v in values.items()
                if r.quantity is not None
            )
            return []
        readings: list[Reading] = []
        for reg, raw in values.items():
            if reg.quantity is None:
                continue
            if not math.isfinite(raw):
                log.warning("meter %s: %s is not available (%r); dropped", meter.id, reg.name, raw)
                out.count(meter.id, "invalid_value")
                continue
            value = raw * meter.ratio
            readings.append(
                Reading(
                    meter_id=meter.id,
                    quantity=reg.quantity,
                    ts=ts,
                    value=value,
                    quality=self._quality(meter, reg, value, ts, state.serial),
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
        for conn in self._endpoints.values():
            conn.close()


SPIKE_POWER_FACTOR = 1.5  # instantaneous power above 1.5 x max_power_w is not a measurement


def _wrong_model(meter: EdgeMeter, device: DeviceMap, ident: Identification, code: int) -> str:
    expected = ", ".join(f"{c} ({name})" for c, name in sorted(ident.codes.items()))
    return (
        f"the device at {meter.endpoint} unit {meter.unit_id} reports model code {code} at register "
        f"{ident.address:#06x}, which is not a {device.model} ({expected}): refusing to decode it "
        f"with the {device.model} map; set the meter's model to the device's profile"
    )
