"""Running a long-lived asyncio service: logging, signal handling, graceful stop, and the backoff
with which services wait for a dependency to come back."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import signal
import time
from collections.abc import Awaitable, Callable


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def tune_gc() -> None:
    """Make the cyclic garbage collector run rarely and skip everything loaded at startup.

    A service builds and drops objects by the thousand per message (a batch validates into a
    thousand readings, the writer turns them into rows) and they hold no cycles, so reference
    counting frees them. With the default threshold the collector ran several times per message
    and took a third of the bridge's CPU (py-spy --native during ``scopemeter bench ingest``).
    Cycles are still collected, just less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run_service(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` until it returns; SIGTERM/SIGINT set ``stop`` so it can flush and exit."""
    tune_gc()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())
    return 0


class Stopped(Exception):
    """The service was asked to stop while it waited for a dependency to come back."""


class Backoff:
    """Capped exponential backoff between attempts to reach a dependency, with bounded logging.

    Delays double from ``first`` up to ``cap`` seconds (with a little jitter so that several
    processes do not knock in step). Each failure is logged with its cause: the first at once,
    then at most one line per ``log_every`` seconds, counting the failures in between, so a long
    outage does not flood the journal."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        first: float = 0.5,
        cap: float = 30.0,
        log_every: float = 30.0,
    ) -> None:
        self.what = what
        self.log = logger
        self.first = first
        self.cap = cap
        self.log_every = log_every
        self.failures = 0
        self._since = 0.0  # monotonic time of the first failure in this run of failures
        self._logged_at = -math.inf
        self._unlogged = 0

    def failed(self, cause: BaseException) -> float:
        """Count a failure and log it (rate-bounded); returns the seconds to wait before retrying."""
        now = time.monotonic()
        if self.failures == 0:
            self._since = now
        self.failures += 1
        growth = 2.0 ** min(self.failures - 1, 30)
        delay: float = min(self.cap, self.first * growth) * random.uniform(0.8, 1.0)
        if now - self._logged_at >= self.log_every:
            more = f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
            self.log.warning(
                "%s failed (attempt %d, down %.0f s): %s; retrying in %.1f s%s",
                self.what, self.failures, now - self._since, _cause(cause), delay, more,
            )  # fmt: skip
            self._logged_at, self._unlogged = now, 0
        else:
            self._unlogged += 1
        return delay

    def succeeded(self) -> None:
        if self.failures:
            self.log.warning(
                "%s is back after %d failed attempts over %.0f s",
                self.what, self.failures, time.monotonic() - self._since,
            )  # fmt: skip
        self.failures, self._unlogged, self._logged_at = 0, 0, -math.inf


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``; raise :class:`Stopped` as soon as ``stop`` is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return
    raise Stopped
