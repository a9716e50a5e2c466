"""Running a long-lived asyncio service: logging, signal handling and graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
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
