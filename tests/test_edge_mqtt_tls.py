"""The agent against a real Mosquitto with mTLS, username/password and ACLs: certificates are made
here with the cryptography package; the ACL proves a gateway cannot publish to another site."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.agent import run_agent
from edge.config import EdgeConfig
from edge.wire import Batch, readings_topic
from ops.procs import free_port
from ops.settings import ClockSettings, MqttSettings, Settings, StackSettings
from simulators.config import SimulationConfig
from simulators.meters import start_simulator
from tests.tls_support import make_pki

MOSQUITTO = "/usr/sbin/mosquitto"
T0 = dt.datetime(2026, 11, 2, 2, tzinfo=dt.UTC)


class SecureBroker:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.tls_port = free_port()
        self.pw_port = free_port()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    b = SecureBroker(tmp_path)
    make_pki(tmp_path, ["gw-a", "admin"])
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "gw-b", "s3cret"], check=True)
    (tmp_path / "acl").write_text(
        "user gw-a\ntopic write scopemeter/v1/acme/site-a/gw-a/#\n"
        "user gw-b\ntopic write scopemeter/v1/acme/site-b/gw-b/#\n"
        "user admin\ntopic read #\n"
    )
    d = tmp_path
    (tmp_path / "mosquitto.conf").write_text(
        f"""per_listener_settings true
user {getpass.getuser()}
persistence false
log_dest stderr
listener {b.tls_port} 127.0.0.1
allow_anonymous false
cafile {d}/ca.pem
certfile {d}/server.pem
keyfile {d}/server.key
require_certificate true
use_identity_as_username true
acl_file {d}/acl
listener {b.pw_port} 127.0.0.1
allow_anonymous false
password_file {d}/passwd
acl_file {d}/acl
"""
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        if " running" in line:
            break
    else:
        pytest.fail(f"mosquitto exited with {proc.wait()}: {''.join(log)}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    yield b
    proc.terminate()
    proc.wait(timeout=10)


def admin_subscriber(b: SecureBroker) -> tuple[mqtt.Client, list[tuple[str, bytes]]]:
    got: list[tuple[str, bytes]] = []
    ready = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"admin-{time.monotonic_ns()}")
    c.tls_set(
        ca_certs=str(b.dir / "ca.pem"), certfile=str(b.dir / "admin.pem"), keyfile=str(b.dir / "admin.key")
    )
    c.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    c.on_subscribe = lambda *_a: ready.set()
    c.connect("127.0.0.1", b.tls_port)
    c.subscribe("scopemeter/v1/#", qos=1)
    c.loop_start()
    assert ready.wait(5)
    return c, got


def gateway_config(site: str, gateway: str, modbus_port: int, tmp: Path) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "supplier": "acme",
            "site": site,
            "gateway": gateway,
            "poll_interval_s": 5,
            "outbox_path": str(tmp / f"{gateway}.sqlite"),
            "meters": [
                {
                    "id": f"{gateway}-m1",
                    "host": "127.0.0.1",
                    "port": modbus_port,
                    "unit_id": 1,
                    "model": "eastron_sdm630",
                }
            ],
        }
    )


def run_gateway(
    config: EdgeConfig, mqtt_settings: MqttSettings, tmp: Path, polls: int = 2, drain_s: float = 5
) -> int:
    clock = ClockSettings(speed=60, sim_start=T0, wall_start=time.time())
    settings = Settings(mqtt=mqtt_settings, clock=clock, stack=StackSettings(state_dir=tmp))
    sim_cfg = SimulationConfig.model_validate(
        {"meters": [{"id": "x", "unit_id": 1, "profile": {"kind": "hvac", "base_kw": 5, "peak_kw": 9}}]}
    )

    async def main() -> int:
        sim = await start_simulator(
            sim_cfg, clock, settings.config_dir, host="127.0.0.1", port=config.meters[0].port
        )
        try:
            report = await run_agent(config, settings, polls=polls, drain_timeout_s=drain_s)
        finally:
            await sim.stop()
        return report.readings_published

    return asyncio.run(main())


def test_mtls_gateway_publishes_and_acl_fences_it_to_its_site(broker: SecureBroker, tmp_path: Path) -> None:
    admin, got = admin_subscriber(broker)
    try:
        tls = MqttSettings(
            host="127.0.0.1",
            port=broker.tls_port,
            tls=True,
            ca_file=broker.dir / "ca.pem",
            cert_file=broker.dir / "gw-a.pem",
            key_file=broker.dir / "gw-a.key",
        )
        published = run_gateway(gateway_config("site-a", "gw-a", free_port(), tmp_path), tls, tmp_path)
        assert published == 2 * 2  # two polls x (import kWh, power)
        # The same certificate, configured for another site's topic: the broker accepts the
        # connection but the ACL drops every message (MQTT 3.1.1 still PUBACKs).
        intruder = gateway_config("site-b", "gw-a", free_port(), tmp_path / "b")
        run_gateway(intruder, tls, tmp_path / "b", polls=1)
        deadline = time.monotonic() + 5
        while sum(1 for t, _ in got if t.endswith("/readings")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        admin.loop_stop()
        admin.disconnect()
    readings_topics = {t for t, _ in got if t.endswith("/readings")}
    assert readings_topics == {readings_topic("acme", "site-a", "gw-a")}
    batches = [Batch.decode(p) for t, p in got if t.endswith("/readings")]
    assert sum(len(b.readings) for b in batches) == 4
    assert not any("site-b" in t for t, _ in got)  # not even its status topic


def test_no_client_certificate_no_connection(broker: SecureBroker) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon")
    c.tls_set(ca_certs=str(broker.dir / "ca.pem"))
    with pytest.raises(OSError):
        c.connect("127.0.0.1", broker.tls_port)
        c.loop(timeout=2)
        c.publish("x", b"y")
        c.loop(timeout=2)
        if not c.is_connected():
            raise OSError("refused")


def test_password_gateway_and_wrong_password(broker: SecureBroker, tmp_path: Path) -> None:
    admin, got = admin_subscriber(broker)
    try:
        good = MqttSettings(host="127.0.0.1", port=broker.pw_port, username="gw-b", password="s3cret")
        assert run_gateway(gateway_config("site-b", "gw-b", free_port(), tmp_path), good, tmp_path, 1) == 2
        bad = good.model_copy(update={"password": "wrong"})
        assert (
            run_gateway(
                gateway_config("site-b", "gw-b2", free_port(), tmp_path / "x"), bad, tmp_path / "x", 1
            )
            == 0
        )
    finally:
        admin.loop_stop()
        admin.disconnect()
    assert {t for t, _ in got if t.endswith("/readings")} == {readings_topic("acme", "site-b", "gw-b")}
