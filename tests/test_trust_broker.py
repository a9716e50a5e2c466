"""Attacks on the broker as ``stack up`` configures it, each against a real Mosquitto, each refused.

The broker runs the project's config with the dynamic-security file ``ops.mqtt_auth`` generates
for two suppliers' gateways and one bridge. "Not delivered" is shown without timing: Mosquitto
handles packets one at a time, so once the forbidden publish is acknowledged (QoS 1) a later marker
message reaches each subscriber after anything the forbidden one would have delivered; a subscriber
holding the marker and nothing else proves the forbidden message went nowhere. Every attack has a
positive control (the legitimate client doing the same thing succeeds), so each test can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge.wire import READINGS_SUBSCRIPTION, readings_topic, status_topic
from ingest.registry import register_gateway
from ops.mqtt_auth import BRIDGE_USER, AuthFiles, GatewayGrant, auth_files, render_dynsec, write_auth
from ops.procs import ManagedProcess, free_port
from ops.settings import MqttSettings, Settings, StackSettings
from ops.stack import MqttTls, client_settings, prepare_mqtt_auth, render_mosquitto_conf, start_mosquitto

X = GatewayGrant("supplier-x", "site-x", "gw-x")
Y = GatewayGrant("supplier-y", "site-y", "gw-y")
OBSERVER = "_observer"  # test-only user that may read everything, to see what reached the broker
WAIT = 30.0


@dataclass
class Client:
    """A paho client that records its CONNACK, SUBACK codes, messages and disconnects."""

    client: mqtt.Client
    connack: list[ReasonCode] = field(default_factory=list)
    suback: list[list[ReasonCode]] = field(default_factory=list)
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    disconnects: int = 0
    gone: threading.Event = field(default_factory=threading.Event)
    connected: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    got: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, topic: str, payload: bytes) -> None:
        with self.got:
            assert self.got.wait_for(
                lambda: any(m.topic == topic and m.payload == payload for m in self.messages), WAIT
            ), f"{topic} {payload!r} never arrived"

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT)
        return self.suback[-1]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def attempt(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        """Publish something the broker must refuse: "acked" (dropped silently) or "disconnected"
        (Mosquitto's dynamic-security plugin closes an MQTT 3.1.1 connection on a denied publish)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + WAIT
        while not (info.is_published() or self.gone.is_set()):
            assert time.monotonic() < deadline, "neither PUBACK nor disconnect"
            time.sleep(0.01)
        return "acked" if info.is_published() else "disconnected"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    broker: ManagedProcess, user: str | None, password: str | None, *, client_id: str | None = None,
    clean: bool = True,
) -> Client:  # fmt: skip
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                    clean_session=clean, protocol=mqtt.MQTTv311)  # fmt: skip
    c.reconnect_delay_set(60, 60)  # a kicked client must stay kicked while the test looks
    rec = Client(c)
    if user is not None:
        c.username_pw_set(user, password)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        rec.connack.append(rc)
        rec.connected.set()

    def on_subscribe(_c: mqtt.Client, _u: object, _m: int, codes: list[ReasonCode], _p: object) -> None:
        rec.suback.append(codes)
        rec.subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with rec.got:
            rec.messages.append(msg)
            rec.got.notify_all()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, _rc: ReasonCode, _p: object) -> None:
        rec.disconnects += 1
        rec.gone.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.on_disconnect = on_disconnect
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    assert rec.connected.wait(WAIT)
    return rec


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, dict[str, str]]]:
    state = tmp_path_factory.mktemp("secure-mosquitto")
    files = auth_files(state)
    creds = dict(write_auth(files, [X, Y]).credentials)
    # The test's own observer, added to the generated file; never part of what stack up writes.
    creds[OBSERVER] = uuid.uuid4().hex
    config = json.loads(files.dynsec_file.read_text())
    observer = render_dynsec({OBSERVER: creds[OBSERVER]}, {OBSERVER: [
        {"acltype": t, "topic": "#", "priority": 0, "allow": True}
        for t in ("subscribePattern", "publishClientReceive")]})  # fmt: skip
    config["clients"] += observer["clients"]
    config["roles"] += observer["roles"]
    files.dynsec_file.write_text(json.dumps(config))
    broker = start_mosquitto(free_port(), state, auth=files)
    yield broker, creds
    broker.stop()


def test_the_production_config_closes_the_broker(tmp_path: Path) -> None:
    files = auth_files(tmp_path)
    write_auth(files, [X])
    conf = render_mosquitto_conf("127.0.0.1", 1883, tmp_path, auth=files)
    for line in ("allow_anonymous false", f"plugin_opt_config_file {files.dynsec_file}",
                 "use_username_as_clientid true", "message_size_limit 8388608",
                 "persistent_client_expiration 30d", "max_connections 1024"):
        assert f"\n{line}\n" in conf, line  # fmt: skip
    assert "allow_anonymous true" not in conf and "mosquitto_dynamic_security.so" in conf
    config = json.loads(files.dynsec_file.read_text())
    assert config["defaultACLAccess"] == dict.fromkeys(
        ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"), False
    )
    roles = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"]} for r in config["roles"]}
    assert roles["gw-x"] == {("publishClientSend", readings_topic("supplier-x", "site-x", "gw-x")),
                             ("publishClientSend", status_topic("supplier-x", "site-x", "gw-x"))}  # fmt: skip
    assert ("subscribePattern", f"$share/+/{READINGS_SUBSCRIPTION}") in roles[BRIDGE_USER]
    assert all("#" not in topic for name, acls in roles.items() if name != "_admin" for _, topic in acls
               if _ != "unsubscribe")  # fmt: skip
    assert oct(files.credentials_file.stat().st_mode & 0o777) == "0o600"
    plain = set(files.credentials().values())
    assert all(c["password"] not in plain for c in config["clients"])  # hashes only
    # Regenerating keeps passwords and revokes users that left the registry.
    before = files.credentials()
    plan = write_auth(files, [])
    assert set(plan.credentials) == {"_admin", BRIDGE_USER}
    assert plan.credentials[BRIDGE_USER] == before[BRIDGE_USER]
    assert {"command": "deleteClient", "username": "gw-x"} in plan.commands
    assert "gw-x" not in files.dynsec_file.read_text()


def test_anonymous_and_wrong_password_clients_are_refused(
    secured: tuple[ManagedProcess, dict[str, str]],
) -> None:
    broker, creds = secured
    for user, password in ((None, None), ("gw-x", "wrong"), ("nobody", "x"), (BRIDGE_USER, creds["gw-x"])):
        c = connect(broker, user, password)
        try:
            assert c.connack[0].is_failure, user  # "Not authorized": nothing to subscribe with
        finally:
            c.close()
    ok = connect(broker, "gw-x", creds["gw-x"])  # control: the generated hash works in real Mosquitto
    assert not ok.connack[0].is_failure
    ok.close()


def test_a_gateway_cannot_read_others_nor_join_the_bridges_group(
    secured: tuple[ManagedProcess, dict[str, str]],
) -> None:
    broker, creds = secured
    bridge = connect(broker, BRIDGE_USER, creds[BRIDGE_USER])
    spy = connect(broker, "gw-x", creds["gw-x"])
    y = connect(broker, "gw-y", creds["gw-y"])
    try:
        shared = f"$share/ingest/{READINGS_SUBSCRIPTION}"
        assert not bridge.subscribe(f"$share/any-group/{READINGS_SUBSCRIPTION}")[0].is_failure
        bridge.client.unsubscribe(f"$share/any-group/{READINGS_SUBSCRIPTION}")  # before anything is sent
        assert not bridge.subscribe(shared)[0].is_failure  # control: the bridge may
        y_topic = readings_topic(Y.supplier, Y.site, Y.gateway)
        for topic in ("#", shared, f"$share/other/{READINGS_SUBSCRIPTION}", READINGS_SUBSCRIPTION, y_topic,
                      "$SYS/#", "$CONTROL/dynamic-security/#"):
            assert spy.subscribe(topic)[0].is_failure, topic  # fmt: skip
        topic = readings_topic(Y.supplier, Y.site, Y.gateway)
        sent = [f"batch {i}".encode() for i in range(20)]
        for payload in sent:
            y.publish(topic, payload)
        y.publish(topic, b"marker")
        bridge.wait_for(topic, b"marker")
        assert [m.payload for m in bridge.messages] == [*sent, b"marker"]  # all 20: none taken by the spy
        assert spy.messages == []
    finally:
        for c in (bridge, spy, y):
            c.close()


def test_client_ids_are_bound_to_users(secured: tuple[ManagedProcess, dict[str, str]]) -> None:
    broker, creds = secured
    bridge = connect(broker, BRIDGE_USER, creds[BRIDGE_USER], client_id="scopemeter-bridge-host")
    y = connect(broker, "gw-y", creds["gw-y"], client_id="gw-y")
    try:
        bridge.subscribe(READINGS_SUBSCRIPTION)
        # gw-x logs in with the bridge's and with gw-y's client ids: without the binding each would
        # kick the victim off and, for the bridge, take over its persistent session.
        for victim_id in (BRIDGE_USER, "scopemeter-bridge-host", "gw-y"):
            thief = connect(broker, "gw-x", creds["gw-x"], client_id=victim_id, clean=False)
            assert not thief.connack[0].is_failure
            thief.close()
        topic = readings_topic(Y.supplier, Y.site, Y.gateway)
        y.publish(topic, b"still here")
        bridge.wait_for(topic, b"still here")
        assert (bridge.disconnects, y.disconnects) == (0, 0)
        # One user, one session whatever client ids it makes up: a second persistent login of gw-x
        # under a fresh id replaces the first (200 abandoned sessions cannot pile up).
        first = connect(broker, "gw-x", creds["gw-x"], client_id="made-up-1", clean=False)
        second = connect(broker, "gw-x", creds["gw-x"], client_id="made-up-2", clean=False)
        assert first.gone.wait(WAIT) and not second.gone.is_set()
        first.close()
        second.close()
    finally:
        bridge.close()
        y.close()


def test_a_gateway_publishes_only_its_own_readings_and_status(
    secured: tuple[ManagedProcess, dict[str, str]],
) -> None:
    broker, creds = secured
    observer = connect(broker, OBSERVER, creds[OBSERVER])
    try:
        observer.subscribe("scopemeter/#")
        y_status = status_topic(Y.supplier, Y.site, Y.gateway)
        forged = [
            (y_status, b'{"online": true}', True),  # a fake retained "online" for gw-y
            (readings_topic(Y.supplier, Y.site, Y.gateway), b"forged", False),  # another supplier's topic
            (readings_topic(Y.supplier, Y.site, X.gateway), b"forged", False),  # its own id, another site
        ]
        for topic, payload, retain in forged:
            x = connect(broker, "gw-x", creds["gw-x"])
            assert x.attempt(topic, payload, retain=retain) in ("acked", "disconnected")
            x.close()
        x = connect(broker, "gw-x", creds["gw-x"])
        x_readings = readings_topic(X.supplier, X.site, X.gateway)
        x_status = status_topic(X.supplier, X.site, X.gateway)
        x.publish(x_readings, b"marker")  # control: its own topic
        observer.wait_for(x_readings, b"marker")
        assert [(m.topic, m.payload) for m in observer.messages] == [(x_readings, b"marker")]
        x.publish(x_status, b"x-online", retain=True)  # control: its own retained status
        x.close()
        late = connect(broker, OBSERVER, creds[OBSERVER])  # a retained message greets a new subscriber
        try:
            late.subscribe(y_status)
            late.subscribe(x_status)
            late.wait_for(x_status, b"x-online")
            assert [m.topic for m in late.messages] == [x_status]  # nothing retained for gw-y
        finally:
            late.close()
    finally:
        observer.close()


def test_acl_cli_generates_users_from_the_fleet_registry(settings: Settings, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
        register_gateway(conn, f"sup-{tag}", f"site-{tag}", f"gw-{tag}", [f"m-{tag}"])
    env = {**os.environ, "SCOPEMETER_DB__DSN": settings.db.dsn, "SCOPEMETER_STACK__STATE_DIR": str(tmp_path),
           "SCOPEMETER_MQTT__PORT": str(free_port())}  # fmt: skip
    cli = [sys.executable, "-m", "ops.cli", "mqtt", "acl"]
    out = subprocess.run([*cli, "--bridge-user", "_bridge-a", "--bridge-user", "_bridge-b"],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert "users" in out.stdout
    files = AuthFiles(tmp_path / "mqtt-auth")
    creds = files.credentials()
    assert {"_bridge-a", "_bridge-b", f"gw-{tag}"} <= set(creds)
    assert files.roles()[f"gw-{tag}"][0]["topic"] == readings_topic(f"sup-{tag}", f"site-{tag}", f"gw-{tag}")
    local = settings.model_copy(update={"stack": settings.stack.model_copy(update={"state_dir": tmp_path})})
    s = client_settings(local, f"gw-{tag}")
    assert (s.mqtt.username, s.mqtt.password) == (f"gw-{tag}", creds[f"gw-{tag}"])
    bad = subprocess.run([*cli, "--bridge-user", "gw-evil"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "must start with '_'" in bad.stderr
    assert files.credentials() == creds  # the last good files stay


def test_a_fleet_change_reaches_the_running_broker(settings: Settings, tmp_path: Path) -> None:
    """New gateways may connect and removed ones are cut off, without a broker restart."""
    tag = uuid.uuid4().hex[:8]
    old, new = f"gw-old-{tag}", f"gw-new-{tag}"
    local = settings.model_copy(update={
        "stack": StackSettings(state_dir=tmp_path), "mqtt": MqttSettings(port=free_port()),
    })  # fmt: skip
    with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
        register_gateway(conn, f"sup-{tag}", f"site-{tag}", old, [f"m-old-{tag}"])
        files = prepare_mqtt_auth(local)
        broker = start_mosquitto(local.mqtt.port, tmp_path, auth=files)
        try:
            creds = files.credentials()
            connected = connect(broker, old, creds[old])
            assert not connected.connack[0].is_failure
            register_gateway(conn, f"sup-{tag}", f"site-{tag}", new, [f"m-new-{tag}"])
            conn.execute("DELETE FROM meters WHERE gateway_id = %s", (old,))
            conn.execute("DELETE FROM gateways WHERE gateway_id = %s", (old,))
            prepare_mqtt_auth(local)
            fresh = connect(broker, new, files.credentials()[new])
            assert not fresh.connack[0].is_failure  # control: the change arrived
            fresh.close()
            again = connect(broker, old, creds[old])
            assert again.connack[0].is_failure  # revoked
            again.close()
            assert connected.disconnects >= 1  # and its open connection was cut
            connected.close()
        finally:
            broker.stop()


def test_mtls_option_binds_the_certificate_to_the_user(tmp_path: Path) -> None:
    """With ``MqttTls`` the listener takes only clients with a certificate of the CA, and the CN is the
    user the same generated ACLs apply to: gw-x's certificate cannot publish as gw-y."""
    from tests.tls_support import make_pki

    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, ["gw-x", "gw-y", BRIDGE_USER])
    files = auth_files(tmp_path)
    write_auth(files, [X, Y])
    tls = MqttTls(pki / "ca.pem", pki / "server.pem", pki / "server.key")
    broker = start_mosquitto(free_port(), tmp_path, auth=files, tls=tls)

    def tls_client(cn: str | None) -> Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        if cn is None:
            c.tls_set(ca_certs=str(pki / "ca.pem"))
        else:
            c.tls_set(ca_certs=str(pki / "ca.pem"), certfile=str(pki / f"{cn}.pem"),
                      keyfile=str(pki / f"{cn}.key"))  # fmt: skip
        rec = Client(c)
        c.on_connect = lambda _c, _u, _f, rc, _p: (rec.connack.append(rc), rec.connected.set())
        c.on_subscribe = lambda _c, _u, _m, codes, _p: (rec.suback.append(codes), rec.subscribed.set())

        def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
            with rec.got:
                rec.messages.append(msg)
                rec.got.notify_all()

        def on_disconnect(*_a: object) -> None:
            rec.disconnects += 1
            rec.gone.set()
            rec.connected.set()

        c.on_message, c.on_disconnect = on_message, on_disconnect
        try:
            c.connect(broker.host, broker.port)
        except OSError:  # the TLS handshake itself was refused
            rec.gone.set()
            return rec
        c.loop_start()
        assert rec.connected.wait(WAIT)
        return rec

    try:
        anonymous = tls_client(None)  # TLS without a client certificate
        assert anonymous.gone.is_set() and not anonymous.connack
        anonymous.close()
        bridge, x = tls_client(BRIDGE_USER), tls_client("gw-x")
        assert not bridge.connack[0].is_failure and not x.connack[0].is_failure
        assert not bridge.subscribe(READINGS_SUBSCRIPTION)[0].is_failure
        assert x.subscribe("#")[0].is_failure
        x.attempt(readings_topic(Y.supplier, Y.site, Y.gateway), b"forged")
        x.close()
        x = tls_client("gw-x")
        own = readings_topic(X.supplier, X.site, X.gateway)
        x.publish(own, b"marker")
        bridge.wait_for(own, b"marker")
        assert [m.payload for m in bridge.messages] == [b"marker"]
        x.close()
        bridge.close()
    finally:
        broker.stop()
