"""Durability of the edge agent: kill -9 of a real agent process, a 24 h broker outage in simulated
time with a bounded outbox, bounded backfill, and the clock checks that quarantine readings."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge import metrics
from edge.agent import RateLimit, run_agent
from edge.clock import ClockCheck, measure_http_offset
from edge.config import EdgeConfig, load_edge_config
from edge.outbox import Outbox
from edge.wire import Batch, readings_topic
from ops.procs import ManagedProcess, free_port
from ops.settings import REPO_ROOT, ClockSettings, MqttSettings, Settings, StackSettings
from simulators.config import load_simulation
from simulators.meters import start_simulator

DEMO_GATEWAY = REPO_ROOT / "config/edge/demo-gateway.toml"
DEMO_SIM = REPO_ROOT / "config/simulation/demo.toml"
T0 = datetime(2026, 11, 2, 2, tzinfo=UTC)
CLI = [sys.executable, "-c", "from ops.cli import main; raise SystemExit(main())"]


class Collector:
    """A real MQTT subscriber keeping every payload on one gateway's readings topic."""

    def __init__(self, port: int, topic: str) -> None:
        self.payloads: list[bytes] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"collector-{os.getpid()}-{time.monotonic_ns()}"
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert ready.wait(5)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.payloads.append(bytes(msg.payload))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def gateway_file(tmp: Path, modbus_port: int, gateway: str, **extra: object) -> Path:
    """The demo gateway, polling every 5 simulated seconds, on a unique gateway id and outbox."""
    text = DEMO_GATEWAY.read_text().replace("port = 15020", f"port = {modbus_port}")
    text = text.replace('gateway = "gw-sz1-01"', f'gateway = "{gateway}"')
    text = text.replace("poll_interval_s = 60", "poll_interval_s = 5")
    text = text.replace(
        'outbox_path = "edge/gw-sz1-01.outbox.sqlite"', f'outbox_path = "{tmp / "outbox.sqlite"}"'
    )
    head = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    path = tmp / "gateway.toml"
    path.write_text(head + text)
    return path


@pytest.fixture
def sim_port() -> Iterator[int]:
    proc = subprocess.Popen(
        [*CLI, "sim", "run", str(DEMO_SIM), "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **clock_env()},
    )
    assert proc.stdout is not None
    yield int(json.loads(proc.stdout.readline())["port"])
    proc.kill()
    proc.wait()


_CLOCK = {"SCOPEMETER_CLOCK__SPEED": "60", "SCOPEMETER_CLOCK__SIM_START": T0.isoformat()}


def clock_env() -> dict[str, str]:
    _CLOCK.setdefault("SCOPEMETER_CLOCK__WALL_START", str(time.time()))
    return _CLOCK


def test_kill_9_mid_run_loses_and_invents_nothing(
    mosquitto: ManagedProcess, sim_port: int, tmp_path: Path
) -> None:
    gateway = f"gw-kill-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    config_path = gateway_file(tmp_path, sim_port, gateway)
    config = load_edge_config(config_path)
    collector = Collector(mosquitto.port, readings_topic(config.supplier, config.site, gateway))
    env = {
        **os.environ,
        **clock_env(),
        "SCOPEMETER_MQTT__PORT": str(mosquitto.port),
        "SCOPEMETER_STACK__STATE_DIR": str(tmp_path),
    }
    try:
        first = subprocess.Popen(
            [*CLI, "edge", "run", str(config_path)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Wait until a few batches went through, then kill without any chance to clean up.
        deadline = time.monotonic() + 20
        while len(collector.payloads) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        with Outbox(tmp_path / "outbox.sqlite", gateway) as outbox:
            produced_before = outbox.next_seq()
        second = subprocess.run(
            [*CLI, "edge", "run", str(config_path), "--polls", "3"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 0, second.stderr[-2000:]
        report = json.loads(second.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 10
        while len({Batch.decode(p).seq for p in collector.payloads}) < report["last_seq"] + 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        collector.stop()
    batches = [Batch.decode(p) for p in collector.payloads]
    by_seq: dict[int, Batch] = {}
    for b in batches:  # a redelivery (PUBACK lost in the kill) must be the very same batch
        assert by_seq.setdefault(b.seq, b) == b
    assert produced_before >= 5 and report["pending_batches"] == 0
    assert sorted(by_seq) == list(range(report["last_seq"] + 1))  # every stored batch, no gap
    identities = [(r.meter_id, r.quantity, r.ts) for b in by_seq.values() for r in b.readings]
    assert len(identities) == len(set(identities)) == 12 * len(by_seq)  # 4 meters x 3 quantities each


def test_24h_outage_evicts_oldest_metered_then_backfills(tmp_path: Path, mosquitto: ManagedProcess) -> None:
    """24 simulated hours (10 min polls) with no broker and room for 100 batches, then the broker."""
    gateway = f"gw-outage-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    config = load_edge_config(DEMO_GATEWAY).model_copy(
        update={
            "gateway": gateway,
            "poll_interval_s": 600.0,
            "outbox_max_batches": 100,
            "outbox_path": tmp_path / "outbox.sqlite",
            "backfill_batches_per_s": 400.0,
        }
    )
    modbus_port = free_port()
    clock = ClockSettings(speed=36_000, sim_start=T0, wall_start=time.time())  # 10 h per wall second
    evicted_before = metrics.EDGE_OUTBOX_EVICTED_READINGS._value.get()

    async def run(port: int, polls: int) -> tuple[object, object]:
        settings = Settings(
            mqtt=MqttSettings(port=port), clock=clock, stack=StackSettings(state_dir=tmp_path)
        )
        meters = tuple(m.model_copy(update={"port": modbus_port}) for m in config.meters)
        sim = await start_simulator(load_simulation(DEMO_SIM), clock, settings.config_dir, port=modbus_port)
        try:
            return await run_agent(
                # Back online, the new poll may land before the backlog is acknowledged: room for it,
                # so that eviction happens only where the outage test means it to.
                config.model_copy(
                    update={"meters": meters, "outbox_max_batches": 100 if port != mosquitto.port else 200}
                ),
                settings,
                polls=polls,
                drain_timeout_s=0.2 if port != mosquitto.port else 20,
            ), sim
        finally:
            await sim.stop()

    down, _ = asyncio.run(run(free_port(), 144))
    assert down.polls == 144 and down.pending_batches == 100  # type: ignore[attr-defined]
    assert down.dropped_readings == 44 * 12  # type: ignore[attr-defined]
    assert metrics.EDGE_OUTBOX_EVICTED_READINGS._value.get() - evicted_before == 44 * 12
    collector = Collector(mosquitto.port, readings_topic(config.supplier, config.site, gateway))
    try:
        up, _ = asyncio.run(run(mosquitto.port, 1))
        deadline = time.monotonic() + 10
        while len(collector.payloads) < 101 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        collector.stop()
    assert up.pending_batches == 0 and up.batches_published == 101  # type: ignore[attr-defined]
    seqs = sorted({Batch.decode(p).seq for p in collector.payloads})
    assert seqs == list(range(44, 145))  # the newest 100 of the outage, then the new poll


def test_rate_limit_bounds_backfill() -> None:
    now = [0.0]
    limit = RateLimit(rate=10, burst=10, clock=lambda: now[0])
    sent = 0
    for _ in range(80):  # 10 s in 1/8 s steps (exact in binary), always wanting more
        n = limit.available()
        limit.take(n)
        sent += n
        now[0] += 0.125
    assert sent == 10 + int(10 * 79 * 0.125)  # the burst, then 10 per second of elapsed time
    assert limit.wait_s() > 0


def test_clock_check_quarantine_rules() -> None:
    check = ClockCheck(max_offset_s=300)
    t = T0
    assert check.verdict("m", t) is None
    check.accept("m", t)
    assert check.verdict("m", t - timedelta(seconds=1)) == "clock_went_back"
    assert check.verdict("m", t) == "clock_went_back"  # same identity again: not a new reading
    assert check.verdict("other", t - timedelta(days=1)) is None
    check.offset_s = -301.0
    assert check.verdict("m", t + timedelta(seconds=60)) == "clock_offset"


@pytest.fixture
def http_reference() -> Iterator[str]:
    """A real HTTP server on this machine: its Date header is the reference clock."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_offset_is_measured_against_an_http_date(http_reference: str) -> None:
    assert abs(measure_http_offset(http_reference, lambda: datetime.now(UTC))) <= 1.0
    fast = measure_http_offset(http_reference, lambda: datetime.now(UTC) + timedelta(hours=1))
    assert abs(fast + 3600) <= 1.0


def demo_gateway(gateway: str, modbus_port: int, tmp_path: Path, **update: object) -> EdgeConfig:
    """The demo gateway's config as ``gateway``, polling every 5 s from meters on ``modbus_port``,
    with its outbox in ``tmp_path``; ``update`` overrides more settings."""
    base = load_edge_config(DEMO_GATEWAY)
    return base.model_copy(
        update={
            "gateway": gateway,
            "poll_interval_s": 5.0,
            "outbox_path": tmp_path / "outbox.sqlite",
            "meters": tuple(m.model_copy(update={"port": modbus_port}) for m in base.meters),
            **update,
        }
    )


def test_a_wrong_gateway_clock_quarantines_and_counts(
    http_reference: str, tmp_path: Path, mosquitto: ManagedProcess
) -> None:
    """Simulated time (2026-11-02) is far from the reference's real now: nothing may be sent."""
    gateway = f"gw-clock-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    modbus_port = free_port()
    config = demo_gateway(gateway, modbus_port, tmp_path, clock_reference_url=http_reference)
    clock = ClockSettings(speed=60, sim_start=T0, wall_start=time.time())
    settings = Settings(
        mqtt=MqttSettings(port=mosquitto.port), clock=clock, stack=StackSettings(state_dir=tmp_path)
    )
    before = metrics.EDGE_QUARANTINED_READINGS.labels("clock_offset")._value.get()

    async def main() -> object:
        sim = await start_simulator(load_simulation(DEMO_SIM), clock, settings.config_dir, port=modbus_port)
        try:
            return await run_agent(config, settings, polls=2, drain_timeout_s=1)
        finally:
            await sim.stop()

    report = asyncio.run(main())
    assert report.quarantined_readings == 24 and report.readings_produced == 0  # type: ignore[attr-defined]
    assert abs(report.clock_offset_s) > 300  # type: ignore[attr-defined]
    assert metrics.EDGE_QUARANTINED_READINGS.labels("clock_offset")._value.get() - before == 24
    with Outbox(tmp_path / "outbox.sqlite", gateway) as outbox:
        assert outbox.quarantined() == {"clock_offset": 24} and outbox.count() == 0
