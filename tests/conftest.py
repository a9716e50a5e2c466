"""Fixtures shared by the whole suite: real brokers and a real database, one of each per session.

- ``mosquitto``: the project's Mosquitto (ops/mosquitto/ config) on a free port, in a temp dir.
  A ``ops.procs.ManagedProcess`` (``.host``, ``.port``, ``.pid``, ``.log_path``).
- ``kafka``: an Apache Kafka broker (KRaft, one node, log directory in a temp dir) on a free port;
  a ``ManagedProcess``.
- ``pg_db``: the DSN (str) of a fresh, uniquely named, migrated database on the local
  PostgreSQL; dropped at the end of the session.
- ``pg_admin_dsn``: the admin DSN (str) those databases are created with.
- ``settings``: an ``ops.settings.Settings`` pointing at those three, with a temp state dir.
  Session-wide and shared: derive a variant with ``settings.model_copy(update=...)`` (or
  ``model_copy(deep=True)``) instead of mutating it.

They are session-scoped, so tests sharing them must use their own topics, MQTT client ids and
rows (e.g. unique names via ``uuid4().hex``). A test that kills or restarts a broker starts its
own with ``ops.stack.start_mosquitto`` / ``ops.kafka_broker.start_kafka`` instead of touching these.
PostgreSQL must already run on the admin DSN (``make services``); the brokers need the mosquitto
binary, Java 17 and Maven (Kafka's jars are fetched once into the cache, ops/kafka/).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings

from ops.procs import ManagedProcess, free_port
from ops.settings import DbSettings, KafkaSettings, MqttSettings, Settings, StackSettings

# Property tests report a failure within seconds (issue 17): no deadline (a loaded 2-core machine
# would make it flaky) and no explain phase, which re-runs the failing example line by line and took
# minutes, up to the 300 s test timeout. Tests keep their own max_examples; shrinking stays on.
hypothesis_settings.register_profile(
    "scopemeter",
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    print_blob=True,
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "scopemeter"))

# The admin DSN of the PostgreSQL the tests create their databases in.
PG_ADMIN_DSN = os.environ.get("SCOPEMETER_DB__ADMIN_DSN", DbSettings().admin_dsn)


def _dsn_for(dbname: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(PG_ADMIN_DSN, dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    """The admin DSN (``SCOPEMETER_DB__ADMIN_DSN`` or the default) tests create databases with."""
    return PG_ADMIN_DSN


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    from ops.stack import start_mosquitto

    proc = start_mosquitto(free_port(), tmp_path_factory.mktemp("mosquitto"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    from ops.kafka_broker import start_kafka

    proc = start_kafka(free_port(), tmp_path_factory.mktemp("kafka"), controller_port=free_port())
    yield proc
    proc.stop(30.0)


@pytest.fixture(scope="session")
def pg_db() -> Iterator[str]:
    from ingest.db import drop_database, ensure_database, migrate

    name = f"scopemeter_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn = _dsn_for(name)
    ensure_database(dsn, PG_ADMIN_DSN)
    try:
        migrate(dsn)
        yield dsn
    finally:
        drop_database(name, PG_ADMIN_DSN)


@pytest.fixture(scope="session")
def settings(
    mosquitto: ManagedProcess, kafka: ManagedProcess, pg_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    state_dir: Path = tmp_path_factory.mktemp("state")
    return Settings(
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port),
        kafka=KafkaSettings(bootstrap=f"{kafka.host}:{kafka.port}"),
        db=DbSettings(dsn=pg_db, admin_dsn=PG_ADMIN_DSN),
        stack=StackSettings(state_dir=state_dir),
    )
