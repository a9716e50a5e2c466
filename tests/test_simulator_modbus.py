"""The simulator over real Modbus TCP: a plain pymodbus client decoding the Eastron SDM630 map must
read back the load profile's ground truth."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from ops.settings import REPO_ROOT, ClockSettings, Settings
from simulators.config import SimulationConfig, SimulationConfigError, load_simulation
from simulators.loadprofile import energy_kwh, power_w
from simulators.meters import RunningSimulator, start_simulator

DEMO = REPO_ROOT / "config/simulation/demo.toml"
CONFIG_DIR = Settings().config_dir
T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)  # 10:00 in Shenzhen: lines are running


def f32(regs: Sequence[int], address: int, base: int) -> float:
    """Independent of edge.devices: Eastron float32, big-endian, high word first."""
    i = address - base
    return float(struct.unpack(">f", struct.pack(">HH", regs[i], regs[i + 1]))[0])


def f32_ulp(x: float) -> float:
    """Spacing of float32 values around x: the resolution of an SDM630 register."""
    packed = struct.unpack(">I", struct.pack(">f", abs(x)))[0]
    return float(struct.unpack(">f", struct.pack(">I", packed + 1))[0]) - abs(x)


def with_simulator(
    clock: ClockSettings, body: Callable[[RunningSimulator, AsyncModbusTcpClient], object]
) -> None:
    async def main() -> None:
        sim = await start_simulator(load_simulation(DEMO), clock, CONFIG_DIR, host="127.0.0.1", port=0)
        client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=2, retries=1)
        try:
            assert await client.connect()
            await body(sim, client)  # type: ignore[misc]
        finally:
            client.close()
            await sim.stop()

    asyncio.run(main())


def test_counters_follow_ground_truth_over_tcp() -> None:
    # 1 wall second = 10 simulated minutes: the counters move visibly between reads.
    clock = ClockSettings(speed=600, sim_start=T0, wall_start=time.time())

    async def body(sim: RunningSimulator, client: AsyncModbusTcpClient) -> None:
        last: dict[int, float] = {}
        for _ in range(8):
            for meter in sim.meters.values():
                unit, profile = meter.meter.unit_id, meter.meter.profile
                before = clock.now()
                resp = await client.read_input_registers(0x0000, count=0x004C, device_id=unit)
                after = clock.now()
                assert not resp.isError(), resp
                regs = resp.registers
                imported = f32(regs, 0x0048, 0)
                lo = meter.meter.initial_import_kwh + energy_kwh(profile, T0, before)
                hi = meter.meter.initial_import_kwh + energy_kwh(profile, T0, after)
                tol = f32_ulp(hi)
                assert lo - tol <= imported <= hi + tol
                assert imported >= last.get(unit, 0.0)
                last[unit] = imported
                # Power is the profile's step value at the read instant, somewhere in [before, after].
                step = timedelta(seconds=profile.step_s)
                candidates = {
                    power_w(profile, before + k * step) for k in range((after - before) // step + 1)
                }
                candidates.add(power_w(profile, after))
                assert f32(regs, 0x0034, 0) in {float(w) for w in candidates}
                assert f32(regs, 0x004A, 0) == 0.0  # these loads never export
                assert 49.9 < f32(regs, 0x0046, 0) < 50.1
                for addr in (0x0000, 0x0002, 0x0004):
                    assert 215 < f32(regs, addr, 0) < 225
                phase_w = sum(f32(regs, a, 0) for a in (0x000C, 0x000E, 0x0010))
                assert phase_w == pytest.approx(f32(regs, 0x0034, 0), rel=1e-5)
                assert f32(regs, 0x0006, 0) > 0
            await asyncio.sleep(0.05)  # let simulated time pass between rounds (not synchronisation)
        assert all(
            v > meter.meter.initial_import_kwh
            for v, meter in zip(last.values(), sim.meters.values(), strict=True)
        )

    with_simulator(clock, body)


def test_partial_block_and_errors_behave_like_a_device() -> None:
    # A frozen clock (10^-12 simulated seconds per wall second): however slow the machine, the
    # counter served is the initial reading, to float32 resolution -- no wall-time tolerance.
    clock = ClockSettings(speed=1e-12, sim_start=T0, wall_start=time.time())

    async def body(sim: RunningSimulator, client: AsyncModbusTcpClient) -> None:
        meter = sim.meters["sz1-smt-line-1"]
        resp = await client.read_input_registers(0x0048, count=4, device_id=1)
        assert not resp.isError()
        initial = meter.meter.initial_import_kwh
        assert f32(resp.registers, 0x0048, 0x0048) == pytest.approx(initial, abs=initial * 2**-23)
        # The high word alone is still the start of the same float32 (odd-length reads are legal).
        half = await client.read_input_registers(0x0048, count=1, device_id=1)
        assert half.registers[0] == resp.registers[0]
        missing = await client.read_input_registers(0x0048, count=2, device_id=42)
        assert missing.isError() and missing.exception_code == 0x0B  # gateway: no response from unit
        write = await client.write_register(0x0048, 1, device_id=1)
        assert write.isError()
        outside = await client.read_input_registers(0x0400, count=2, device_id=1)
        assert outside.isError() and outside.exception_code == 0x02

    with_simulator(clock, body)


def test_sim_run_subprocess_reports_its_port(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from ops.cli import main; raise SystemExit(main())",
            "sim",
            "run",
            str(DEMO),
            "--port",
            "0",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server listens (or the process dies)
        ready = json.loads(line)
        assert ready["event"] == "sim.listening" and ready["port"] > 0
        assert ready["meters"] == sorted(m.id for m in load_simulation(DEMO).meters)

        async def read() -> float:
            client = AsyncModbusTcpClient("127.0.0.1", port=ready["port"], timeout=2, retries=1)
            assert await client.connect()
            resp = await client.read_input_registers(0x0048, count=2, device_id=4)
            client.close()
            return f32(resp.registers, 0x0048, 0x0048)

        assert asyncio.run(read()) >= 9876.0
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_config_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[meters]]\nid = 'a'\nunit_id = 1\n"
        "[meters.profile]\nkind = 'production'\nbase_kw = 50\npeak_kw = 10\n"
        "[[meters]]\nid = 'a'\nunit_id = 300\n[meters.profile]\nkind = 'nuclear'\n"
    )
    with pytest.raises(SimulationConfigError) as err:
        load_simulation(bad)
    text = str(err.value)
    assert str(bad) in text
    assert "meters.0.profile.production" in text and "peak_kw must be >= base_kw" in text
    assert "meters.1.unit_id" in text
    assert "nuclear" in text
    with pytest.raises(SimulationConfigError, match="no such file"):
        load_simulation(tmp_path / "missing.toml")


def test_demo_matches_the_fleet_registry() -> None:
    import tomllib

    fleet = tomllib.loads((CONFIG_DIR / "fleet.toml").read_text())
    sim: SimulationConfig = load_simulation(DEMO)
    fleet_units = {(m["id"], m["unit_id"], m["model"], m["profile"]) for m in fleet["meters"]}
    assert {(m.id, m.unit_id, m.model, m.profile.kind) for m in sim.meters} == fleet_units
