"""The gateway's durable outbox: every batch is on disk before it is published, and leaves only
when the broker has acknowledged it (PUBACK).  A crash or power cut at any point loses nothing;
pending batches are re-sent after restart (downstream drops the duplicates by reading identity).

SQLite in WAL mode with ``synchronous=FULL``: a committed batch survives power loss.  The
per-gateway sequence number is persisted separately from the rows, so it keeps increasing even
when the outbox is empty or rows were dropped.

Bounded: past ``max_batches`` unacknowledged batches the oldest are evicted, counted (here and in
``scopemeter_edge_outbox_evicted_*``) and logged -- never silently.  Readings the gateway must
not send (implausible timestamps) go to the ``quarantine`` table of the same file, with a reason,
for a person to look at.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge import metrics
from edge.wire import Batch

log = logging.getLogger("scopemeter.edge.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,
    payload    BLOB    NOT NULL,
    n_readings INTEGER NOT NULL,
    created    REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id         INTEGER PRIMARY KEY,
    reason     TEXT    NOT NULL,
    readings   TEXT    NOT NULL,
    n_readings INTEGER NOT NULL,
    created    REAL    NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    seq: int
    payload: bytes
    n_readings: int


class OutboxError(RuntimeError):
    pass


class Outbox:
    """One gateway's outbox file.  Use from one thread (the agent's event loop)."""

    def __init__(self, path: Path, gateway: str, *, max_batches: int = 100_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_batches = max_batches
        self.dropped_batches = 0
        self.dropped_readings = 0
        self._db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._tx():
            row = self._db.execute("SELECT value FROM meta WHERE key='gateway'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('gateway', ?)", (gateway,))
                self._db.execute("INSERT INTO meta VALUES ('next_seq', '0')")
            elif row[0] != gateway:
                # Sequence numbers are per gateway: sharing a file would corrupt both streams.
                raise OutboxError(f"{path} belongs to gateway {row[0]!r}, not {gateway!r}")

    def _tx(self) -> _Tx:
        """``with self._tx():`` runs the block in one IMMEDIATE transaction."""
        return _Tx(self._db)

    def next_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        return int(row[0])

    def enqueue(self, build: Callable[[int], Batch]) -> Batch:
        """Assign the next sequence number, build the batch with it and store it, atomically."""
        with self._tx():
            seq = self.next_seq()
            batch = build(seq)
            if batch.seq != seq:
                raise OutboxError(f"batch built with seq {batch.seq}, expected {seq}")
            self._db.execute(
                "INSERT INTO outbox (seq, payload, n_readings, created) VALUES (?, ?, ?, ?)",
                (seq, batch.encode(), len(batch.readings), time.time()),
            )
            self._db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(seq + 1),))
            self._enforce_bound()
        return batch

    def _enforce_bound(self) -> None:
        excess = self.count() - self.max_batches
        if excess <= 0:
            return
        rows = self._db.execute(
            "SELECT seq, n_readings FROM outbox ORDER BY seq LIMIT ?", (excess,)
        ).fetchall()
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
        self.dropped_batches += len(rows)
        self.dropped_readings += sum(n for _, n in rows)
        metrics.EDGE_OUTBOX_EVICTED_BATCHES.inc(len(rows))
        metrics.EDGE_OUTBOX_EVICTED_READINGS.inc(sum(n for _, n in rows))
        log.warning("outbox full: dropped %d oldest batches (up to seq %d)", len(rows), rows[-1][0])

    def pending(self, *, after: int = -1, limit: int | None = None) -> list[Pending]:
        """Unacknowledged batches with seq > ``after``, oldest first."""
        rows = self._db.execute(
            "SELECT seq, payload, n_readings FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, -1 if limit is None else limit),
        ).fetchall()
        return [Pending(seq, bytes(payload), n) for seq, payload, n in rows]

    def ack(self, seq: int) -> bool:
        """Forget an acknowledged batch; False if it was not there (already acked or dropped)."""
        with self._tx():
            cur = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        return cur.rowcount > 0

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def oldest_age_s(self, now: float | None = None) -> float:
        """Wall seconds the oldest unacknowledged batch has waited (0 when empty)."""
        row = self._db.execute("SELECT min(created) FROM outbox").fetchone()
        return 0.0 if row[0] is None else max(0.0, (now or time.time()) - float(row[0]))

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def quarantine(self, reason: str, readings: list[dict[str, object]]) -> None:
        """Keep readings that must not be sent, with why; they are counted, never published."""
        with self._tx():
            self._db.execute(
                "INSERT INTO quarantine (reason, readings, n_readings, created) VALUES (?, ?, ?, ?)",
                (reason, json.dumps(readings, default=str), len(readings), time.time()),
            )
        metrics.EDGE_QUARANTINED_READINGS.labels(reason).inc(len(readings))

    def quarantined(self) -> dict[str, int]:
        """Quarantined readings by reason."""
        rows = self._db.execute("SELECT reason, sum(n_readings) FROM quarantine GROUP BY reason")
        return {reason: int(n) for reason, n in rows}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
