"""The operator's commands: ``edge check`` (file lines, meter ids, models, hosts, --connect),
``edge probe`` (read once, print decoded values with units, publish nothing), ``edge status``,
and ``edge run --polls`` failing when every read failed, with the broker's failure cause logged."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.outbox import Outbox
from ops.procs import free_port
from ops.settings import REPO_ROOT
from tests.test_edge_profiles import load_case, served, serving

CLI = [sys.executable, "-c", "from ops.cli import main; raise SystemExit(main())", "edge"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def gateway(tmp_path: Path, meters: str, extra: str = "") -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        f"supplier = 's'\nsite = 'x'\ngateway = 'g'\noutbox_path = '{tmp_path}/outbox.sqlite'\n"
        f"modbus_timeout_s = 0.5\nmodbus_retries = 0\n{extra}\n{meters}"
    )
    return path


@pytest.fixture
def em24_device() -> Iterator[int]:
    """The RS-485 EM24 case of tests/devices served by a plain pymodbus server (in a thread)."""
    case = load_case("carlo_gavazzi_em24")
    port: list[int] = []
    ready, stop = threading.Event(), threading.Event()

    async def body(p: int) -> None:
        port.append(p)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(serving(served(case), case["unit_id"], body)))
    thread.start()
    assert ready.wait(10)
    yield port[0]
    stop.set()
    thread.join(10)


def test_check_names_the_meter_and_its_line(tmp_path: Path) -> None:
    path = gateway(
        tmp_path,
        "[[meters]]\nid = 'ok-1'\nhost = '10.0.0.1'\nunit_id = 1\nmodel = 'eastron_sdm630'\n\n"
        "[[meters]]\nid = 'boiler'\nhost = '192.168.1.300'\nunit_id = 1\nmodel = 'eastron_sdm630'\n",
    )
    out = cli("check", str(path))
    assert out.returncode == 2
    assert (
        f"{path}: line 16: meter boiler: host: '192.168.1.300' is neither an IP address nor a host name"
        in out.stderr
    )


def test_check_lists_the_available_models(tmp_path: Path) -> None:
    path = gateway(tmp_path, "[[meters]]\nid = 'm1'\nhost = '10.0.0.1'\nunit_id = 1\nmodel = 'em24'\n")
    out = cli("check", str(path))
    assert out.returncode == 2
    assert f"{path}: line 12: meter m1: no device map for model 'em24'; available models: " in out.stderr
    assert "carlo_gavazzi_em24, carlo_gavazzi_em24_e1, eastron_sdm120" in out.stderr


def test_check_connect_reads_every_meter_and_reports_the_wrong_model(
    tmp_path: Path, em24_device: int
) -> None:
    meters = (
        f"[[meters]]\nid = 'rs485'\nhost = '127.0.0.1'\nport = {em24_device}\nunit_id = 5\n"
        "model = 'carlo_gavazzi_em24'\n\n"
        f"[[meters]]\nid = 'as-e1'\nhost = '127.0.0.1'\nport = {em24_device}\nunit_id = 5\n"
        "model = 'carlo_gavazzi_em24_e1'\n"
    )
    # Two meters on one endpoint and unit are refused by the config check: use two files.
    first = gateway(tmp_path, meters.split("\n\n")[0])
    assert cli("check", str(first), "--connect").returncode == 0
    (tmp_path / "e1").mkdir()
    second = gateway(tmp_path / "e1", meters.split("\n\n")[1])
    out = cli("check", str(second), "--connect")
    assert out.returncode == 1
    assert f"as-e1: 127.0.0.1:{em24_device} unit 5: wrong_model (wrong_model x1)" in out.stdout
    assert "reports model code 71" in out.stderr


def test_probe_prints_decoded_values_with_units_and_publishes_nothing(
    tmp_path: Path, em24_device: int
) -> None:
    path = gateway(
        tmp_path,
        f"[[meters]]\nid = 'rs485'\nhost = '127.0.0.1'\nport = {em24_device}\nunit_id = 5\n"
        "model = 'carlo_gavazzi_em24'\n",
    )
    out = cli("probe", str(path), "--meter", "rs485")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"meter rs485 (carlo_gavazzi_em24, 127.0.0.1:{em24_device} unit 5): ok"
    row = next(line for line in lines if line.split()[0] == "total_import_kwh")
    assert row.split()[1:3] == ["123456.7", "kWh"] and row.endswith("-> energy_import_kwh")
    assert next(line for line in lines if line.split()[0] == "total_power_factor").split()[1] == "-0.987"
    assert not (tmp_path / "outbox.sqlite").exists()  # nothing stored, nothing to publish
    unknown = cli("probe", str(path), "--meter", "nope")
    assert unknown.returncode == 2 and "no meter nope; meters: rs485" in unknown.stderr


def test_status_reports_the_outbox(tmp_path: Path) -> None:
    path = gateway(
        tmp_path, "[[meters]]\nid = 'm1'\nhost = '10.0.0.1'\nunit_id = 1\nmodel = 'eastron_sdm630'\n"
    )
    assert cli("status", str(path)).returncode == 2  # no outbox yet: said so
    with Outbox(tmp_path / "outbox.sqlite", "g") as outbox:
        outbox.set_meta("counters", '{"m1/energy_import_kwh": [5.0, "2026-11-02T00:00:00+00:00", 7, [1.0]]}')
    out = cli("status", str(path))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["pending_batches"] == 0
    assert status["counters"]["m1/energy_import_kwh"] == {
        "baseline": 5.0,
        "at": "2026-11-02T00:00:00+00:00",
        "serial": 7,
        "unconfirmed_drop": [1.0],
    }


def test_run_polls_exits_non_zero_when_every_read_failed_and_logs_the_broker_cause(tmp_path: Path) -> None:
    dead_modbus, dead_broker = free_port(), free_port()
    path = gateway(
        tmp_path,
        f"[[meters]]\nid = 'm1'\nhost = '127.0.0.1'\nport = {dead_modbus}\nunit_id = 1\n"
        "model = 'eastron_sdm630'\n",
    )
    env = {
        "SCOPEMETER_MQTT__PORT": str(dead_broker),
        "SCOPEMETER_MQTT__HOST": "127.0.0.1",
        "SCOPEMETER_CLOCK__SPEED": "1000",
    }
    out = cli("run", str(path), "--polls", "1", "--drain-timeout", "1", env=env)
    assert out.returncode == 2, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["polls"] == 1 and report["successful_meter_reads"] == 0
    assert f"MQTT broker 127.0.0.1:{dead_broker} unreachable" in out.stderr
    assert "ConnectionRefusedError" in out.stderr
