"""End to end through real processes: simulator → edge → Mosquitto → bridge → Kafka → writer →
PostgreSQL → compute, with exact reading counts and energy totals."""

from __future__ import annotations

import contextlib
import math
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from ops.demo import prepare
from ops.pipeline import run_pipeline
from ops.settings import Settings
from ops.stack import ensure_topics

pytestmark = pytest.mark.e2e


@pytest.fixture
def e2e_settings(settings: Settings, pg_admin_dsn: str, tmp_path: Path) -> Iterator[Settings]:
    """Own database, topics and consumer groups, so nothing else in the session can leak in."""
    tag = uuid.uuid4().hex[:8]
    kafka = settings.kafka.model_copy(update={
        "readings_topic": f"e2e-{tag}.readings.v1",
        "dlq_topic": f"e2e-{tag}.readings.dlq.v1",
        "committed_topic": f"e2e-{tag}.readings.committed.v1",
        "writer_group": f"e2e-{tag}-writer",
        "compute_group": f"e2e-{tag}-compute",
    })
    db = settings.db.model_copy(update={"dsn": make_conninfo(pg_admin_dsn, dbname=f"scopemeter_e2e_{tag}")})
    mqtt = settings.mqtt.model_copy(update={"share_group": f"e2e{tag}"})
    stack = settings.stack.model_copy(update={"state_dir": tmp_path / "state"})
    s = settings.model_copy(update={"kafka": kafka, "db": db, "mqtt": mqtt, "stack": stack})
    ensure_topics(s.kafka)
    prepare(s)
    yield s
    from ingest.db import drop_database

    drop_database(f"scopemeter_e2e_{tag}", pg_admin_dsn)


def test_every_reading_once_and_energy_matches_truth(e2e_settings: Settings, tmp_path: Path) -> None:
    # Something else holds the demo's fixed Modbus port (as another demo on a shared machine did):
    # the run serves and polls the meters on a free port of its own.
    with contextlib.ExitStack() as held:
        squatter = held.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # already taken by someone else: the same situation
            squatter.bind(("127.0.0.1", 15020))
            squatter.listen()
        r = run_pipeline(e2e_settings, hours=0.5, speed=240, log_dir=tmp_path / "logs")

    meters, quantities = 4, 3  # config/edge/demo-gateway.toml: 4 SDM630s × import, export, power
    assert r.polls >= 60  # 20 min lead + 30 min window + 10 min tail at one poll a minute
    assert r.readings_produced == r.polls * meters * quantities
    assert r.readings_published == r.readings_produced
    assert r.readings_in_db == r.readings_produced
    assert r.dead_letters == 0

    with psycopg.connect(e2e_settings.db.dsn) as conn:
        # Conservation: the rollups hold exactly the counters' advance over what was read.
        advance = conn.execute(
            "SELECT sum(d) FROM (SELECT max(value) - min(value) AS d FROM readings"
            " WHERE quantity = 'energy_import_kwh' GROUP BY meter_id) t"
        ).fetchone()[0]
        rolled, kg = conn.execute(
            "SELECT sum(kwh), sum(kg_co2e) FROM site_rollups_15m WHERE site_id = 'sz-plant-1'"
        ).fetchone()
        assert conn.execute("SELECT count(DISTINCT meter_id) FROM readings").fetchone()[0] == meters
    assert rolled == pytest.approx(advance, rel=1e-9)
    assert kg == pytest.approx(rolled * 0.5306, rel=1e-9)  # MEE/NBS 2023 national average

    # Against the simulator's exact integral of its load profile, over the full 15-minute buckets.
    assert len(r.buckets) == 2
    assert r.factor_ids == ["cn-mee-stat-2023-national-v1"]
    assert math.isclose(r.kwh, r.truth_kwh, rel_tol=1e-3)
    for b in r.buckets:
        assert math.isclose(b.kwh, b.truth_kwh, rel_tol=1e-2), b
        assert b.kg_co2e == pytest.approx(b.kwh * 0.5306, rel=1e-9)
