"""``stack up`` starts a closed Mosquitto whose users come from the fleet registry."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.registry import register_gateway
from ops import stack
from ops.mqtt_auth import BRIDGE_USER
from ops.procs import free_port
from ops.settings import DbSettings, KafkaSettings, MqttSettings, Settings, StackSettings


@pytest.fixture
def private(tmp_path: Path, pg_admin_dsn: str) -> Iterator[Settings]:
    from psycopg.conninfo import make_conninfo

    from ingest.db import drop_database

    dbname = f"scopemeter_trust_{uuid.uuid4().hex[:8]}"
    s = Settings(
        mqtt=MqttSettings(port=free_port()),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", partitions=1),
        db=DbSettings(dsn=make_conninfo(pg_admin_dsn, dbname=dbname), admin_dsn=pg_admin_dsn),
        stack=StackSettings(
            state_dir=tmp_path / "state", start_timeout=20, kafka_controller_port=free_port()
        ),
    )
    yield s
    stack.down(s)
    drop_database(dbname, pg_admin_dsn)


def _connack(s: Settings, user: str | None, password: str | None) -> int:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:6]}")
    if user is not None:
        client.username_pw_set(user, password)
    try:
        client.connect(s.mqtt.host, s.mqtt.port)
        result: list[int] = []
        client.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc.value)
        while not result:
            client.loop(1.0)
        return result[0]
    finally:
        client.disconnect()


def test_stack_up_closes_the_broker_and_admits_the_registered(private: Settings) -> None:
    stack.up(private)  # creates the database: the fleet comes after, as with `fleet apply`
    assert _connack(private, None, None) == 135  # anonymous: "Not authorized" (paho maps 3.1.1 code 5)
    bridge = stack.client_settings(private, BRIDGE_USER)
    assert _connack(private, bridge.mqtt.username, bridge.mqtt.password) == 0
    with psycopg.connect(private.db.dsn, autocommit=True) as conn:
        register_gateway(conn, "sup-s", "site-s", "gw-s", ["m-s"])
    assert stack.client_settings(private, "gw-s").mqtt.username is None  # not a user yet
    result = stack.up(private)  # again: the running broker learns the new gateway
    assert "mosquitto" not in result.started
    gw = stack.client_settings(private, "gw-s")
    assert _connack(private, gw.mqtt.username, gw.mqtt.password) == 0
