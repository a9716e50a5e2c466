"""Broker outages between a real edge agent and a real Mosquitto: the fault proxy in
simulators/netfault.py drops every connection mid-run and refuses new ones, then recovers; a real
subscriber must end with every reading exactly once (re-sends only as identical batches)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge import metrics
from edge.agent import RunReport, run_agent
from edge.wire import Batch, readings_topic
from ops.procs import ManagedProcess, free_port
from ops.settings import REPO_ROOT, ClockSettings, MqttSettings, Settings, StackSettings
from simulators.config import load_simulation
from simulators.meters import start_simulator
from simulators.netfault import FaultProxy
from tests.test_edge_durability import CLI, DEMO_SIM, T0, Collector, demo_gateway


async def until(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Wait for a condition of the system (never for a duration); the limit only ends a hung test."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        await asyncio.sleep(0.02)


def test_agent_rides_out_a_broker_outage_and_delivers_every_reading_once(
    mosquitto: ManagedProcess, tmp_path: Path
) -> None:
    gateway = f"gw-cut-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    modbus_port = free_port()
    config = demo_gateway(gateway, modbus_port, tmp_path)
    clock = ClockSettings(speed=60, sim_start=T0, wall_start=time.time())  # a poll every 1/12 s
    collector = Collector(mosquitto.port, readings_topic(config.supplier, config.site, gateway))
    backlog, connected = metrics.EDGE_OUTBOX_BATCHES, metrics.EDGE_MQTT_CONNECTED

    def received() -> set[int]:
        with collector.lock:
            return {Batch.decode(p).seq for p in collector.payloads}

    async def main() -> tuple[RunReport, FaultProxy, int]:
        proxy = FaultProxy(("127.0.0.1", 0), ("127.0.0.1", mosquitto.port))
        await proxy.start()
        settings = Settings(
            mqtt=MqttSettings(port=proxy.port), clock=clock, stack=StackSettings(state_dir=tmp_path)
        )
        sim = await start_simulator(load_simulation(DEMO_SIM), clock, settings.config_dir, port=modbus_port)
        stop = asyncio.Event()
        agent = asyncio.create_task(run_agent(config, settings, stop=stop, drain_timeout_s=20))
        try:
            await until(lambda: len(received()) >= 3, "batches through the proxy")
            dropped = await proxy.cut()
            await until(lambda: connected._value.get() == 0, "the agent noticing the outage")
            await until(lambda: backlog._value.get() >= 5, "batches piling up in the outbox")
            await proxy.restore()
            await until(lambda: connected._value.get() == 1, "the agent reconnecting")
            stop.set()  # the agent drains its outbox before it returns
            report = await agent
        finally:
            stop.set()
            if not agent.done():
                agent.cancel()
            await sim.stop()
            await proxy.stop()
        return report, proxy, dropped

    try:
        report, proxy, dropped = asyncio.run(main())
        assert report.last_seq is not None and report.pending_batches == 0
        asyncio.run(
            until(lambda: received() >= set(range(report.last_seq + 1)), "every batch at the subscriber")
        )
    finally:
        collector.stop()
    assert dropped == 1 and proxy.outages == 1 and proxy.connections >= 2
    by_seq: dict[int, Batch] = {}
    for b in (Batch.decode(p) for p in collector.payloads):
        assert by_seq.setdefault(b.seq, b) == b  # a re-send is the very same batch
    assert sorted(by_seq) == list(range(report.last_seq + 1))
    identities = [(r.meter_id, r.quantity, r.ts) for b in by_seq.values() for r in b.readings]
    assert len(identities) == len(set(identities)) == report.readings_produced == 12 * len(by_seq)


def test_broker_outage_cli_drops_and_refuses(mosquitto: ManagedProcess) -> None:
    proc = subprocess.Popen(
        [
            *CLI,
            "sim",
            "broker-outage",
            "--listen",
            "0",
            "--upstream",
            f"127.0.0.1:{mosquitto.port}",
            "--down-after",
            "0",
            "--down-for",
            "3600",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        listening = json.loads(proc.stdout.readline())
        assert listening["event"] == "proxy.listening"
        assert json.loads(proc.stdout.readline()) == {"event": "proxy.down", "dropped": 0}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listening["port"]), timeout=5)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_broker_outage_cli_rejects_a_bad_upstream() -> None:
    bad = subprocess.run(
        [
            *CLI,
            "sim",
            "broker-outage",
            "--listen",
            "0",
            "--upstream",
            "nohostport",
            "--down-after",
            "1",
            "--down-for",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "expected HOST:PORT" in bad.stderr
