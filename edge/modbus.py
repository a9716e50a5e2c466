"""Polling Modbus TCP meters into wire readings.

Each meter's wanted values are read in as few requests as possible (contiguous blocks within the
device's per-request limit), decoded with the device's register map and stamped with the shared
clock at the moment the response arrived.  Meters behind one endpoint (an RS485 gateway) share
one connection and are polled one after another; different endpoints are polled concurrently.
A meter that does not answer yields no readings this round (a gap, flagged downstream), never a
made-up value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from edge.clock import now_ms
from edge.config import EdgeConfig, EdgeMeter
from edge.devices import DeviceMap, Register, RegisterType
from edge.wire import Reading
from ops.settings import ClockSettings

log = logging.getLogger("scopemeter.edge.modbus")

# Reading a few unused registers is cheaper than another round trip on a slow RS485 line.
MAX_GAP_REGISTERS = 32


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


@dataclass
class PollResult:
    readings: list[Reading] = field(default_factory=list)
    failed_meters: list[str] = field(default_factory=list)


class ModbusPoller:
    """Polls every meter of a gateway config; keep one per agent (it holds the connections)."""

    def __init__(self, config: EdgeConfig, maps: dict[str, DeviceMap], clock: ClockSettings) -> None:
        self.clock = clock
        self.timeout = config.modbus_timeout_s
        self._endpoints: dict[tuple[str, int], list[MeterPlan]] = {}
        for meter in config.meters:
            device = maps[meter.model]
            by_q = device.by_quantity()
            wanted = [by_q[q] for q in config.quantities_of(meter)]
            plan = MeterPlan(meter, plan_blocks(wanted, device.max_registers_per_read))
            self._endpoints.setdefault((meter.host, meter.port), []).append(plan)
        self._clients: dict[tuple[str, int], AsyncModbusTcpClient] = {}

    async def poll(self) -> PollResult:
        results = await asyncio.gather(
            *(self._poll_endpoint(ep, plans) for ep, plans in self._endpoints.items())
        )
        out = PollResult()
        for r in results:
            out.readings.extend(r.readings)
            out.failed_meters.extend(r.failed_meters)
        return out

    async def _client(self, endpoint: tuple[str, int]) -> AsyncModbusTcpClient:
        client = self._clients.get(endpoint)
        if client is None:
            # No background reconnects: the next poll reconnects, so a dead endpoint costs one timeout.
            client = AsyncModbusTcpClient(
                endpoint[0], port=endpoint[1], timeout=self.timeout, retries=1, reconnect_delay=0
            )
            self._clients[endpoint] = client
        if not client.connected:
            await client.connect()
            if not client.connected:
                raise ModbusException(f"cannot connect to {endpoint[0]}:{endpoint[1]}")
        return client

    async def _poll_endpoint(self, endpoint: tuple[str, int], plans: list[MeterPlan]) -> PollResult:
        out = PollResult()
        for plan in plans:
            try:
                client = await self._client(endpoint)
                out.readings.extend(await self._read_meter(client, plan))
            except (ModbusException, OSError, ValueError) as exc:
                log.warning("meter %s (%s:%d unit %d): %s", plan.meter.id, *endpoint, plan.meter.unit_id, exc)
                out.failed_meters.append(plan.meter.id)
                if endpoint in self._clients and not self._clients[endpoint].connected:
                    self._clients.pop(endpoint).close()
        return out

    async def _read_meter(self, client: AsyncModbusTcpClient, plan: MeterPlan) -> list[Reading]:
        readings: list[Reading] = []
        unit = plan.meter.unit_id
        for block in plan.blocks:
            if block.type == RegisterType.INPUT:
                resp = await client.read_input_registers(block.address, count=block.count, device_id=unit)
            else:
                resp = await client.read_holding_registers(block.address, count=block.count, device_id=unit)
            ts = now_ms(self.clock)
            if resp.isError():
                raise ModbusException(f"exception response {resp}")
            for reg, value in decode_block(block, resp.registers).items():
                assert reg.quantity is not None  # only mapped registers are planned
                readings.append(Reading(meter_id=plan.meter.id, quantity=reg.quantity, ts=ts, value=value))
        return readings

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
