"""A virtual null-modem cable: two real serial devices (pseudo-terminals) wired to each other.

``NullModem()`` opens two pty pairs and copies bytes between their master sides in a thread, so
whatever one program writes to ``.ports[0]`` another program reads from ``.ports[1]`` and back --
both ends are ordinary tty devices (``/dev/pts/N``) opened with pyserial and configured with
termios like a USB-RS485 adapter.  This is what ``socat pty,raw pty,raw`` does, without socat:
tests and the demo can serve Modbus RTU on one end and poll it on the other.  Baud rate, parity
and stop bits are accepted by a pty and have no effect on the bytes; Linux ptys refuse parity
and 7 data bits (EINVAL), so use 8N1 or 8N2 here.

``corrupt(n)`` is line noise: one bit of each of the next ``n`` chunks sent from ``ports[0]`` to
``ports[1]`` is flipped, so a Modbus master on ``ports[1]`` sees bad CRCs.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import threading
import tty


class NullModem:
    """Two connected serial device paths; ``close()`` (or the context manager) unplugs the cable."""

    def __init__(self) -> None:
        self._pairs = [pty.openpty() for _ in range(2)]
        for _master, slave in self._pairs:
            tty.setraw(slave)  # no echo or line editing until the real user opens and configures it
        self.ports: tuple[str, str] = (os.ttyname(self._pairs[0][1]), os.ttyname(self._pairs[1][1]))
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._corrupt = 0
        self.corrupted = 0  # chunks damaged so far
        self._thread = threading.Thread(target=self._relay, name="nullmodem", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        a, b = self._pairs[0][0], self._pairs[1][0]
        peer = {a: b, b: a}
        while True:
            ready, _, _ = select.select([a, b, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the far side was closed; the cable stays plugged in
                    continue
                if data and fd == a:
                    data = self._damage(data)
                if data:
                    os.write(peer[fd], data)

    def corrupt(self, chunks: int) -> None:
        with self._lock:
            self._corrupt += chunks

    def _damage(self, data: bytes) -> bytes:
        with self._lock:
            if self._corrupt <= 0:
                return data
            self._corrupt -= 1
            self.corrupted += 1
        return data[:-1] + bytes([data[-1] ^ 0x01])

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (self._wake_r, self._wake_w, *(fd for pair in self._pairs for fd in pair)):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> NullModem:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
