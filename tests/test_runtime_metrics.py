"""Metrics per process, /healthz and runbooks.

- ``ops.metrics.serve`` answers /metrics from one registry and /healthz from the process's health
  (200, or 503 with the reason), on the configured bind address.
- Each process's registry holds only its own metrics; a real bridge's scraped series, fed to
  promtool beside a writer backlog, do not fire ScopemeterWriterStalled.
- Every alert names a runbook that exists and says what the alert means, what to check, how to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from ops import metrics
from ops.procs import free_port
from ops.settings import Settings

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "ops" / "prometheus"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_healthz_reports_each_dependency_and_metrics_only_the_process_registry() -> None:
    health = metrics.Health("kafka", "db")
    port = free_port()
    server = metrics.serve(port, metrics.WRITER, health=health)
    assert server is not None
    try:
        base = f"http://127.0.0.1:{port}"
        status, body = _get(base + "/healthz")
        assert status == 503
        assert json.loads(body)["dependencies"] == {"kafka": "not connected yet", "db": "not connected yet"}
        health.up("kafka")
        health.up("db")
        status, body = _get(base + "/healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        health.down("db", "OperationalError: connection refused")
        status, body = _get(base + "/healthz")
        assert status == 503
        want = {"kafka": "ok", "db": "OperationalError: connection refused"}
        assert json.loads(body)["dependencies"] == want
        status, page = _get(base + "/metrics")
        assert status == 200
        assert "scopemeter_writer_last_commit_timestamp_seconds" in page
        assert 'scopemeter_dependency_up{dependency="db"} 0.0' in page
        assert "scopemeter_bridge_" not in page and "scopemeter_edge_" not in page
        assert _get(base + "/")[0] == 404  # the metrics page is not served for every path any more
    finally:
        server.shutdown()


def test_metrics_listen_on_the_configured_address() -> None:
    """127.0.0.2 is loopback too on Linux: bound there, the server is not on 127.0.0.1."""
    port = free_port()
    server = metrics.serve(port, metrics.COMPUTE, bind="127.0.0.2")
    assert server is not None
    try:
        assert _get(f"http://127.0.0.2:{port}/healthz")[0] == 200
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        server.shutdown()


def _names(registry: object) -> set[str]:
    return {f.name for f in registry.collect() if f.name.startswith("scopemeter_")}  # type: ignore[attr-defined]


def test_each_registry_holds_only_its_process_metrics() -> None:
    bridge, writer, compute = _names(metrics.BRIDGE), _names(metrics.WRITER), _names(metrics.COMPUTE)
    shared = "scopemeter_dependency_"
    assert all(n.startswith(("scopemeter_bridge_", "scopemeter_gateway_", shared)) for n in bridge)
    assert all(n.startswith(("scopemeter_writer_", "scopemeter_kafka_", shared)) for n in writer)
    assert all(n.startswith(("scopemeter_compute_", "scopemeter_kafka_", shared)) for n in compute)
    assert {"scopemeter_writer_last_commit_timestamp_seconds", "scopemeter_kafka_consumer_lag"} <= writer


def _series(exposition: str, job: str, instance: str) -> list[dict[str, str]]:
    """promtool input series (constant over the test) from a /metrics page."""
    out = []
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        if not math.isfinite(float(value)):
            continue
        name, _, labels = name_labels.partition("{")
        labels = labels.rstrip("}")
        extra = f'job="{job}",instance="{instance}"'
        out.append({"series": f"{name}{{{labels + ',' if labels else ''}{extra}}}", "values": f"{value}x30"})
    return out


def test_a_real_bridge_does_not_fire_the_writer_alert(settings: Settings, tmp_path: Path) -> None:
    """Scrape a running ``scopemeter ingest bridge``, then let promtool evaluate the alert rules on
    its series beside a writer that has a backlog and keeps committing. Before each process had
    its own registry the bridge exported the writer's last-commit gauge at 0, which fired."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEMETER_")}
    env |= {
        "SCOPEMETER_MQTT": settings.mqtt.model_dump_json(),
        "SCOPEMETER_KAFKA": settings.kafka.model_dump_json(),
        "SCOPEMETER_DB": settings.db.model_dump_json(),
        "SCOPEMETER_STACK__STATE_DIR": str(tmp_path),
    }
    argv = [sys.executable, "-m", "ops.cli", "ingest", "bridge", "--metrics-port", str(port),
            "--client-id", f"bridge-metrics-{uuid.uuid4().hex[:8]}"]  # fmt: skip
    log = (tmp_path / "bridge.log").open("wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                status, body = 0, ""
            if status == 200:
                break
            assert proc.poll() is None, (tmp_path / "bridge.log").read_text()
            assert time.monotonic() < deadline, f"bridge never healthy: {status} {body}"
            time.sleep(0.2)
        assert json.loads(body)["dependencies"] == {"mqtt": "ok", "kafka": "ok"}
        _, page = _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert "scopemeter_bridge_messages_total" in page or "scopemeter_bridge_in_flight_messages" in page
    assert "scopemeter_writer_" not in page and "scopemeter_compute_" not in page

    writer = 'job="scopemeter-writer",instance="127.0.0.1:9102"'
    lag = f'scopemeter_kafka_consumer_lag{{{writer},group="writer",topic="readings.v1",partition="0"}}'
    series = [
        *_series(page, "scopemeter-bridge", "127.0.0.1:9101"),
        {"series": f"scopemeter_writer_last_commit_timestamp_seconds{{{writer}}}", "values": "0+60x30"},
        {"series": lag, "values": "500x30"},
    ]
    test = {
        "rule_files": [str(PROM / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "25m", "alertname": "ScopemeterWriterStalled", "exp_alerts": []}
                ],
            }
        ],
    }
    path = tmp_path / "bridge_alerts_test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    r = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_runbook_that_exists() -> None:
    text = (PROM / "alerts.yml").read_text()
    # Each rule from its "- alert:" line to the next one (the file is a flat list of rules).
    blocks = re.split(r"^\s*- alert: ", text, flags=re.M)[1:]
    assert len(blocks) >= 8
    alerts = set()
    for block in blocks:
        alert = block.split()[0]
        alerts.add(alert)
        found = re.search(r"^\s+runbook_url: (\S+)$", block, re.M)
        assert found, f"{alert} has no runbook_url"
        url = found.group(1)
        assert url == f"ops/runbooks/{alert}.md", alert
        page = (REPO / url).read_text()
        assert page.startswith(f"# {alert}\n"), url
        for part in ("**Meaning.**", "**Checks.**", "**Fixes.**"):
            assert part in page, f"{url} lacks {part}"
    pages = {p.stem for p in (REPO / "ops" / "runbooks").glob("Scopemeter*.md")}
    assert pages == alerts  # no runbook left for an alert that is gone


def test_bridge_health_follows_its_mqtt_broker(settings: Settings, tmp_path: Path) -> None:
    """A private Mosquitto is stopped under a running bridge and started again on the same port:
    the bridge's health says MQTT is down with the reason meanwhile, and up once it reconnects."""
    import asyncio

    from ingest.bridge import run_bridge
    from ops.stack import start_mosquitto

    port = free_port()
    brokers = [start_mosquitto(port, tmp_path / "mosquitto")]
    run_settings = settings.model_copy(
        update={
            "mqtt": settings.mqtt.model_copy(update={"port": port}),
            "ingest": settings.ingest.model_copy(update={"shared_subscription": False}),
        }
    )
    health = metrics.Health("mqtt", "kafka")
    seen: list[tuple[bool, dict[str, str]]] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        client_id = f"bridge-health-{uuid.uuid4().hex[:8]}"
        bridge = asyncio.create_task(run_bridge(run_settings, stop, client_id=client_id, health=health))

        async def until(healthy: bool) -> None:
            deadline = time.monotonic() + 60
            while health.report()[0] != healthy or (not healthy and health.is_up("mqtt")):
                assert not bridge.done(), bridge.exception()
                assert time.monotonic() < deadline, health.report()
                await asyncio.sleep(0.1)
            seen.append(health.report())

        try:
            await until(True)
            brokers[-1].stop()
            await until(False)
            brokers.append(start_mosquitto(port, tmp_path / "mosquitto"))
            await until(True)
        finally:
            stop.set()
            await asyncio.wait_for(bridge, 30)

    try:
        asyncio.run(scenario())
    finally:
        brokers[-1].stop()
    assert seen[0] == (True, {"mqtt": "ok", "kafka": "ok"})
    assert seen[1][1]["kafka"] == "ok" and seen[1][1]["mqtt"].startswith("disconnected"), seen[1]
    assert seen[2] == (True, {"mqtt": "ok", "kafka": "ok"})
