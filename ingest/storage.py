"""What storage path ``readings`` took (TimescaleDB or native partitions), and its retention.

The path is chosen once by ``ingest/migrations/0002_readings.sql`` and recorded in the
``scopemeter_storage`` row; this module reads it back for ``scopemeter db info`` and runs
``scopemeter_apply_retention()`` for ``scopemeter db retention`` (needed on the native path, where
no background job drops old months; on TimescaleDB the retention policy does it on its own).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from ops.errors import UserError


@dataclass(frozen=True)
class StorageInfo:
    backend: str  # timescaledb | native
    chunk_interval: str  # hypertable chunk or native partition width, as PostgreSQL prints it
    compress_after: str | None  # None: never compressed
    retain_for: str | None  # None: kept forever
    parts: int  # chunks (TimescaleDB) or monthly partitions (native) that exist now
    timescaledb_version: str | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)  # TimescaleDB policy jobs on readings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_info(conn: psycopg.Connection[Any]) -> StorageInfo:
    """Read the recorded storage path of ``readings``; UserError when the database is not migrated."""
    row = None
    if _has_table(conn, "scopemeter_storage"):
        row = conn.execute(
            "SELECT backend, chunk_interval::text, compress_after::text, retain_for::text"
            " FROM scopemeter_storage"
        ).fetchone()
    if row is None:
        raise UserError("the database has no scopemeter_storage row: run `scopemeter db migrate` first")
    backend, chunk, compress, retain = row
    if backend == "timescaledb":
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        parts = conn.execute(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'readings'"
        ).fetchone()
        jobs = conn.execute(
            "SELECT job_id, proc_name, schedule_interval::text, config::text"
            " FROM timescaledb_information.jobs WHERE hypertable_name = 'readings' ORDER BY job_id"
        ).fetchall()
        return StorageInfo(
            backend,
            chunk,
            compress,
            retain,
            parts=int(parts[0]) if parts else 0,
            timescaledb_version=version[0] if version else None,
            jobs=[{"job_id": j, "proc_name": p, "schedule_interval": s, "config": c} for j, p, s, c in jobs],
        )
    parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass").fetchone()
    return StorageInfo(backend, chunk, compress, retain, parts=int(parts[0]) if parts else 0)


def apply_retention(conn: psycopg.Connection[Any], as_of: datetime | None = None) -> int:
    """Drop readings older than the retention horizon before ``as_of`` (default now); returns the
    number of monthly partitions or chunks dropped. Commits."""
    with conn.transaction():
        row = conn.execute("SELECT scopemeter_apply_retention(coalesce(%s, now()))", (as_of,)).fetchone()
    return int(row[0]) if row else 0


def _has_table(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])
