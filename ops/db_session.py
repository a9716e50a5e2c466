"""A PostgreSQL connection that outlives the server, for the writer and the compute worker.

When PostgreSQL restarts or refuses connections, the work at hand is retried on a new connection
after a capped exponential backoff, for as long as it takes (or until the service is stopped); the
health endpoint says the DB is down meanwhile. The work must be safe to run again: a transaction
that failed committed nothing, and one whose COMMIT was sent but not acknowledged is repeated
against rows that are already there (the writer's reading key, compute's idempotent recompute).
Callers commit Kafka offsets only after ``run`` returned, so no offset ever passes a row that is
not in the DB.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import psycopg

from ops.metrics import Health
from ops.runtime import Backoff, sleep_unless_stopped

log = logging.getLogger("scopemeter.db")

C = TypeVar("C")  # the connection, or an object owning one
T = TypeVar("T")

# What a lost or refusing server raises: connection refused or dropped, admin shutdown, "the
# database system is starting up", a deadlock given up on. Anything else is a bug and ends the service.
UNAVAILABLE: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)


class Reconnecting(Generic[C]):
    """Runs blocking DB work in a thread on a connection it (re)opens as needed.

    ``open`` makes a connection (or an object holding one), ``close`` drops it, ``ping`` checks it
    while idle. One piece of work or ping runs at a time."""

    def __init__(
        self,
        open: Callable[[], C],
        close: Callable[[C], None],
        ping: Callable[[C], None],
        *,
        stop: asyncio.Event,
        health: Health | None = None,
        max_delay: float = 30.0,
        what: str = "PostgreSQL",
    ) -> None:
        self._open, self._close, self._ping = open, close, ping
        self.stop = stop
        self.health = health
        self.backoff = Backoff(what, log, cap=max_delay)
        self._conn: C | None = None
        self._lock = asyncio.Lock()

    async def run(
        self, work: Callable[[C], T], *, while_waiting: Callable[[], Awaitable[None]] | None = None
    ) -> T:
        """``work(conn)`` in a worker thread, retried on a new connection until it succeeds.

        Raises :class:`ops.runtime.Stopped` if the service is stopped while the DB is away.
        ``while_waiting`` runs before each wait (e.g. a Kafka consumer's keep-alive poll)."""
        async with self._lock:
            while True:
                try:
                    conn = await self._connection()
                    result = await asyncio.to_thread(work, conn)
                except UNAVAILABLE as exc:
                    await self._failed(exc)
                    if while_waiting is not None:
                        await while_waiting()
                    await sleep_unless_stopped(self.stop, self.backoff.failed(exc))
                    continue
                self._healthy()
                return result

    async def ping(self) -> bool:
        """Check the connection while idle (reconnecting if it is gone) so that health follows the
        DB between pieces of work; skipped while work runs. Returns whether the DB answered."""
        if self._lock.locked():
            return True
        async with self._lock:
            try:
                conn = await self._connection()
                await asyncio.to_thread(self._ping, conn)
            except UNAVAILABLE as exc:
                await self._failed(exc)
                self.backoff.failed(exc)  # logged like any failure; the next run waits its turn
                return False
            self._healthy()
            return True

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(self._close_quietly, conn)

    async def _connection(self) -> C:
        if self._conn is None:
            self._conn = await asyncio.to_thread(self._open)
        return self._conn

    async def _failed(self, exc: BaseException) -> None:
        if self.health is not None:
            self.health.down("db", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
        await self.close()

    def _healthy(self) -> None:
        self.backoff.succeeded()
        if self.health is not None:
            self.health.up("db")

    def _close_quietly(self, conn: C) -> None:
        try:
            self._close(conn)
        except Exception as exc:  # closing a dead connection can fail; it is gone either way
            log.debug("closing a failed connection: %s", exc)
