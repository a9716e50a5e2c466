"""The TimescaleDB storage path, executed on a real TimescaleDB 2.23: the PGlite WASM build from npm
(ops/timescale, installed by ``make services``), served over the wire protocol on a free port.

What the WASM build cannot do: it is a single process, so TimescaleDB's background workers never
run and the compression and retention policies are not executed on their schedule. The tests run
those same policy jobs in the foreground with ``CALL run_job(id)``. It also serves one connection
at a time (a second one queues until the first closes), so each test holds one connection only.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.db import MigrationError, load_migrations, migrate
from ingest.storage import apply_retention, storage_info
from ops.cli import main as cli_main
from ops.procs import ManagedProcess, free_port, spawn
from ops.settings import REPO_ROOT

SERVER_DIR = REPO_ROOT / "ops" / "timescale"
_INSERT = (
    "INSERT INTO readings (meter_id, quantity, ts, value, site_id, gateway_id, batch_seq)"
    " SELECT m, 'energy_import_kwh', t, v, 'site-1', 'gw-1', 1"
    " FROM unnest(%s::text[], %s::timestamptz[], %s::float8[]) AS u(m, t, v)"
    " ON CONFLICT DO NOTHING"
)


def start_timescale(state_dir: Path) -> ManagedProcess:
    """A fresh in-memory TimescaleDB (PGlite) listening on a free port."""
    node = shutil.which("node")
    if node is None or not (SERVER_DIR / "node_modules" / "@electric-sql" / "pglite-socket").is_dir():
        raise RuntimeError(
            "the TimescaleDB WASM server is not installed: run `make services` (needs node and npm)"
        )
    port = free_port()
    return spawn(
        "timescaledb-wasm",
        [node, str(SERVER_DIR / "server.mjs"), "--port", str(port)],
        host="127.0.0.1",
        port=port,
        log_path=state_dir / "timescale.log",
        cwd=SERVER_DIR,
        timeout=60.0,
    )


def dsn_of(proc: ManagedProcess) -> str:
    # pglite-socket wants a password (any) and does not speak SSL.
    return f"postgresql://postgres:scopemeter@{proc.host}:{proc.port}/postgres?sslmode=disable"


@pytest.fixture(scope="module")
def ts_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The DSN of a TimescaleDB migrated by ``ingest.db.migrate`` with the default (auto) storage."""
    proc = start_timescale(tmp_path_factory.mktemp("timescale"))
    try:
        dsn = dsn_of(proc)
        assert migrate(dsn) == [m.version for m in load_migrations()]
        yield dsn
    finally:
        proc.stop()


def insert(conn: psycopg.Connection[Any], rows: list[tuple[str, datetime, float]]) -> int:
    cur = conn.execute(_INSERT, ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
    return cur.rowcount


def server_now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT date_trunc('hour', now())").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def job_id(conn: psycopg.Connection[Any], proc_name: str) -> int:
    row = conn.execute(
        "SELECT job_id FROM timescaledb_information.jobs"
        " WHERE hypertable_name = 'readings' AND proc_name = %s",
        (proc_name,),
    ).fetchone()
    assert row is not None, f"no {proc_name} job on readings"
    return int(row[0])


def test_native_path_can_be_forced_on_a_timescaledb_server(tmp_path: Path) -> None:
    # First in the module, so that its server (about 0.5 GB) never runs beside the module's one.
    proc = start_timescale(tmp_path)
    try:
        dsn = dsn_of(proc)
        migrate(dsn, storage="native")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert storage_info(conn).backend == "native"
            assert conn.execute(
                "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
            ).fetchone() == (0,)
            assert conn.execute(
                "SELECT relkind FROM pg_class WHERE oid = 'readings'::regclass"
            ).fetchone() == ("p",)
            now = server_now(conn)
            assert conn.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (now, now)).fetchone() == (1,)
            assert insert(conn, [("m1", now, 1.0), ("m1", now, 2.0)]) == 1
    finally:
        proc.stop()


def test_auto_migration_makes_readings_a_compressed_hypertable_with_policies(ts_dsn: str) -> None:
    with psycopg.connect(ts_dsn, autocommit=True) as conn:
        info = storage_info(conn)
        assert (info.backend, info.chunk_interval, info.compress_after, info.retain_for) == (
            "timescaledb",
            "1 day",
            "45 days",
            "10 years",
        )
        assert info.timescaledb_version is not None and info.timescaledb_version.startswith("2.23")
        assert conn.execute(
            "SELECT hypertable_name, primary_dimension, compression_enabled"
            " FROM timescaledb_information.hypertables"
        ).fetchall() == [("readings", "ts", True)]
        assert conn.execute(
            "SELECT column_name, time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_name = 'readings'"
        ).fetchall() == [("ts", timedelta(days=1))]
        assert conn.execute(
            "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc"
            " FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'readings' ORDER BY attname"
        ).fetchall() == [("meter_id", 1, None, None), ("quantity", 2, None, None), ("ts", None, 1, True)]
        jobs = {j["proc_name"]: json.loads(j["config"]) for j in info.jobs}
        assert jobs == {
            "policy_compression": {"hypertable_id": 1, "compress_after": "45 days"},
            "policy_retention": {"hypertable_id": 1, "drop_after": "10 years"},
        }
        key = conn.execute(
            "SELECT array_agg(a.attname ORDER BY k.i) FROM pg_index x"
            " CROSS JOIN unnest(x.indkey) WITH ORDINALITY AS k(attnum, i)"
            " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum"
            " WHERE x.indrelid = 'readings'::regclass AND x.indisprimary"
        ).fetchone()
        assert key == (["meter_id", "quantity", "ts"],)
        now = server_now(conn)
        assert conn.execute(
            "SELECT scopemeter_ensure_partitions(%s, %s)", (now - timedelta(days=90), now)
        ).fetchone() == (0,)
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'readings'::regclass").fetchone() == (
            "r",
        )
    assert migrate(ts_dsn) == []  # versioned: nothing applied twice
    with pytest.raises(MigrationError, match="already stored with timescaledb"):
        migrate(ts_dsn, storage="native")


def test_duplicates_are_dropped_in_plain_and_compressed_chunks(ts_dsn: str) -> None:
    meter = f"dedupe-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ts_dsn, autocommit=True) as conn:
        now = server_now(conn)
        old = [(meter, now - timedelta(days=100, minutes=15 * i), float(i)) for i in range(8)]  # 2 chunks
        recent = [(meter, now - timedelta(days=1, minutes=15 * i), float(10 + i)) for i in range(4)]
        assert insert(conn, old + recent) == 12
        assert insert(conn, old + recent) == 0  # a replay of the same rows

        # The compression policy (45 days) compresses the old chunks, not the recent one.
        conn.execute("CALL run_job(%s)", (job_id(conn, "policy_compression"),))
        compressed = conn.execute(
            "SELECT c.is_compressed, count(*) FROM readings r"
            " JOIN timescaledb_information.chunks c"
            " ON c.chunk_schema || '.' || c.chunk_name = r.tableoid::regclass::text"
            " WHERE r.meter_id = %s GROUP BY 1",
            (meter,),
        ).fetchall()
        assert dict(compressed) == {True: 8, False: 4}

        # A replay into compressed and plain chunks, plus one new row in each: only the new rows land.
        replay = [(m, t, v + 1000) for m, t, v in old + recent]
        new = [(meter, now - timedelta(days=100, minutes=1), 50.0), (meter, now - timedelta(minutes=1), 51.0)]
        assert insert(conn, replay + new) == 2
        assert conn.execute(
            "SELECT count(*), sum(value) FROM readings WHERE meter_id = %s", (meter,)
        ).fetchone() == (14, sum(v for _, _, v in old + recent + new))


def test_retention_policy_and_function_drop_old_chunks(ts_dsn: str) -> None:
    meter = f"retain-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ts_dsn, autocommit=True) as conn:
        now = server_now(conn)
        rows = [(meter, now - timedelta(days=d), float(d)) for d in (800, 500, 30, 1)]
        assert insert(conn, rows) == 4

        conn.execute("SELECT scopemeter_set_storage_policy('60 days', '1 year')")
        info = storage_info(conn)
        assert (info.compress_after, info.retain_for) == ("60 days", "1 year")
        assert {j["proc_name"]: json.loads(j["config"]) for j in info.jobs} == {
            "policy_compression": {"hypertable_id": 1, "compress_after": "60 days"},
            "policy_retention": {"hypertable_id": 1, "drop_after": "1 year"},
        }
        # The retention policy job drops the chunks older than a year.
        conn.execute("CALL run_job(%s)", (job_id(conn, "policy_retention"),))
        kept = conn.execute("SELECT array_agg(value ORDER BY ts) FROM readings WHERE meter_id = %s", (meter,))
        assert kept.fetchone() == ([30.0, 1.0],)
        # scopemeter_apply_retention runs the same drop now, for any reference time.
        assert apply_retention(conn, as_of=now + timedelta(days=365 - 10)) >= 1
        kept = conn.execute("SELECT array_agg(value ORDER BY ts) FROM readings WHERE meter_id = %s", (meter,))
        assert kept.fetchone() == ([1.0],)

        conn.execute("SELECT scopemeter_set_storage_policy(NULL, NULL)")  # never compress, keep forever
        assert storage_info(conn).jobs == []
        assert apply_retention(conn, as_of=now + timedelta(days=10_000)) == 0
        conn.execute("SELECT scopemeter_set_storage_policy('45 days', '10 years')")  # back to the defaults


def test_db_info_cli_reports_the_timescaledb_path(
    ts_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOPEMETER_DB__DSN", ts_dsn)
    assert cli_main(["db", "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "timescaledb" and info["timescaledb_version"].startswith("2.23")
    assert sorted(j["proc_name"] for j in info["jobs"]) == ["policy_compression", "policy_retention"]
