"""``scopemeter stack up|status|down`` against real processes: temp state dir, free ports."""

from __future__ import annotations

import argparse
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ops import commands, stack
from ops.errors import UserError
from ops.procs import ManagedProcess, free_port, pid_alive, port_open
from ops.settings import DbSettings, KafkaSettings, MqttSettings, Settings, StackSettings


@pytest.fixture
def stack_settings(tmp_path: Path, pg_admin_dsn: str) -> Iterator[Settings]:
    """Settings for a private stack: own ports, own state dir, own database; torn down after."""
    from psycopg.conninfo import make_conninfo

    from ingest.db import drop_database

    dbname = f"scopemeter_stack_{uuid.uuid4().hex[:8]}"
    s = Settings(
        mqtt=MqttSettings(port=free_port()),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", partitions=3),
        db=DbSettings(dsn=make_conninfo(pg_admin_dsn, dbname=dbname), admin_dsn=pg_admin_dsn),
        stack=StackSettings(
            state_dir=tmp_path / "state", start_timeout=20, kafka_controller_port=free_port()
        ),
    )
    yield s
    stack.down(s)
    drop_database(dbname, pg_admin_dsn)


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scopemeter")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def test_up_status_down(stack_settings: Settings) -> None:
    s = stack_settings
    first = stack.up(s)
    assert first.ok, first.table()
    assert first.started == ["mosquitto", "kafka"]
    assert sorted(first.topics_created) == sorted(
        [s.kafka.readings_topic, s.kafka.dlq_topic, s.kafka.committed_topic]
    )
    assert first.migrations_applied  # a fresh database got the schema
    state = s.stack.state_dir
    for name, home in (("mosquitto", state), ("kafka", state / "kafka")):
        piece = first.piece(name)
        assert piece.started_by_stack and piece.pid and pid_alive(piece.pid)
        assert (home / f"{name}.pid").read_text().strip() == str(piece.pid)
        assert (home / f"{name}.log").exists()
    assert (state / "kafka" / "data" / "meta.properties").exists()  # the log directory is on disk
    assert first.piece("mosquitto").port == s.mqtt.port
    assert (state / "mosquitto.conf").exists()

    with psycopg.connect(s.db.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (
            len(first.migrations_applied),
        )

    # up again: nothing restarted, nothing recreated
    second = stack.up(s)
    assert second.ok
    assert second.started == [] and second.topics_created == [] and second.migrations_applied == []
    assert second.piece("mosquitto").pid == first.piece("mosquitto").pid
    assert second.piece("kafka").pid == first.piece("kafka").pid

    # the topics have the configured partition count
    async def partitions() -> dict[str, int]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([s.kafka.readings_topic, s.kafka.dlq_topic])
        finally:
            await admin.close()
        return {t["topic"]: len(t["partitions"]) for t in described}

    import asyncio

    assert set(asyncio.run(partitions()).values()) == {3}

    stopped = stack.down(s)
    assert sorted(stopped) == ["kafka", "mosquitto"]
    after = stack.status(s)
    assert not after.piece("mosquitto").reachable and not after.piece("kafka").reachable
    assert after.piece("postgresql").reachable  # a system service: down leaves it alone
    assert not (state / "mosquitto.pid").exists() and not (state / "kafka" / "kafka.pid").exists()
    assert not pid_alive(first.piece("mosquitto").pid or 0)
    assert stack.down(s) == []  # down twice is fine

    # up after down: Kafka restarts on its log directory, so the topics are still there
    third = stack.up(s)
    assert third.started == ["mosquitto", "kafka"] and third.topics_created == []
    assert stack.down(s) == ["mosquitto", "kafka"]


def test_cli_up_status_down(stack_settings: Settings, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    s = stack_settings
    monkeypatch.setenv("SCOPEMETER_MQTT__PORT", str(s.mqtt.port))
    monkeypatch.setenv("SCOPEMETER_KAFKA__BOOTSTRAP", s.kafka.bootstrap)
    monkeypatch.setenv("SCOPEMETER_DB__DSN", s.db.dsn)
    monkeypatch.setenv("SCOPEMETER_DB__ADMIN_DSN", s.db.admin_dsn)
    monkeypatch.setenv("SCOPEMETER_STACK__STATE_DIR", str(s.stack.state_dir))
    monkeypatch.setenv("SCOPEMETER_STACK__KAFKA_CONTROLLER_PORT", str(s.stack.kafka_controller_port))

    assert _run_cli(["stack", "status"]) == 1  # not everything is reachable yet
    assert _run_cli(["stack", "up"]) == 0
    out = capsys.readouterr().out
    assert "started: mosquitto, kafka" in out
    assert _run_cli(["stack", "status"]) == 0
    table = capsys.readouterr().out
    assert f"127.0.0.1:{s.mqtt.port}" in table and "stack" in table
    assert _run_cli(["stack", "down"]) == 0
    assert "stopped: mosquitto, kafka" in capsys.readouterr().out


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port held by something that accepts connections and never answers (not a broker)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_up_refuses_port_held_by_non_broker(stack_settings: Settings, silent_listener: int) -> None:
    s = stack_settings.model_copy(update={"mqtt": MqttSettings(port=silent_listener)})
    with pytest.raises(UserError, match=rf"mosquitto: port 127.0.0.1:{silent_listener} .* not speak MQTT"):
        stack.up(s)
    s = stack_settings.model_copy(update={"kafka": KafkaSettings(bootstrap=f"127.0.0.1:{silent_listener}")})
    with pytest.raises(UserError, match=rf"kafka: port 127.0.0.1:{silent_listener} .* does not speak Kafka"):
        stack.up(s)


def test_up_uses_an_external_broker_without_owning_it(
    stack_settings: Settings, mosquitto: ManagedProcess
) -> None:
    s = stack_settings.model_copy(update={"mqtt": MqttSettings(port=mosquitto.port)})
    result = stack.up(s)
    assert result.started == ["kafka"]
    assert result.piece("mosquitto").reachable and not result.piece("mosquitto").started_by_stack
    assert stack.down(s) == ["kafka"]
    assert mosquitto.alive()


def test_missing_binaries_say_how_to_install(stack_settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    s = stack_settings.model_copy(
        update={"stack": StackSettings(state_dir=tmp_path / "st", mosquitto_bin=missing)}
    )
    with pytest.raises(UserError, match=r"mosquitto: .* not an executable"):
        stack.up(s)
    from ops.kafka_broker import start_kafka

    with pytest.raises(UserError, match=r"kafka: .* \(SCOPEMETER_STACK__JAVA_BIN\) is not an executable"):
        start_kafka(free_port(), tmp_path, controller_port=free_port(), java_bin=missing)


def test_broker_that_dies_at_start_names_piece_reason_and_log(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        stack.start_mosquitto(free_port(), tmp_path, extra_conf="this_is_not_an_option 1")
    msg = str(info.value)
    assert msg.startswith("mosquitto: exited with code")
    assert str(tmp_path / "mosquitto.log") in msg
    assert "\n" not in msg
    assert not (tmp_path / "mosquitto.pid").exists()


def test_postgres_unreachable_is_a_clear_error(stack_settings: Settings) -> None:
    dead = f"postgresql://scopemeter:scopemeter@127.0.0.1:{free_port()}/postgres"
    s = stack_settings.model_copy(update={"db": DbSettings(dsn=dead, admin_dsn=dead)})
    with pytest.raises(UserError, match=r"postgresql: not reachable at 127.0.0.1:\d+"):
        stack.up(s, timeout=2)
    assert not port_open(s.mqtt.host, s.mqtt.port)  # nothing started before the failure


def test_stopped_debian_cluster_is_started_with_pg_ctlcluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: pg_lsclusters lists a stopped cluster on the DSN's port; ``up`` starts it the
    Debian way and waits for it (the real cluster of this machine is never touched)."""
    import subprocess

    calls: list[list[str]] = []
    answers = iter(["connection refused", "connection refused", None])

    def fake_run(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        out = "15  main    5432 down   postgres /var/lib/postgresql/15/main /var/log/pg.log\n"
        return subprocess.CompletedProcess(argv, 0, stdout=out if argv[0] == "pg_lsclusters" else "")

    monkeypatch.setattr("ops.stack.shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr("ops.stack.subprocess.run", fake_run)
    monkeypatch.setattr("ops.stack._pg_error", lambda dsn, timeout=3.0: next(answers))
    local = "postgresql://scopemeter:scopemeter@127.0.0.1:5432/postgres"
    assert stack.ensure_postgres(Settings(db=DbSettings(dsn=local, admin_dsn=local)), timeout=5) is True
    assert calls[-1] == ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"]
