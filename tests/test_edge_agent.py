"""The edge agent end to end: simulator over Modbus TCP → agent → real Mosquitto → subscriber."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.agent import RunReport, next_tick, run_agent
from edge.config import EdgeConfig, EdgeConfigError, EdgeMeter, load_device_maps, load_edge_config
from edge.wire import Batch, Quantity, readings_topic, status_topic
from ops.procs import free_port
from ops.settings import REPO_ROOT, ClockSettings, MqttSettings, Settings, StackSettings
from simulators.config import load_simulation
from simulators.loadprofile import energy_kwh
from simulators.meters import RunningSimulator, start_simulator

MOSQUITTO = Path("/usr/sbin/mosquitto")
DEMO_GATEWAY = REPO_ROOT / "config/edge/demo-gateway.toml"
DEMO_SIM = REPO_ROOT / "config/simulation/demo.toml"
T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)  # 10:00 in Shenzhen
SPEED = 60.0  # 1 wall second = 1 simulated minute
INTERVAL_S = 5.0  # simulated: a poll every ~83 ms of wall time


@pytest.fixture
def broker_port(tmp_path: Path) -> Iterator[int]:
    """A private Mosquitto on a free port; yields once it logged that it is running."""
    if not MOSQUITTO.exists():
        pytest.fail(f"{MOSQUITTO} missing: run `make services`")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # blocks on the broker's own log, no sleeping
        if " running" in line:
            break
    else:
        pytest.fail(f"mosquitto exited with {proc.wait()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the pipe
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@dataclass
class Subscriber:
    """Collects every batch published on one gateway's topics."""

    port: int
    batches: list[Batch] = field(default_factory=list)
    status: list[dict[str, str]] = field(default_factory=list)
    invalid: list[bytes] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self, config: EdgeConfig) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-subscriber")
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.subscribe(
            [
                (readings_topic(config.supplier, config.site, config.gateway), 1),
                (status_topic(config.supplier, config.site, config.gateway), 1),
            ]
        )
        self.client.loop_start()
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            if msg.topic.endswith("/status"):
                self.status.append(json.loads(msg.payload))
            else:
                try:
                    self.batches.append(Batch.decode(bytes(msg.payload)))
                except ValueError:
                    self.invalid.append(bytes(msg.payload))
            self.cond.notify_all()

    def wait_for_readings(self, n: int, timeout: float = 5.0) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.readings() >= n, timeout)
            return self.readings()

    def readings(self) -> int:
        return sum(len(b.readings) for b in self.batches)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def setup(
    tmp_path: Path, mqtt_port: int, modbus_port: int, *, ghost: bool = False, start: datetime = T0
) -> tuple[EdgeConfig, Settings]:
    config = load_edge_config(DEMO_GATEWAY)
    meters = [m.model_copy(update={"port": modbus_port}) for m in config.meters]
    if ghost:  # a configured meter that never answers (unit id not on the line)
        meters.append(
            EdgeMeter(id="sz1-ghost", host="127.0.0.1", port=modbus_port, unit_id=9, model="eastron_sdm630")
        )
    config = config.model_copy(
        update={
            "meters": tuple(meters),
            "poll_interval_s": INTERVAL_S,
            "outbox_path": tmp_path / "outbox.sqlite",
        }
    )
    settings = Settings(
        mqtt=MqttSettings(port=mqtt_port),
        clock=ClockSettings(speed=SPEED, sim_start=start, wall_start=time.time()),
        stack=StackSettings(state_dir=tmp_path),
    )
    return config, settings


async def agent_with_simulator(
    config: EdgeConfig, settings: Settings, polls: int, modbus_port: int, **kw: float
) -> tuple[RunReport, RunningSimulator]:
    sim = await start_simulator(
        load_simulation(DEMO_SIM), settings.clock, settings.config_dir, port=modbus_port
    )
    try:
        report = await run_agent(config, settings, polls=polls, **kw)  # type: ignore[arg-type]
    finally:
        await sim.stop()
    return report, sim


def test_every_polled_reading_reaches_the_broker_as_a_valid_batch(tmp_path: Path, broker_port: int) -> None:
    polls = 5
    modbus_port = free_port()
    config, settings = setup(tmp_path, broker_port, modbus_port, ghost=True)
    sub = Subscriber(broker_port)
    sub.start(config)
    try:
        report, sim = asyncio.run(agent_with_simulator(config, settings, polls, modbus_port))
        expected = polls * 4 * 3  # polls x answering meters x quantities
        assert report.polls == polls
        assert report.failed_meter_reads == polls  # the ghost, every time
        assert report.readings_produced == report.readings_published == expected
        assert report.pending_batches == 0
        assert (report.first_seq, report.last_seq) == (0, polls - 1)
        assert sub.wait_for_readings(expected) == expected
    finally:
        sub.stop()
    assert sub.invalid == []
    assert sorted(b.seq for b in sub.batches) == list(range(polls))
    readings = [r for b in sub.batches for r in b.readings]
    assert {(r.meter_id, r.quantity) for r in readings} == {
        (m, q)
        for m in sim.meters
        for q in (Quantity.ENERGY_IMPORT_KWH, Quantity.ENERGY_EXPORT_KWH, Quantity.POWER_W)
    }
    assert len({(r.meter_id, r.quantity, r.ts) for r in readings}) == expected  # identities are unique
    for r in readings:
        assert r.ts.microsecond % 1000 == 0
        assert T0 < r.ts < T0 + timedelta(seconds=INTERVAL_S * (polls + 2) + 120)
        if r.quantity is Quantity.ENERGY_IMPORT_KWH:
            meter = sim.meters[r.meter_id].meter
            # The meter computed the value a little before the response was stamped.
            lo = meter.initial_import_kwh + energy_kwh(meter.profile, T0, r.ts - timedelta(seconds=30))
            hi = meter.initial_import_kwh + energy_kwh(meter.profile, T0, r.ts)
            assert lo - 0.002 <= r.value <= hi + 0.002
    for meter_id in sim.meters:
        imports = [
            r.value
            for r in sorted(readings, key=lambda r: r.ts)
            if r.meter_id == meter_id and r.quantity is Quantity.ENERGY_IMPORT_KWH
        ]
        assert imports == sorted(imports) and imports[-1] > imports[0]
    assert sub.status[-1] == {"gateway": config.gateway, "state": "offline"}  # clean exit, not the LWT


def test_batches_survive_a_broker_outage_and_a_restart(tmp_path: Path, broker_port: int) -> None:
    modbus_port = free_port()
    # First run: the broker is unreachable, so both batches stay in the outbox.
    config, settings = setup(tmp_path, free_port(), modbus_port)
    first, _ = asyncio.run(agent_with_simulator(config, settings, 2, modbus_port, drain_timeout_s=0.3))
    assert (first.readings_produced, first.readings_published, first.pending_batches) == (24, 0, 2)
    # Second run, same outbox, broker up: the old batches go first, then the new one.  Simulated
    # time goes on from where it was (restarting it at T0 would be a clock going back: quarantined).
    config, settings = setup(tmp_path, broker_port, modbus_port, start=T0 + timedelta(hours=1))
    sub = Subscriber(broker_port)
    sub.start(config)
    try:
        second, _ = asyncio.run(agent_with_simulator(config, settings, 1, modbus_port))
        assert second.readings_produced == 12
        assert second.readings_published == 36 and second.batches_published == 3
        assert second.pending_batches == 0
        assert (second.first_seq, second.last_seq) == (2, 2)  # the sequence continued across restart
        assert sub.wait_for_readings(36) == 36
    finally:
        sub.stop()
    assert sorted(b.seq for b in sub.batches) == [0, 1, 2]


def test_polls_follow_the_shared_clock_grid() -> None:
    now = datetime(2026, 11, 2, 2, 0, 7, 500_000, tzinfo=UTC)
    assert next_tick(now, 5) == datetime(2026, 11, 2, 2, 0, 10, tzinfo=UTC)
    assert next_tick(datetime(2026, 11, 2, 2, 0, 10, tzinfo=UTC), 5) == datetime(
        2026, 11, 2, 2, 0, 15, tzinfo=UTC
    )
    assert next_tick(now, 60) == datetime(2026, 11, 2, 2, 1, tzinfo=UTC)


def test_demo_gateway_config_matches_fleet_and_simulation() -> None:
    import tomllib

    config = load_edge_config(DEMO_GATEWAY)
    maps = load_device_maps(config, Settings().config_dir)
    assert set(maps) == {"eastron_sdm630"}
    fleet = tomllib.loads((REPO_ROOT / "config/fleet.toml").read_text())
    assert {(m["id"], m["gateway"], m["unit_id"]) for m in fleet["meters"]} == {
        (m.id, config.gateway, m.unit_id) for m in config.meters
    }
    sim = load_simulation(DEMO_SIM)
    assert {(m.id, m.unit_id) for m in sim.meters} == {(m.id, m.unit_id) for m in config.meters}
    assert {(m.host, m.port) for m in config.meters} == {(sim.server.host, sim.server.port)}


def test_bad_configs_are_explained(tmp_path: Path) -> None:
    bad = tmp_path / "gw.toml"
    bad.write_text(
        "supplier = 'acme'\nsite = 'x'\ngateway = 'gw/../evil'\npoll_interval_s = 0\n"
        "[[meters]]\nid = 'm1'\nhost = 'h'\nunit_id = 1\nmodel = 'eastron_sdm630'\n"
        "[[meters]]\nid = 'm1'\nhost = 'h'\nunit_id = 2\nmodel = 'eastron_sdm630'\n"
    )
    with pytest.raises(EdgeConfigError) as err:
        load_edge_config(bad)
    text = str(err.value)
    assert str(bad) in text and "gateway:" in text and "poll_interval_s:" in text

    bad.write_text(
        "supplier = 'acme'\nsite = 'x'\ngateway = 'gw'\nquantities = ['gas_m3']\n"
        "[[meters]]\nid = 'm1'\nhost = 'h'\nunit_id = 1\nmodel = 'eastron_sdm630'\n"
        "[[meters]]\nid = 'm2'\nhost = 'h'\nunit_id = 2\nmodel = 'no_such_meter'\n"
    )
    config = load_edge_config(bad)
    with pytest.raises(EdgeConfigError) as err:
        load_device_maps(config, Settings().config_dir)
    assert "meter m1: model eastron_sdm630 maps no register for gas_m3" in str(err.value)
    assert "no device map for model 'no_such_meter'; available models: carlo_gavazzi_em24," in str(err.value)


def test_edge_check_cli() -> None:
    run = [sys.executable, "-c", "from ops.cli import main; raise SystemExit(main())", "edge", "check"]
    ok = subprocess.run([*run, str(DEMO_GATEWAY)], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: gateway gw-sz1-01 (acme-electronics/sz-plant-1), 4 meters")
    bad = subprocess.run([*run, "nope.toml"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "scopemeter: error: nope.toml: no such file"
