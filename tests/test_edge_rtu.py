"""RTU replies are matched to their requests, against a hand-written RTU slave.

pymodbus's server always answers at once and always correctly, so it cannot produce the faults
that matter here; this slave (RTU frames over TCP, like a transparent RS-485 converter) answers
late, or from the wrong unit, with the wrong function or byte count, or with a bad CRC, on
command.  Every register word encodes its unit and address, so a reply decoded for the wrong
request shows up as a wrong value.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from edge.config import EdgeConfig
from edge.devices import DeviceMap
from edge.modbus import ModbusPoller, PollResult
from edge.rtu import (
    BadReply,
    ExceptionResponse,
    ModbusTimeout,
    RtuMaster,
    SerialLine,
    TcpLine,
    char_silence_s,
    crc16,
)
from edge.wire import Quantity
from ops.settings import ClockSettings
from simulators.nullmodem import NullModem

T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)
TIMEOUT_S = 0.2


def word(unit: int, address: int) -> int:
    return (unit << 12 | address) & 0xFFFF


def frame(body: bytes) -> bytes:
    return body + struct.pack("<H", crc16(body))


class Slave:
    """Answers 8-byte read requests one at a time, like a real RTU slave; ``script[unit]`` lists
    the behaviour of that unit's successive requests (then "ok")."""

    def __init__(
        self, script: dict[int, list[str]], late_s: float = 0.0, refuse: set[int] | None = None
    ) -> None:
        self.script = {u: list(b) for u, b in script.items()}
        self.late_s = late_s
        self.refuse = refuse or set()  # addresses answered with exception 2 (no such register)
        self.requests: list[tuple[int, int, int, int]] = []
        self.times: list[float] = []  # monotonic arrival time of each request
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            self.serve_stream(conn.recv, conn.sendall)

    def serve_stream(self, recv: Any, send: Any) -> None:
        """Answer requests read with ``recv(n)`` (b"" or OSError: stop) through ``send``."""
        buf = b""
        while True:
            try:
                chunk = recv(256)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 8:
                request, buf = buf[:8], buf[8:]
                self._answer(send, request)

    def _answer(self, send: Any, request: bytes) -> None:
        unit, function, address, count = struct.unpack(">BBHH", request[:6])
        self.requests.append((unit, function, address, count))
        self.times.append(time.monotonic())
        steps = self.script.get(unit, [])
        how = steps.pop(0) if steps else "ok"
        if address in self.refuse:
            how = "exception"
        if how == "silent":
            return
        words = [word(unit, address + i) for i in range(count)]
        body = struct.pack(f">BBB{count}H", unit, function, 2 * count, *words)
        if how == "wrong_unit":
            body = bytes([unit + 1]) + body[1:]
        elif how == "wrong_function":
            body = body[:1] + bytes([3 if function == 4 else 4]) + body[2:]
        elif how == "wrong_count":
            body = struct.pack(f">BBB{count + 1}H", unit, function, 2 * count + 2, *words, 0)
        elif how == "exception":
            body = struct.pack(">BBB", unit, function | 0x80, 2)
        reply = frame(body)
        if how == "bad_crc":
            reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
        if how == "late":
            time.sleep(self.late_s)
        send(reply)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def slave_factory() -> Iterator[Any]:
    made: list[Slave] = []

    def make(script: dict[int, list[str]], late_s: float = 0.0, refuse: set[int] | None = None) -> Slave:
        made.append(Slave(script, late_s, refuse))
        return made[-1]

    yield make
    for s in made:
        s.close()


def master(port: int) -> RtuMaster:
    return RtuMaster(TcpLine("127.0.0.1", port, 1.0), 0.02)


@pytest.mark.parametrize("fault", ["wrong_unit", "wrong_function", "wrong_count", "bad_crc"])
def test_a_reply_that_does_not_answer_the_request_is_refused(slave_factory: Any, fault: str) -> None:
    slave = slave_factory({1: [fault]})
    m = master(slave.port)
    try:
        with pytest.raises(BadReply):
            m.read_registers(1, 4, 0x10, 2, TIMEOUT_S)
        assert m.read_registers(1, 4, 0x10, 2, TIMEOUT_S) == [word(1, 0x10), word(1, 0x11)]
    finally:
        m.close()


def test_an_exception_response_is_reported_with_its_code(slave_factory: Any) -> None:
    slave = slave_factory({1: ["exception"]})
    m = master(slave.port)
    try:
        with pytest.raises(ExceptionResponse) as err:
            m.read_registers(1, 4, 0x10, 2, TIMEOUT_S)
        assert err.value.code == 2
    finally:
        m.close()


@pytest.mark.parametrize("late_s", [0.3, 0.5, 0.9])
def test_a_late_answer_is_never_decoded_as_a_later_reply(slave_factory: Any, late_s: float) -> None:
    """Blocks of the same shape one after another; the first answer comes late.  Whatever the
    lateness (inside the guard, after it, or across several requests), no read returns another
    block's words: it returns its own or fails."""
    slave = slave_factory({1: ["late"]}, late_s=late_s)
    m = master(slave.port)
    outcomes: list[str] = []
    try:
        for address in (0x10, 0x20, 0x30, 0x40, 0x50):
            try:
                got = m.read_registers(1, 4, address, 2, TIMEOUT_S)
            except (ModbusTimeout, BadReply) as exc:
                outcomes.append(type(exc).__name__)
                continue
            assert got == [word(1, address), word(1, address + 1)]
            outcomes.append("ok")
    finally:
        m.close()
    assert outcomes[0] == "ModbusTimeout" and outcomes[-1] == "ok"
    assert m.discarded_bytes > 0  # the late answer was read off the line and thrown away


def test_after_a_timeout_the_line_is_drained_and_quiet_before_the_next_request(slave_factory: Any) -> None:
    """The late answer arrives while the master drains (lateness < timeout + guard): the next
    request, to another unit on the same line, gets its own reply at the first attempt."""
    slave = slave_factory({1: ["late"]}, late_s=0.3)
    m = master(slave.port)
    try:
        with pytest.raises(ModbusTimeout):
            m.read_registers(1, 4, 0x10, 2, TIMEOUT_S)
        assert m.read_registers(2, 4, 0x10, 2, TIMEOUT_S) == [word(2, 0x10), word(2, 0x11)]
    finally:
        m.close()
    assert m.discarded_bytes == 9  # exactly the late 9-byte frame


def device_map(serial: bool = False) -> DeviceMap:
    registers: list[dict[str, Any]] = [
        {"name": "p", "address": 0x10, "data_type": "uint16", "quantity": "power_w"},
        {"name": "e", "address": 0x20, "data_type": "uint16", "quantity": "energy_import_kwh"},
    ]
    if serial:
        registers.append(
            {"name": "serial_number", "address": 0xFC00, "type": "holding", "data_type": "uint32"}
        )
    return DeviceMap.model_validate(
        {
            "model": "probe_device",
            "source": "hand-written test device (tests/test_edge_rtu.py)",
            "registers": registers,
        }
    )


def poll(port: int, rounds: int, serial: bool = False, **extra: Any) -> list[PollResult]:
    config = EdgeConfig.model_validate(
        {
            **extra,
            "supplier": "s",
            "site": "x",
            "gateway": "g",
            "quantities": ["energy_import_kwh", "power_w"],
            "modbus_timeout_s": TIMEOUT_S,
            "modbus_retries": 0,
            "meters": [
                {
                    "id": f"m{u}",
                    "host": "127.0.0.1",
                    "port": port,
                    "transport": "rtu_over_tcp",
                    "unit_id": u,
                    "model": "probe_device",
                }
                for u in (1, 2)
            ],
        }
    )
    clock = ClockSettings(speed=1e-9, sim_start=T0, wall_start=time.time())

    async def main() -> list[PollResult]:
        poller = ModbusPoller(config, {"probe_device": device_map(serial)}, clock)
        try:
            return [await poller.poll() for _ in range(rounds)]
        finally:
            poller.close()

    return asyncio.run(main())


def test_a_late_meter_does_not_cost_its_healthy_neighbour_its_readings(slave_factory: Any) -> None:
    slave = slave_factory({1: ["late"]}, late_s=0.3)
    first, second = poll(slave.port, 2)
    assert first.failed_meters == ["m1"] and first.errors == {"timeout": 1}
    values = {(r.meter_id, r.quantity): r.value for r in first.readings}
    assert values == {
        ("m2", Quantity.POWER_W): word(2, 0x10),
        ("m2", Quantity.ENERGY_IMPORT_KWH): word(2, 0x20),
    }
    assert not second.failed_meters and not second.errors
    again = {(r.meter_id, r.quantity): r.value for r in second.readings}
    assert again[("m1", Quantity.POWER_W)] == word(1, 0x10)
    assert again[("m1", Quantity.ENERGY_IMPORT_KWH)] == word(1, 0x20)


def test_unit_ids_outside_1_to_247_are_refused_on_rtu() -> None:
    base = {"supplier": "s", "site": "x", "gateway": "g"}
    for transport, extra in (
        ("rtu_over_tcp", {"host": "127.0.0.1"}),
        ("rtu", {"serial_port": "/dev/ttyUSB0"}),
    ):
        for unit in (0, 248, 255):
            with pytest.raises(ValueError, match=r"not a Modbus RTU slave address \(1-247"):
                EdgeConfig.model_validate(
                    {
                        **base,
                        "meters": [
                            {"id": "m", "transport": transport, "unit_id": unit, "model": "x", **extra}
                        ],
                    }
                )
    tcp = {"id": "m", "host": "127.0.0.1", "unit_id": 255, "model": "x"}
    assert EdgeConfig.model_validate({**base, "meters": [tcp]}).meters[0].unit_id == 255


def test_the_serial_number_is_read_at_connect_not_on_every_poll(slave_factory: Any) -> None:
    slave = slave_factory({})
    results = poll(slave.port, 3, serial=True)
    assert all(not r.failed_meters for r in results)
    serial_reads = [r for r in slave.requests if r[2] == 0xFC00]
    assert sorted(serial_reads) == [(1, 3, 0xFC00, 2), (2, 3, 0xFC00, 2)]  # once per meter, at connect
    value_reads = [r for r in slave.requests if r[2] != 0xFC00]
    assert len(value_reads) == 3 * 2 * 2  # 3 polls x 2 meters x 2 strict blocks (0x10, 0x20)


def test_the_serial_number_is_read_again_after_serial_refresh_s(slave_factory: Any) -> None:
    slave = slave_factory({})
    poll(slave.port, 3, serial=True, serial_refresh_s=1e-6)
    assert len([r for r in slave.requests if r[2] == 0xFC00]) == 3 * 2


def test_a_meter_without_the_serial_register_still_gives_readings(slave_factory: Any) -> None:
    slave = slave_factory({}, refuse={0xFC00})
    first, second = poll(slave.port, 2, serial=True)
    for result in (first, second):
        assert not result.failed_meters and not result.errors
        assert len(result.readings) == 4
    assert len([r for r in slave.requests if r[2] == 0xFC00]) == 2  # asked once, then not again


def test_an_exception_loses_only_its_block(slave_factory: Any) -> None:
    slave = slave_factory({}, refuse={0x20})
    [result] = poll(slave.port, 1)
    assert result.failed_meters == [] and result.status == {"m1": "partial", "m2": "partial"}
    assert result.errors == {"exception_2": 2}
    assert {(r.meter_id, r.quantity) for r in result.readings} == {
        ("m1", Quantity.POWER_W),
        ("m2", Quantity.POWER_W),
    }


def test_pauses_between_requests_and_after_connect(slave_factory: Any) -> None:
    """Lower bounds only (a pause can be longer under load, never shorter)."""
    slave = slave_factory({})
    started = time.monotonic()
    poll(slave.port, 1, pause_between_requests_s=0.15, pause_after_connect_s=0.3)
    assert slave.times[0] - started >= 0.3
    gaps = [b - a for a, b in zip(slave.times, slave.times[1:], strict=False)]
    # m1's second request and m2's second request follow a pause; m2's first follows m1's last.
    assert gaps[0] >= 0.15 and gaps[2] >= 0.15


def test_on_a_serial_line_a_late_answer_is_drained_too() -> None:
    """The same guarantees through pyserial on a real tty pair (a virtual null-modem cable)."""
    import serial

    with NullModem() as modem:
        slave = Slave({1: ["late"]}, late_s=0.3)
        slave.close()  # its TCP listener is not used here
        port = serial.Serial(modem.ports[0], baudrate=19200, timeout=0.05)
        stop = threading.Event()

        def recv(n: int) -> bytes:
            while not stop.is_set():
                if data := port.read(n):
                    return data
            return b""

        thread = threading.Thread(target=slave.serve_stream, args=(recv, port.write), daemon=True)
        thread.start()
        m = RtuMaster(SerialLine(modem.ports[1], 19200, "N", 1, 8), char_silence_s(19200))
        try:
            with pytest.raises(ModbusTimeout):
                m.read_registers(1, 4, 0x10, 2, TIMEOUT_S)
            assert m.read_registers(2, 4, 0x20, 2, TIMEOUT_S) == [word(2, 0x20), word(2, 0x21)]
            assert m.read_registers(1, 4, 0x30, 2, TIMEOUT_S) == [word(1, 0x30), word(1, 0x31)]
        finally:
            m.close()
            stop.set()
            thread.join(5)
            port.close()
        assert m.discarded_bytes == 9
