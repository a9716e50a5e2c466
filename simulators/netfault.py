"""A fault-injecting TCP proxy: put it between the edge agent and the broker to simulate outages.

``FaultProxy`` listens on ``listen`` and pipes every connection to ``upstream``.  ``cut()`` is a
broker outage as the gateway sees it: every open connection is dropped at once (both sides see
the socket close, whatever was in flight is lost) and the listening socket is closed, so new
connections are refused.  ``restore()`` listens again on the same port.  ``outages()`` runs a
schedule (down after S seconds, for S seconds, optionally repeated); ``scopemeter sim
broker-outage`` runs it as a process.  Only the standard library: no broker-specific behaviour.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("scopemeter.sim.netfault")


class FaultProxy:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.listen = listen
        self.upstream = upstream
        self.port = listen[1]  # the bound port once started (listen port 0: any free port)
        self.connections = 0  # accepted and connected upstream, ever
        self.dropped = 0  # connections cut by outages, ever
        self.outages = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen (again); returns once new connections are accepted."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.listen[0], self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> int:
        """Refuse new connections and drop every open one; returns how many were dropped."""
        self.outages += 1
        dropped = await self._close()
        self.dropped += dropped
        return dropped

    async def _close(self) -> int:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        dropped = 0
        for writer in list(self._open):
            dropped += 1
            writer.transport.abort()  # RST, no graceful close: like a dead link or broker
        self._open.clear()
        return dropped // 2  # two sockets (agent side, broker side) per connection

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self._close()  # every pipe sees its sockets closed and ends
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def outage_schedule(
        self,
        down_after_s: float,
        down_for_s: float,
        *,
        repeat: int = 1,
        on_event: Callable[[str, int], None] | None = None,
    ) -> None:
        """``repeat`` times: wait ``down_after_s`` (up), then cut for ``down_for_s``, then restore."""
        for _ in range(repeat):
            await asyncio.sleep(down_after_s)
            dropped = await self.cut()
            if on_event is not None:
                on_event("down", dropped)
            await asyncio.sleep(down_for_s)
            await self.restore()
            if on_event is not None:
                on_event("up", 0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.warning("upstream %s:%d: %s", *self.upstream, exc)
            client_w.transport.abort()
            return
        if self._server is None:  # cut while connecting upstream
            client_w.transport.abort()
            up_w.transport.abort()
            return
        self.connections += 1
        self._open.update((client_w, up_w))
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))
        finally:
            self._tasks.discard(task)
            for w in (client_w, up_w):
                self._open.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()  # one side gone: the other goes too


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)
