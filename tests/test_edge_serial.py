"""Modbus RTU on a real serial line: the simulator serves one end of a virtual null-modem cable
(two pseudo-terminals wired together), the poller opens the other end with pyserial, as on a
gateway with a USB-RS485 adapter.  Plus the config checks for serial settings."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge.config import EdgeConfig, EdgeConfigError, load_edge_config
from edge.devices import load_model
from edge.modbus import ModbusPoller, PollResult
from edge.wire import Quantity
from ops.settings import REPO_ROOT, ClockSettings, Settings
from simulators.config import SimulationConfig
from simulators.meters import RunningSimulator, start_simulator
from simulators.nullmodem import NullModem

CONFIG_DIR = Settings().config_dir
T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)
CLI = [sys.executable, "-c", "from ops.cli import main; raise SystemExit(main())"]
LINE = {"baudrate": 19200, "stopbits": 2}  # ptys take any speed; parity they refuse
FLAT = {"kind": "production", "base_kw": 30.0, "peak_kw": 30.0, "noise": 0.0}


def frozen_clock() -> ClockSettings:
    return ClockSettings(speed=1e-9, sim_start=T0, wall_start=time.time())


@pytest.fixture
def modem() -> Iterator[NullModem]:
    with NullModem() as m:
        yield m


def sim_config(port: str, meters: list[dict[str, Any]]) -> SimulationConfig:
    base = {"profile": FLAT, "initial_import_kwh": 4321.5}
    return SimulationConfig.model_validate(
        {"server": {"serial_port": port, **LINE}, "meters": [{**base, **m} for m in meters]}
    )


def rtu_config(port: str, meters: list[dict[str, Any]]) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "supplier": "s",
            "site": "x",
            "gateway": "g",
            "quantities": ["energy_import_kwh", "power_w"],
            "modbus_timeout_s": 0.3,
            "modbus_retries": 0,
            "meters": [{"transport": "rtu", "serial_port": port, **LINE, **m} for m in meters],
        }
    )


async def poll(poller: ModbusPoller) -> PollResult:
    return await poller.poll()


def test_sdm120_on_a_serial_line_reads_the_truth_and_silence_and_noise_are_counted(modem: NullModem) -> None:
    clock = frozen_clock()
    sim_meters = [{"id": "a", "unit_id": 1, "model": "eastron_sdm120"}, {"id": "b", "unit_id": 2}]
    edge_meters = [
        {"id": "a", "unit_id": 1, "model": "eastron_sdm120"},
        {"id": "ghost", "unit_id": 9, "model": "eastron_sdm120", "timeout_s": 0.2},  # nobody answers
        {"id": "b", "unit_id": 2, "model": "eastron_sdm630"},
    ]
    config = rtu_config(modem.ports[1], edge_meters)
    maps = {m: load_model(CONFIG_DIR, m) for m in ("eastron_sdm120", "eastron_sdm630")}

    async def main() -> tuple[list[PollResult], RunningSimulator]:
        sim = await start_simulator(sim_config(modem.ports[0], sim_meters), clock, CONFIG_DIR)
        poller = ModbusPoller(config, maps, clock)
        try:
            results = [await poller.poll()]
            modem.corrupt(1)  # line noise on meter a's next answer (its power block): a bad CRC
            results.append(await poller.poll())
            results.append(await poller.poll())  # the line is clean again
            return results, sim
        finally:
            poller.close()
            await sim.stop()

    results, sim = asyncio.run(main())
    truth = sim.meters["a"].import_kwh(clock.now())
    for i, result in enumerate(results):
        assert result.failed_meters == ["ghost"]
        # The damaged reply is refused (never decoded) and loses only its block: a's power.
        assert result.errors == ({"timeout": 1, "bad_reply": 1} if i == 1 else {"timeout": 1})
        got = {(r.meter_id, r.quantity): r.value for r in result.readings}
        lost = {("a", Quantity.POWER_W)} if i == 1 else set()
        assert (
            set(got)
            == {(m, q) for m in ("a", "b") for q in (Quantity.ENERGY_IMPORT_KWH, Quantity.POWER_W)} - lost
        )
        if i != 1:
            assert abs(got[("a", Quantity.ENERGY_IMPORT_KWH)] - truth) <= truth * 2**-23
            assert got[("a", Quantity.POWER_W)] == pytest.approx(30_000.0, abs=0.1)
        assert got[("b", Quantity.POWER_W)] == pytest.approx(30_000.0, abs=0.1)
    assert modem.corrupted == 1


def test_a_missing_serial_device_is_a_counted_failure_not_a_crash(tmp_path: Path) -> None:
    config = rtu_config(str(tmp_path / "ttyUSB9"), [{"id": "a", "unit_id": 1, "model": "eastron_sdm120"}])
    poller = ModbusPoller(
        config, {"eastron_sdm120": load_model(CONFIG_DIR, "eastron_sdm120")}, frozen_clock()
    )
    try:
        result = asyncio.run(poll(poller))
    finally:
        poller.close()
    assert result.failed_meters == ["a"] and result.errors == {"connect": 1} and not result.readings


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)


def gateway_toml(tmp_path: Path, meter: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        'supplier = "s"\nsite = "x"\ngateway = "g"\n'
        f'[[meters]]\nid = "m1"\nunit_id = 1\nmodel = "eastron_sdm120"\n{meter}\n'
    )
    return path


@pytest.mark.parametrize(
    ("meter", "message"),
    [
        ('transport = "rtu"', 'transport "rtu" needs serial_port'),
        ('transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nhost = "10.0.0.5"', "host and port are for tcp"),
        ('transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nbaudrate = 12345', "baudrate 12345 is not one of"),
        ('transport = "rtu"\nserial_port = "/dev/ttyUSB0"\nparity = "X"', "parity"),
        ('host = "10.0.0.5"\nbaudrate = 9600', 'baudrate need transport = "rtu"'),
        ('transport = "tcp"', 'transport "tcp" needs host'),
    ],
)
def test_serial_settings_are_validated(tmp_path: Path, meter: str, message: str) -> None:
    with pytest.raises(EdgeConfigError) as err:
        load_edge_config(gateway_toml(tmp_path, meter))
    assert message in str(err.value)


def test_meters_on_one_line_share_its_settings() -> None:
    with pytest.raises(ValueError, match="must share baudrate"):
        rtu_config(
            "/dev/ttyUSB0",
            [
                {"id": "a", "unit_id": 1, "model": "m"},
                {"id": "b", "unit_id": 2, "model": "m", "baudrate": 9600},
            ],
        )
    with pytest.raises(ValueError, match="share an endpoint and unit id: /dev/ttyUSB0/1"):
        rtu_config(
            "/dev/ttyUSB0", [{"id": "a", "unit_id": 1, "model": "m"}, {"id": "b", "unit_id": 1, "model": "m"}]
        )


def test_edge_check_reports_rtu_without_a_port_and_accepts_a_serial_meter(tmp_path: Path) -> None:
    bad = cli("edge", "check", str(gateway_toml(tmp_path, 'transport = "rtu"')))
    assert (
        bad.returncode != 0
        and f'{tmp_path}/gw.toml: line 4: meter m1: transport "rtu" needs serial_port (the RS485 line, '
        "e.g. /dev/ttyUSB0)\n"
        in bad.stderr
    )
    good = cli(
        "edge", "check", str(gateway_toml(tmp_path, 'transport = "rtu"\nserial_port = "/dev/ttyUSB0"'))
    )
    assert good.returncode == 0 and good.stdout.startswith("ok: gateway g"), good.stderr


def test_sim_run_serves_rtu_on_a_serial_port(modem: NullModem, tmp_path: Path) -> None:
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text(
        '[[meters]]\nid = "a"\nunit_id = 5\nmodel = "eastron_sdm120"\n'
        '[meters.profile]\nkind = "production"\nbase_kw = 30.0\npeak_kw = 30.0\nnoise = 0.0\n'
    )
    clock = {"SCOPEMETER_CLOCK__SPEED": "1e-9", "SCOPEMETER_CLOCK__SIM_START": T0.isoformat()}
    proc = subprocess.Popen(
        [*CLI, "sim", "run", str(sim_toml), "--serial-port", modem.ports[0]],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **clock},
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready == {"event": "sim.listening", "serial_port": modem.ports[0], "meters": ["a"]}
        config = EdgeConfig.model_validate(
            {
                "supplier": "s",
                "site": "x",
                "gateway": "g",
                "modbus_retries": 0,
                "meters": [
                    {
                        "id": "a",
                        "unit_id": 5,
                        "model": "eastron_sdm120",
                        "transport": "rtu",
                        "serial_port": modem.ports[1],
                    }
                ],
            }
        )
        poller = ModbusPoller(
            config, {"eastron_sdm120": load_model(CONFIG_DIR, "eastron_sdm120")}, frozen_clock()
        )
        try:
            result = asyncio.run(poll(poller))
        finally:
            poller.close()
        assert not result.failed_meters
        assert {r.quantity: r.value for r in result.readings}[Quantity.ENERGY_IMPORT_KWH] == pytest.approx(
            0.0, abs=1e-3
        )
    finally:
        proc.terminate()
        proc.wait(10)
