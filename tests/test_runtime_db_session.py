"""ops.db_session.Reconnecting and ops.runtime.Backoff: a refused PostgreSQL port (a real refusal:
nothing listens there) keeps the work waiting with the DB marked down, until the service stops;
backoff doubles up to its cap and logs a long outage at a bounded rate."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from ops.db_session import Reconnecting
from ops.metrics import Health
from ops.procs import free_port
from ops.runtime import Backoff, Stopped


def test_work_waits_for_a_refusing_database_until_the_service_stops() -> None:
    dsn = f"postgresql://scopemeter@127.0.0.1:{free_port()}/scopemeter"
    health = Health("db")
    ran: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        db: Reconnecting[psycopg.Connection[tuple[object, ...]]] = Reconnecting(
            lambda: psycopg.connect(dsn, connect_timeout=5), psycopg.Connection.close,
            lambda c: None, stop=stop, health=health, max_delay=0.2,
        )  # fmt: skip
        work = asyncio.create_task(db.run(lambda conn: ran.append(1)))
        while db.backoff.failures < 3:  # it keeps trying
            assert not work.done()
            await asyncio.sleep(0.05)
        stop.set()
        with pytest.raises(Stopped):
            await work

    asyncio.run(scenario())
    assert ran == []  # the work never ran without a connection
    healthy, state = health.report()
    assert not healthy and "refused" in state["db"], state


def test_backoff_doubles_to_its_cap_and_logs_a_long_outage_once(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.backoff")
    backoff = Backoff("PostgreSQL", log, first=0.5, cap=4.0, log_every=3600)
    with caplog.at_level(logging.WARNING, logger="test.backoff"):
        delays = [backoff.failed(OSError(f"refused {i}")) for i in range(8)]
        backoff.succeeded()
    nominal = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(0.8 * n <= d <= n for d, n in zip(delays, nominal, strict=True)), delays
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # the first failure with its cause, then the recovery
    assert "OSError: refused 0" in lines[0] and "attempt 1" in lines[0]
    assert "back after 8 failed attempts" in lines[1]
    assert backoff.failures == 0
