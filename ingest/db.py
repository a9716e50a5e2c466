"""Database bootstrap: create the database if missing and apply versioned SQL migrations.

Migrations are the files ``ingest/migrations/NNNN_name.sql``, applied in order, each in its own
transaction, recorded with a checksum in ``schema_migrations``. An advisory lock makes concurrent
``migrate`` calls (several processes starting at once) safe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x5C0BE  # arbitrary, constant: the migration advisory lock


class MigrationError(RuntimeError):
    pass


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


def drop_database(dbname: str, admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def migrate(dsn: str) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
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
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                applied_now.append(m.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
