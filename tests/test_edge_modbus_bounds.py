"""The poller's decisions at their edges (edge.modbus): which requests go out (blocks, retries,
pauses, the serial number once per connection), what a failure counts as and says, per meter and
per kind, and which readings are stamped or quarantined. Written for the mutants ``make mutate``
found alive (issue 17).

Devices: the hand-written RTU slave of tests/test_edge_rtu.py (it records every request and
refuses or ignores on command), a plain pymodbus TCP server (tests/test_edge_profiles.py), and, for
faults neither produces (a server that never answers a Modbus TCP request, or drops the connection
when asked), a raw TCP socket that does exactly that. The Carlo Gavazzi model codes are from the
device case tests/devices/carlo_gavazzi_em24/case.toml (code 71 = EM24-DIN AV2) and the E1 map's
identification table (1648-1653), which cite Carlo Gavazzi's documents.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edge.config import EdgeConfig
from edge.counters import CounterGuard
from edge.devices import PACKAGED_MAPS, DataType, DeviceMap, Register, RegisterType, load_device_map
from edge.modbus import Endpoint, MeterState, ModbusPoller, PollResult, ReadBlock, decode_block, plan_blocks
from edge.rtu import BadReply, TcpLine
from edge.wire import EARLIEST_TS, LATEST_TS, Quality, Quantity
from ops.settings import ClockSettings
from simulators.nullmodem import NullModem
from tests.test_edge_profiles import load_case, served, serving
from tests.test_edge_rtu import Slave, device_map, word

T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)
LOGGER = "scopemeter.edge.modbus"
GOOD, OOR = Quality.GOOD, Quality.OUT_OF_RANGE


def clock() -> ClockSettings:
    return ClockSettings(speed=1e-9, sim_start=T0, wall_start=time.time())


class Device(Slave):
    """The RTU slave of tests/test_edge_rtu.py on any loopback address, accepting again after a
    connection closes (a converter the gateway reconnects to)."""

    def __init__(
        self,
        script: dict[int, list[str]] | None = None,
        refuse: set[int] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.script = {u: list(b) for u, b in (script or {}).items()}
        self.late_s = 0.0
        self.refuse = refuse or set()
        self.requests: list[tuple[int, int, int, int]] = []
        self.times: list[float] = []
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.serve_stream(conn.recv, conn.sendall)


device = Device


def config(port: int, meters: list[dict[str, Any]], host: str = "127.0.0.1", **extra: Any) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "supplier": "s",
            "site": "x",
            "gateway": "g",
            "quantities": ["energy_import_kwh", "power_w"],
            "modbus_timeout_s": 0.05,
            "modbus_retries": 0,
            **extra,
            "meters": [
                {"host": host, "port": port, "transport": "rtu_over_tcp", "model": "probe_device", **m}
                for m in meters
            ],
        }
    )


def polls(poller: ModbusPoller, rounds: int, between: Any = None) -> list[PollResult]:
    """``rounds`` polls (``between(poller)`` after each), then the poller is closed."""

    async def main() -> list[PollResult]:
        out = []
        try:
            for _ in range(rounds):
                out.append(await poller.poll())
                if between is not None:
                    between(poller)
        finally:
            poller.close()
        return out

    return asyncio.run(main())


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# --- failures: what they count as, what they say, and the meter's state -------------------------


def test_a_refused_block_and_a_missing_serial_number_are_counted_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = device(refuse={0x20, 0xFC00})
    maps = {"probe_device": device_map(serial=True)}
    poller = ModbusPoller(
        config(dev.port, [{"id": "m1", "unit_id": 1}, {"id": "m2", "unit_id": 2}]), maps, clock()
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        first, second = polls(poller, 2)
    finally:
        dev.close()
    ep = f"127.0.0.1:{dev.port}"
    for result in (first, second):
        assert result.status == {"m1": "partial", "m2": "partial"} and result.failed_meters == []
        assert result.errors == {"exception_2": 2}
        assert result.meter_errors == {("m1", "exception_2"): 1, ("m2", "exception_2"): 1}
        assert {(r.meter_id, r.quantity): r.value for r in result.readings} == {
            ("m1", Quantity.POWER_W): word(1, 0x10),
            ("m2", Quantity.POWER_W): word(2, 0x10),
        }
    assert messages(caplog, logging.INFO) == [f"connected to {ep}"]  # once: the connection stays open
    assert messages(caplog, logging.WARNING) == [
        "meter m1: no serial number (exception response code 2); readings continue without it",
        "meter m1: block 32+1 lost: exception response code 2",
        "meter m2: no serial number (exception response code 2); readings continue without it",
        "meter m2: block 32+1 lost: exception response code 2",
        "meter m1: block 32+1 lost: exception response code 2",
        "meter m2: block 32+1 lost: exception response code 2",
    ]
    # The serial number was asked for once per meter: a refusal means the device has none.
    assert sorted(r for r in dev.requests if r[2] == 0xFC00) == [(1, 3, 0xFC00, 2), (2, 3, 0xFC00, 2)]
    assert all(poller.states[m].serial is None and not poller.states[m].has_serial for m in ("m1", "m2"))


def test_a_first_block_lost_does_not_stop_the_next_and_two_lost_count_twice() -> None:
    dev = device(refuse={0x10})
    both = device(refuse={0x10, 0x20})
    maps = {"probe_device": device_map()}
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1}, {"id": "m2", "unit_id": 1, "port": both.port}])
    try:
        [result] = polls(ModbusPoller(cfg, maps, clock()), 1)
    finally:
        dev.close()
        both.close()
    assert result.status == {"m1": "partial", "m2": "failed"} and result.failed_meters == ["m2"]
    assert [(r.meter_id, r.quantity) for r in result.readings] == [("m1", Quantity.ENERGY_IMPORT_KWH)]
    assert result.meter_errors == {("m1", "exception_2"): 1, ("m2", "exception_2"): 2}
    assert result.errors == {"exception_2": 3}


def test_failures_and_successes_are_kept_per_meter(caplog: pytest.LogCaptureFixture) -> None:
    """m1 does not answer twice, then does; m2 (its own endpoint) refuses every block."""
    dev = device({1: ["silent", "silent"]})
    refusing = device(refuse={0x10, 0x20})
    maps = {"probe_device": device_map()}
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1}, {"id": "m2", "unit_id": 1, "port": refusing.port}])
    seen: list[tuple[int, int, str, float | None]] = []

    def note(poller: ModbusPoller) -> None:
        s1, s2 = poller.states["m1"], poller.states["m2"]
        seen.append((s1.consecutive_failures, s2.consecutive_failures, s1.status, s1.last_success))

    caplog.set_level(logging.WARNING, logger=LOGGER)
    try:
        results = polls(ModbusPoller(cfg, maps, clock()), 3, note)
    finally:
        dev.close()
        refusing.close()
    assert [sorted(r.failed_meters) for r in results] == [["m1", "m2"], ["m1", "m2"], ["m2"]]
    assert [r.status for r in results] == [{"m1": "failed", "m2": "failed"}] * 2 + [
        {"m1": "ok", "m2": "failed"}
    ]
    assert results[0].errors == {"timeout": 1, "exception_2": 2}
    assert results[0].meter_errors == {("m1", "timeout"): 1, ("m2", "exception_2"): 2}
    assert [s[:3] for s in seen] == [(1, 1, "failed"), (2, 2, "failed"), (0, 3, "ok")]
    assert seen[1][3] is None and seen[2][3] is not None  # last success: only once m1 answered
    assert f"meter m1 (127.0.0.1:{dev.port} unit 1): no reply within the timeout" in messages(
        caplog, logging.WARNING
    )


def test_retries_are_exactly_the_configured_number() -> None:
    """Two silences then an answer: with 2 retries the meter reads, after 3 requests for the block."""
    dev = device({1: ["silent", "silent", "silent", "silent", "silent"]})
    maps = {"probe_device": device_map()}
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1, "retries": 2}], quantities=["power_w"])
    try:
        [failed] = polls(ModbusPoller(cfg, maps, clock()), 1)
        requests_failed = len(dev.requests)
        [read] = polls(ModbusPoller(cfg, maps, clock()), 1)
    finally:
        dev.close()
    assert failed.errors == {"timeout": 1} and requests_failed == 3  # 1 + 2 retries, then given up
    assert read.errors == {} and [r.value for r in read.readings] == [word(1, 0x10)]
    assert len(dev.requests) == 3 + 3  # 2 more silences, then the answer


def test_no_retry_means_one_request() -> None:
    dev = device({1: ["silent"]})
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1}], quantities=["power_w"])
    try:
        [result] = polls(ModbusPoller(cfg, {"probe_device": device_map()}, clock()), 1)
    finally:
        dev.close()
    assert result.errors == {"timeout": 1} and len(dev.requests) == 1


def test_a_refused_connection_is_a_connect_failure_that_names_the_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = config(port, [{"id": "m1", "unit_id": 1, "transport": "tcp"}])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    [result] = polls(ModbusPoller(cfg, {"probe_device": device_map()}, clock()), 1)
    assert result.errors == {"connect": 1} and result.meter_errors == {("m1", "connect"): 1}
    assert result.status == {"m1": "failed"} and result.failed_meters == ["m1"]
    assert messages(caplog, logging.WARNING) == [
        f"meter m1 (127.0.0.1:{port} unit 1): cannot connect to 127.0.0.1:{port}"
    ]


@pytest.mark.parametrize("transport", ["tcp", "rtu_over_tcp"])
def test_a_device_that_accepts_no_connection_is_a_connect_failure(transport: str) -> None:
    """Its accept queue is full (backlog 0, one connection waiting): the kernel drops the SYNs and
    only the meter's timeout ends the connect."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname(), timeout=1.0):
            meter = {"id": "m1", "unit_id": 1, "transport": transport}
            cfg = config(full.getsockname()[1], [meter], modbus_timeout_s=0.2)
            [result] = polls(ModbusPoller(cfg, {"probe_device": device_map()}, clock()), 1)
    assert result.errors == {"connect": 1} and result.failed_meters == ["m1"]


# --- which requests go out ----------------------------------------------------------------------


def two_registers(**extra: Any) -> dict[str, DeviceMap]:
    """power at 0x10 and energy at 0x10 + ``offset`` (uint16 each)."""
    offset = extra.pop("offset")
    return {
        "probe_device": DeviceMap.model_validate(
            {
                "model": "probe_device",
                "source": "hand-written test device (tests/test_edge_modbus_bounds.py)",
                **extra,
                "registers": [
                    {"name": "p", "address": 0x10, "data_type": "uint16", "quantity": "power_w"},
                    {
                        "name": "e",
                        "address": 0x10 + offset,
                        "data_type": "uint16",
                        "quantity": "energy_import_kwh",
                    },
                ],
            }
        )
    }


@pytest.mark.parametrize(
    ("map_extra", "quantities", "requests"),
    [
        ({"offset": 1}, ["power_w", "energy_import_kwh"], [(1, 4, 0x10, 2)]),  # adjacent: one request
        (
            {"offset": 1, "max_registers_per_read": 1},
            ["power_w", "energy_import_kwh"],
            [(1, 4, 0x10, 1), (1, 4, 0x11, 1)],
        ),
        ({"offset": 3}, ["power_w", "energy_import_kwh"], [(1, 4, 0x10, 1), (1, 4, 0x13, 1)]),  # strict
        ({"offset": 3, "max_gap_registers": 2}, ["power_w", "energy_import_kwh"], [(1, 4, 0x10, 4)]),
        ({"offset": 1}, ["power_w"], [(1, 4, 0x10, 1)]),  # only the wanted quantities are read
    ],
)
def test_requests_follow_the_maps_block_limits_and_the_wanted_quantities(
    map_extra: dict[str, Any], quantities: list[str], requests: list[tuple[int, int, int, int]]
) -> None:
    dev = device()
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1}], quantities=quantities)
    try:
        [result] = polls(ModbusPoller(cfg, two_registers(**map_extra), clock()), 1)
    finally:
        dev.close()
    assert dev.requests == requests
    assert {r.quantity.value for r in result.readings} == set(quantities)


def test_pauses_go_between_requests_and_after_connect_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every asyncio.sleep of a poll is recorded (and done): the connect pause (the longest of the
    endpoint's meters), then one pause before each of a meter's requests but its first."""
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(delay)

    dev = device()
    meters = [
        {"id": "m1", "unit_id": 1, "pause_after_connect_s": 0.03},
        {"id": "m2", "unit_id": 2, "pause_after_connect_s": 0.02},
    ]
    cfg = config(dev.port, meters, pause_between_requests_s=0.01)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    try:
        polls(ModbusPoller(cfg, {"probe_device": device_map(serial=True)}, clock()), 2)
    finally:
        monkeypatch.undo()
        dev.close()
    # Poll 1: connect pause, then 3 requests a meter (serial number, 2 blocks): 2 pauses each.
    # Poll 2: the connection is reused (no connect pause) and the serial is not read: 1 pause each.
    assert slept == [0.03] + [0.01] * 4 + [0.01] * 2


def test_the_serial_number_is_read_once_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read at connect, not on the next poll, and again after the connection was re-opened; from
    a device on another loopback address than 127.0.0.1 (the configured host is the one used)."""
    dev = device(host="127.0.0.2")
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1}], host="127.0.0.2")
    drop = iter([False, True, False])

    def maybe_drop(poller: ModbusPoller) -> None:
        if next(drop):
            poller.close()  # the next poll opens the connection again

    try:
        results = polls(ModbusPoller(cfg, {"probe_device": device_map(serial=True)}, clock()), 3, maybe_drop)
    finally:
        dev.close()
    assert all(r.status == {"m1": "ok"} for r in results)
    assert len([r for r in dev.requests if r[2] == 0xFC00]) == 2
    assert len([r for r in dev.requests if r[2] != 0xFC00]) == 3 * 2


def test_a_modbus_tcp_meter_is_read_again_after_its_connection_was_closed() -> None:
    case = load_case("carlo_gavazzi_em24")
    device_ = load_device_map(PACKAGED_MAPS / "carlo_gavazzi_em24.toml")
    got: list[PollResult] = []

    async def body(port: int) -> None:
        cfg = config(
            port,
            [{"id": "m1", "unit_id": case["unit_id"], "model": device_.model, "transport": "tcp"}],
            quantities=["energy_import_kwh"],
            modbus_timeout_s=1.0,
        )
        poller = ModbusPoller(cfg, {device_.model: device_}, clock())
        try:
            got.append(await poller.poll())
            poller.close()
            got.append(await poller.poll())
        finally:
            poller.close()

    asyncio.run(serving(served(case), case["unit_id"], body))
    assert [[r.value for r in res.readings] for res in got] == [[pytest.approx(123456.7)]] * 2


def test_a_device_of_another_model_is_refused_with_its_code_and_the_expected_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    case = load_case("carlo_gavazzi_em24")
    e1 = load_device_map(PACKAGED_MAPS / "carlo_gavazzi_em24_e1.toml")
    got: list[PollResult] = []
    ports: list[int] = []
    caplog.set_level(logging.ERROR, logger=LOGGER)

    async def body(port: int) -> None:
        ports.append(port)
        cfg = config(
            port,
            [{"id": "m1", "unit_id": case["unit_id"], "model": e1.model, "transport": "tcp"}],
            quantities=["energy_import_kwh"],
            modbus_timeout_s=1.0,
        )
        poller = ModbusPoller(cfg, {e1.model: e1}, clock())
        try:
            got.append(await poller.poll())
        finally:
            poller.close()

    asyncio.run(serving(served(case), case["unit_id"], body))
    [result], [port] = got, ports
    assert result.failed_meters == ["m1"] and result.status == {"m1": "wrong_model"}
    assert result.meter_errors == {("m1", "wrong_model"): 1}
    assert messages(caplog, logging.ERROR) == [
        f"meter m1: the device at 127.0.0.1:{port} unit 5 reports model code 71 at register 0x000b, which "
        "is not a carlo_gavazzi_em24_e1 (1648 (EM24DINAV23XE1X), 1649 (EM24DINAV23XE1PFA), 1650 "
        "(EM24DINAV23XE1PFB), 1651 (EM24DINAV53XE1X), 1652 (EM24DINAV53XE1PFA), 1653 (EM24DINAV53XE1PFB)):"
        " refusing to decode it with the carlo_gavazzi_em24_e1 map; set the meter's model to the device's"
        " profile"
    ]


def test_a_given_counter_guard_is_the_one_used() -> None:
    dev = device()
    guard = CounterGuard()
    cfg = config(
        dev.port, [{"id": "m1", "unit_id": 1}], counter_dip_tolerance=0.5, counter_drop_confirmations=4
    )
    try:
        poller = ModbusPoller(cfg, {"probe_device": device_map()}, clock(), guard)
        polls(poller, 1)
    finally:
        dev.close()
    assert poller.guard is guard and (guard.tolerance, guard.confirmations) == (0.5, 4)
    assert list(guard.states) == ["m1/energy_import_kwh"]


def test_power_beyond_one_and_a_half_times_the_meters_maximum_is_out_of_range() -> None:
    poller, plan, _ = probe_poller(max_power_w=50_000)
    p = {r.name: r for r in plan.device.registers}["p"]
    judged = {
        v: poller._quality(plan.meter, p, v, T0, None) for v in (75_000.0, 75_000.5, -75_000.0, -75_000.5)
    }
    assert judged == {75_000.0: GOOD, 75_000.5: OOR, -75_000.0: GOOD, -75_000.5: OOR}  # export: its size


def test_an_energy_step_is_judged_against_max_power_in_kwh_per_second() -> None:
    """36 kW is 0.01 kWh/s (3.6e6 W·s per kWh); the counter guard allows twice that over the
    elapsed time: 1.2 kWh in 60 s."""
    poller, plan, _ = probe_poller(max_power_w=36_000)
    e = {r.name: r for r in plan.device.registers}["e"]
    minute = timedelta(seconds=60)
    assert poller._quality(plan.meter, e, 100.0, T0, None) == GOOD
    assert poller._quality(plan.meter, e, 101.1999999, T0 + minute, None) == GOOD
    assert poller._quality(plan.meter, e, 102.4000001, T0 + 2 * minute, None) == OOR


# --- what is stamped, dropped or quarantined ---------------------------------------------------


def probe_poller(**meter: Any) -> tuple[ModbusPoller, Any, MeterState]:
    cfg = config(1, [{"id": "m1", "unit_id": 1, **meter}])  # never connected: only the decisions are used
    poller = ModbusPoller(cfg, {"probe_device": device_map(serial=True)}, clock())
    [plan] = poller._plans[cfg.meters[0].endpoint]
    return poller, plan, poller.states["m1"]


@pytest.mark.parametrize(
    ("ts", "stamped"),
    [
        (EARLIEST_TS, True),
        (LATEST_TS - timedelta(milliseconds=1), True),
        (EARLIEST_TS - timedelta(milliseconds=1), False),
        (LATEST_TS, False),
    ],
)
def test_only_times_inside_the_wire_window_are_stamped(ts: datetime, stamped: bool) -> None:
    poller, plan, state = probe_poller()
    regs = {r.name: r for r in plan.device.registers}
    values = {regs["p"]: 5.0, regs["e"]: 7.0, regs["serial_number"]: 99.0}  # serial: no quantity
    out = PollResult()
    readings = poller._readings(plan, state, values, ts, out)
    if stamped:
        assert sorted((r.quantity, r.value, r.ts) for r in readings) == [
            (Quantity.ENERGY_IMPORT_KWH, 7.0, ts),
            (Quantity.POWER_W, 5.0, ts),
        ]
        assert out.quarantined == []
    else:
        assert readings == []
        assert sorted(out.quarantined, key=lambda q: str(q["quantity"])) == [
            {"meter_id": "m1", "quantity": "energy_import_kwh", "ts": ts.isoformat(), "value": 7.0},
            {"meter_id": "m1", "quantity": "power_w", "ts": ts.isoformat(), "value": 5.0},
        ]


def test_a_value_that_is_not_available_is_dropped_counted_and_said(caplog: pytest.LogCaptureFixture) -> None:
    poller, plan, state = probe_poller()
    regs = {r.name: r for r in plan.device.registers}
    out = PollResult()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    readings = poller._readings(plan, state, {regs["p"]: math.nan, regs["e"]: 7.0}, T0, out)
    assert [(r.quantity, r.value) for r in readings] == [(Quantity.ENERGY_IMPORT_KWH, 7.0)]
    assert out.meter_errors == {("m1", "invalid_value"): 1}
    assert messages(caplog, logging.WARNING) == ["meter m1: p is not available (nan); dropped"]


def test_blocks_are_strict_by_default_and_may_be_exactly_the_limit() -> None:
    a, b, c = (
        Register(name=n, address=x, data_type=DataType.UINT16)
        for n, x in (("a", 0x10), ("b", 0x11), ("c", 0x12))
    )
    assert plan_blocks([a, c], 125) == [  # one unmapped register between: not spanned by default
        ReadBlock(RegisterType.INPUT, 0x10, 1, (a,)),
        ReadBlock(RegisterType.INPUT, 0x12, 1, (c,)),
    ]
    assert plan_blocks([a, c], 125, max_gap=1) == [ReadBlock(RegisterType.INPUT, 0x10, 3, (a, c))]
    assert plan_blocks([a, b], 2) == [ReadBlock(RegisterType.INPUT, 0x10, 2, (a, b))]  # = the limit


@pytest.mark.parametrize(("stopbits", "bits"), [(1, 10), (2, 11)])
def test_a_serial_line_waits_the_silence_of_its_own_framing(stopbits: int, bits: int) -> None:
    """Serial Line V1.02 §2.5.1.1: 3.5 characters between frames; a character of 8 data bits
    without parity is 1 start + 8 + the stop bits (ptys refuse parity, so none here)."""
    with NullModem() as modem:
        line = {"transport": "rtu", "serial_port": modem.ports[1], "baudrate": 9600, "stopbits": stopbits}
        meter = {"id": "m1", "unit_id": 1, "model": "probe_device", **line}
        ep = Endpoint(
            EdgeConfig.model_validate(
                {"supplier": "s", "site": "x", "gateway": "g", "meters": [meter]}
            ).meters[0]
        )
        assert asyncio.run(ep.connect(0.1))
        try:
            assert ep._rtu is not None and ep._rtu.silence_s == pytest.approx(3.5 * bits / 9600)
        finally:
            ep.close()


def test_a_block_decoded_from_the_wrong_number_of_words_is_refused() -> None:
    [block] = plan_blocks(list(device_map().registers), 125, max_gap=0x10)
    assert isinstance(block, ReadBlock) and block.count == 0x11
    with pytest.raises(BadReply, match=r"^expected 17 registers, got 16$"):
        decode_block(block, [0] * 16)


# --- Modbus TCP faults pymodbus's server does not produce ----------------------------------------


class RawTcpDevice:
    """A Modbus TCP peer on a raw socket that receives requests and then, per ``mode``: never
    answers ("silent"), drops the connection ("close"), answers a read with one register fewer
    than asked ("short"), answers with the other read function (3 for 4, 4 for 3:
    "other_function") or from another unit id ("other_unit"), or answers every read with words 7
    ("answer"; ``drop()`` closes the connection from its side, as a device that ends idle
    connections does). Responses follow the
    Modbus Messaging on TCP/IP Implementation Guide V1.0b, §3.1 (MBAP header: transaction id,
    protocol 0, length, unit id) and the Application Protocol V1.1b3 §6.3/6.4."""

    def __init__(self, mode: str, host: str = "127.0.0.1") -> None:
        self.mode = mode
        self.received = b""
        self.requests: list[tuple[int, int, int, int]] = []  # unit, function, address, count
        self.connections = 0
        self.close_after = 0  # "answer": close the connection after this many answers (0: never)
        self.conn: socket.socket | None = None
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.conn = conn
            with conn:
                while data := _recv(conn):
                    self.received += data
                    if self.mode == "close":
                        return
                    if self.mode == "short":  # 1 register (byte count 2): length = unit + fc + count + 2
                        conn.sendall(data[:2] + bytes([0, 0, 0, 5, data[6], data[7], 2, 0, 7]))
                    if self.mode in ("other_function", "other_unit"):  # a valid reply, but not to us
                        count = struct.unpack(">H", data[10:12])[0]
                        function = data[7] ^ 7 if self.mode == "other_function" else data[7]  # 3 <-> 4
                        unit = data[6] + 1 if self.mode == "other_unit" else data[6]
                        pdu = bytes([function, 2 * count]) + struct.pack(f">{count}H", *[7] * count)
                        conn.sendall(data[:2] + struct.pack(">HHB", 0, len(pdu) + 1, unit) + pdu)
                    if self.mode == "answer":
                        address, count = struct.unpack(">HH", data[8:12])
                        self.requests.append((data[6], data[7], address, count))
                        pdu = bytes([data[7], 2 * count]) + struct.pack(f">{count}H", *[7] * count)
                        conn.sendall(data[:2] + struct.pack(">HHB", 0, len(pdu) + 1, data[6]) + pdu)
                        if len(self.requests) == self.close_after:
                            conn.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        assert self.conn is not None
        self.conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        self.listener.close()
        self.thread.join(5)


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(256)
    except OSError:
        return b""


def raw_poll(mode: str, caplog: pytest.LogCaptureFixture) -> tuple[PollResult, RawTcpDevice, str]:
    dev = RawTcpDevice(mode)
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1, "transport": "tcp"}], modbus_timeout_s=0.2)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    try:
        [result] = polls(ModbusPoller(cfg, two_registers(offset=1), clock()), 1)
    finally:
        dev.close()
    return result, dev, f"127.0.0.1:{dev.port}"


def test_a_silent_modbus_tcp_device_gets_one_request_and_is_a_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    result, dev, ep = raw_poll("silent", caplog)
    assert result.errors == {"timeout": 1} and result.status == {"m1": "failed"}
    assert len(dev.received) == 12  # one read request (MBAP 7 + PDU 5): pymodbus does not retry it
    [warning] = messages(caplog, logging.WARNING)
    assert warning.startswith(f"meter m1 ({ep} unit 1): ") and "No response received" in warning


def test_a_modbus_tcp_connection_dropped_mid_request_is_lost_not_a_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    result, _, ep = raw_poll("close", caplog)
    assert result.errors == {"connect": 1} and result.status == {"m1": "failed"}
    assert messages(caplog, logging.WARNING) == [f"meter m1 ({ep} unit 1): connection to {ep} lost"]


@pytest.mark.parametrize("transport", ["tcp", "rtu_over_tcp"])
def test_the_connect_is_bounded_by_the_meters_timeout(transport: str) -> None:
    """A device that never completes the connect is given up on after the meter's timeout
    (test_a_device_that_accepts_no_connection_is_a_connect_failure), not after pymodbus's default
    3 s or the kernel's minutes of SYN retries. Tests take no time bounds, so the bound is read
    where the connect takes it, before any request: pymodbus 3.16's ModbusProtocol.connect waits
    ``comm_params.timeout_connect`` (each request sets it again: Endpoint._read_once), and the
    RTU-over-TCP socket keeps the timeout socket.create_connection was given."""

    async def main(port: int) -> float | None:
        ep = Endpoint(config(port, [{"id": "m1", "unit_id": 1, "transport": transport}]).meters[0])
        try:
            assert await ep.connect(1.25)
            if ep._tcp is not None:
                return ep._tcp.ctx.comm_params.timeout_connect
            assert ep._rtu is not None and isinstance(ep._rtu.line, TcpLine)
            return ep._rtu.line.sock.gettimeout()
        finally:
            ep.close()

    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel completes the handshake
        assert asyncio.run(main(listener.getsockname()[1])) == 1.25


def test_a_modbus_tcp_reply_with_too_few_registers_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    result, _, _ = raw_poll("short", caplog)
    assert result.errors == {"bad_reply": 1} and result.readings == []
    assert messages(caplog, logging.WARNING) == ["meter m1: block 16+2 lost: expected 2 registers, got 1"]


def test_a_modbus_tcp_reply_with_another_function_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """pymodbus pairs a reply with its request by transaction id alone, so a gateway that answers an
    input-register read with holding registers had its words decoded as ours (Modbus Application
    Protocol V1.1b3 §6.3/6.4: the response echoes the request's function code)."""
    result, _, _ = raw_poll("other_function", caplog)
    assert result.errors == {"bad_reply": 1} and result.readings == []
    assert messages(caplog, logging.WARNING) == [
        "meter m1: block 16+2 lost: reply carries function 3, the request was function 4"
    ]


def test_a_modbus_tcp_reply_from_another_unit_is_not_taken(caplog: pytest.LogCaptureFixture) -> None:
    """Messaging on TCP/IP V1.0b §3.1.3: the server copies the unit identifier back. pymodbus drops
    a reply from another unit, so the request times out and none of its words are read."""
    result, dev, _ = raw_poll("other_unit", caplog)
    assert result.errors == {"timeout": 1} and result.readings == []
    assert len(dev.received) == 12


def test_a_modbus_tcp_device_that_ended_the_connection_is_identified_again() -> None:
    """The device closes the connection between two polls. The poller opens a new one and reads
    the serial number again (a device swapped behind the address is noticed); pymodbus must not
    reconnect behind its back, which it would do within 0.1 s by default."""
    dev = RawTcpDevice("answer", host="127.0.0.2")  # not 127.0.0.1: the configured host is the one used
    meter = {"id": "m1", "unit_id": 1, "transport": "tcp"}
    cfg = config(dev.port, [meter], host="127.0.0.2", modbus_timeout_s=0.5)

    async def main() -> list[PollResult]:
        poller = ModbusPoller(cfg, {"probe_device": device_map(serial=True)}, clock())
        try:
            first = await poller.poll()
            dev.drop()
            await asyncio.sleep(1.5)  # time for a reconnect by pymodbus itself, were it allowed
            return [first, await poller.poll()]
        finally:
            poller.close()

    try:
        results = asyncio.run(main())
    finally:
        dev.close()
    assert [r.status for r in results] == [{"m1": "ok"}] * 2
    assert dev.connections == 2
    assert [r for r in dev.requests if r[2] == 0xFC00] == [(1, 3, 0xFC00, 2)] * 2


def test_the_client_of_an_ended_connection_is_closed_before_a_new_one_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway runs for months and devices end idle connections: each reconnect used to leave the
    old pymodbus client (its transport and tasks) open. Every client but the live one is closed."""
    from pymodbus.client import AsyncModbusTcpClient

    opened: list[AsyncModbusTcpClient] = []
    closed: list[AsyncModbusTcpClient] = []
    real_init, real_close = AsyncModbusTcpClient.__init__, AsyncModbusTcpClient.close

    def init(self: AsyncModbusTcpClient, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    def close(self: AsyncModbusTcpClient, *args: Any, **kwargs: Any) -> None:
        closed.append(self)
        real_close(self, *args, **kwargs)

    monkeypatch.setattr(AsyncModbusTcpClient, "__init__", init)
    monkeypatch.setattr(AsyncModbusTcpClient, "close", close)
    dev = RawTcpDevice("answer")
    cfg = config(dev.port, [{"id": "m1", "unit_id": 1, "transport": "tcp"}], modbus_timeout_s=0.5)

    async def main() -> None:
        poller = ModbusPoller(cfg, {"probe_device": device_map(serial=True)}, clock())
        try:
            for _ in range(3):
                assert (await poller.poll()).status == {"m1": "ok"}
                dev.drop()
                await asyncio.sleep(0.2)
            assert (await poller.poll()).status == {"m1": "ok"}
            assert len(opened) == 4 and set(map(id, closed)) >= set(map(id, opened[:3]))
            assert id(opened[3]) not in set(map(id, closed))
        finally:
            poller.close()

    try:
        asyncio.run(main())
    finally:
        dev.close()


def test_a_connection_ended_between_two_requests_loses_only_the_blocks_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The device ends the connection right after answering m1's first block; the pause before the
    next request lets the client see it. m1 keeps the block it got and loses the other, saying
    why; m2, on the same endpoint, is read over a new connection."""
    dev = RawTcpDevice("answer")
    dev.close_after = 1
    meters = [{"id": m, "unit_id": u, "transport": "tcp"} for m, u in (("m1", 1), ("m2", 2))]
    cfg = config(dev.port, meters, modbus_timeout_s=0.5, pause_between_requests_s=0.1)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    try:
        [result] = polls(ModbusPoller(cfg, {"probe_device": device_map()}, clock()), 1)
    finally:
        dev.close()
    assert result.status == {"m1": "partial", "m2": "ok"} and result.errors == {"bad_reply": 1}
    assert {(r.meter_id, r.quantity) for r in result.readings} == {
        ("m1", Quantity.POWER_W),
        ("m2", Quantity.POWER_W),
        ("m2", Quantity.ENERGY_IMPORT_KWH),
    }
    [warning] = messages(caplog, logging.WARNING)
    assert warning.startswith("meter m1: block 32+1 lost: ") and "Not connected" in warning
    assert dev.connections == 2
