"""Database bootstrap: create the database if missing and apply versioned SQL migrations.

Migrations are the files ``ingest/migrations/NNNN_name.sql``, applied in order, each in its own
transaction, recorded with a checksum in ``schema_migrations``. An advisory lock makes concurrent
``migrate`` calls (several processes starting at once) safe.

``0002_readings.sql`` picks the storage path of ``readings`` once (TimescaleDB hypertable or native
monthly partitions, see ``ingest/storage.py``); ``storage`` chooses it explicitly.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ops.errors import UserError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STORAGE_CHOICES = ("auto", "timescaledb", "native")
_LOCK_KEY = 0x5C0BE  # arbitrary, constant: the migration advisory lock


class MigrationError(UserError):
    """A migration cannot be applied; the message says why (the CLI prints it as one line)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        head, _, name = path.stem.partition("_")
        if not head.isdigit():
            raise MigrationError(f"migration file name must start with a number: {path.name}")
        found.append(Migration(int(head), name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {directory}")
    return found


def ensure_database(dsn: str, admin_dsn: str) -> bool:
    """Create the database named in ``dsn`` if it does not exist; True when it was created."""
    dbname = conninfo_to_dict(dsn).get("dbname")
    if not dbname:
        raise MigrationError(f"no database name in DSN {dsn!r}")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if exists:
            return False
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(dbname))))
        return True


def drop_database(dbname: str, admin_dsn: str, attempts: int = 20) -> None:
    """Drop ``dbname``, ending its sessions. A role that is not superuser (the project's own) may not
    end an autovacuum worker busy in that database, so that refusal is waited out and retried."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
    for attempt in range(1, attempts + 1):
        try:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(statement)
            return
        except psycopg.errors.InsufficientPrivilege:
            if attempt == attempts:
                raise
            time.sleep(0.5)


def migrate(dsn: str, *, storage: str | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied now.

    ``storage`` (auto | timescaledb | native) sets the GUC ``scopemeter.storage`` that 0002 reads;
    None leaves it to the server's setting (default auto). The path is chosen once: asking for
    another one on a database that already has ``readings`` is an error, not a silent no-op.
    """
    if storage is not None and storage not in STORAGE_CHOICES:
        raise MigrationError(f"storage must be one of {', '.join(STORAGE_CHOICES)}, not {storage!r}")
    applied_now: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            if storage is not None:
                conn.execute("SELECT set_config('scopemeter.storage', %s, false)", (storage,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {v: c for v, c in conn.execute("SELECT version, checksum FROM schema_migrations")}
            for m in load_migrations():
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise MigrationError(
                            f"migration {m.version}_{m.name} changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(m.sql.encode())
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (m.version, m.name, m.checksum),
                        )
                except psycopg.Error as exc:  # rolled back; say which migration and why, with the hint
                    hint = f" ({exc.diag.message_hint})" if exc.diag.message_hint else ""
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise MigrationError(f"migration {m.version}_{m.name} failed: {first}{hint}") from exc
                applied_now.append(m.version)
            if storage in ("timescaledb", "native"):
                row = conn.execute("SELECT backend FROM scopemeter_storage").fetchone()
                if row is not None and row[0] != storage:
                    raise MigrationError(
                        f"readings are already stored with {row[0]}; the storage path is chosen once, "
                        f"at the first migration (asked for {storage})"
                    )
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
