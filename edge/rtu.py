"""A Modbus RTU master that matches every reply to its request.

RTU frames (on a serial line, or tunnelled through a transparent RS-485/Ethernet converter) carry
no transaction id: a reply is only "the next bytes on the line".  A slave that answers after the
master gave up would otherwise have its late answer read as the reply to the next request, with
another register block's words.  So this master:

* checks that each reply's unit id, function code, byte count and CRC match the request, and
  that nothing follows the frame within the inter-frame silence (a stale frame followed by the
  real one is refused as a whole);
* discards whatever is waiting on the line before it sends a request;
* after a timeout or a refused reply, drains the line until it has been quiet for the late-reply
  guard (by default the request timeout), so an answer that comes late is thrown away, and waits
  the Modbus inter-frame silence (3.5 character times, at least 1.75 ms) between frames.

A reply later than timeout + guard to a request whose reply has the same shape as the next one's
cannot be told apart on RTU; the guard is the knob for slow slaves.  The line I/O is blocking
(pyserial or a socket) and runs in a worker thread; each line is used by one poll at a time.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Protocol

log = logging.getLogger("scopemeter.edge.rtu")

MIN_SILENCE_S = 0.00175  # Modbus over serial line V1.02, 2.5.1.1: fixed t3.5 above 19200 baud
TCP_SILENCE_S = 0.02  # a converter's network hop blurs the serial timing: wait longer


class ModbusError(Exception):
    """A failed request; ``kind`` is the error counter's label."""

    kind = "error"


class ModbusTimeout(ModbusError):
    kind = "timeout"


class BadReply(ModbusError):
    """A reply that does not answer the request (or is damaged); it is never decoded."""

    kind = "bad_reply"


class ExceptionResponse(ModbusError):
    def __init__(self, code: int) -> None:
        super().__init__(f"exception response code {code}")
        self.code = code
        self.kind = f"exception_{code}"


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(frame: bytes) -> bytes:
    return frame + struct.pack("<H", crc16(frame))


def char_silence_s(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: int = 1) -> float:
    """The 3.5-character inter-frame silence of a serial line."""
    bits = 1 + bytesize + (parity != "N") + stopbits
    return max(MIN_SILENCE_S, 3.5 * bits / baudrate) if baudrate <= 19200 else MIN_SILENCE_S


class Line(Protocol):
    def read(self, n: int, timeout_s: float) -> bytes:
        """Up to ``n`` bytes, b"" when none came within ``timeout_s``; ConnectionError if closed."""
        ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class TcpLine:
    """RTU frames over a TCP socket (a transparent converter)."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read(self, n: int, timeout_s: float) -> bytes:
        self.sock.settimeout(max(timeout_s, 1e-4))
        try:
            data = self.sock.recv(n)
        except TimeoutError:
            return b""
        if not data:
            raise ConnectionError("connection closed by the converter")
        return data

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class SerialLine:
    """RTU frames on the gateway's own serial port (pyserial)."""

    def __init__(self, port: str, baudrate: int, parity: str, stopbits: int, bytesize: int) -> None:
        import serial  # the edge extra; imported here so TCP-only gateways need not have it

        try:
            self.ser = serial.Serial(
                port, baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=bytesize, timeout=0
            )
        except (serial.SerialException, ValueError) as exc:
            raise OSError(f"cannot open {port}: {exc}") from None

    def read(self, n: int, timeout_s: float) -> bytes:
        self.ser.timeout = max(timeout_s, 0.0)
        data: bytes = self.ser.read(n)
        return data

    def write(self, data: bytes) -> None:
        self.ser.write(data)
        self.ser.flush()

    def close(self) -> None:
        self.ser.close()


class RtuMaster:
    """Register reads over one RTU line, one request at a time."""

    def __init__(self, line: Line, silence_s: float) -> None:
        self.line = line
        self.silence_s = silence_s
        self._quiet_since = time.monotonic()
        self.discarded_bytes = 0  # stale or damaged bytes thrown away (late replies, noise)

    def read_registers(
        self,
        unit: int,
        function: int,
        address: int,
        count: int,
        timeout_s: float,
        guard_s: float | None = None,
    ) -> list[int]:
        """``count`` registers from ``address`` with function 3 or 4; raises a ModbusError."""
        guard = timeout_s if guard_s is None else guard_s
        self._discard()
        wait = self._quiet_since + self.silence_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.line.write(with_crc(struct.pack(">BBHH", unit, function, address, count)))
        try:
            words = self._reply(unit, function, count, time.monotonic() + timeout_s)
        except ModbusError as exc:
            # An exception response is a whole answer; after a timeout or a refused reply our own
            # answer may still be on its way, so it is drained for the guard (module doc).
            self._drain(self.silence_s if isinstance(exc, ExceptionResponse) else max(self.silence_s, guard))
            raise
        self._quiet_since = time.monotonic()
        return words

    def _reply(self, unit: int, function: int, count: int, deadline: float) -> list[int]:
        head = self._exact(2, deadline, first=True)
        if head[0] != unit or head[1] & 0x7F != function:
            raise BadReply(
                f"reply from unit {head[0]} function {head[1]:#04x} to a request to unit "
                f"{unit} function {function:#04x}"
            )
        if head[1] & 0x80:
            rest = self._exact(3, deadline)
            self._check_crc(head + rest)
            raise ExceptionResponse(rest[0])
        size = self._exact(1, deadline)
        if size[0] != 2 * count:
            raise BadReply(f"byte count {size[0]}, requested {count} registers ({2 * count} bytes)")
        body = self._exact(size[0] + 2, deadline)
        frame = head + size + body
        self._check_crc(frame)
        trailing = self.line.read(256, self.silence_s)
        if trailing:
            self.discarded_bytes += len(frame) + len(trailing)
            raise BadReply(f"{len(trailing)} more bytes followed the reply: a stale frame on the line")
        return list(struct.unpack(f">{count}H", body[:-2]))

    def _exact(self, n: int, deadline: float, first: bool = False) -> bytes:
        data = b""
        while len(data) < n:
            remaining = deadline - time.monotonic()
            chunk = self.line.read(n - len(data), remaining) if remaining > 0 else b""
            if not chunk:
                if first and not data:
                    raise ModbusTimeout("no reply within the timeout")
                raise BadReply(f"incomplete frame ({len(data)} of {n} bytes)")
            data += chunk
        return data

    @staticmethod
    def _check_crc(frame: bytes) -> None:
        if crc16(frame[:-2]) != struct.unpack("<H", frame[-2:])[0]:
            raise BadReply("CRC mismatch")

    def _discard(self) -> None:
        """Drop whatever waits on the line before a request: it answers no request of ours."""
        while stale := self.line.read(256, 0):
            self.discarded_bytes += len(stale)

    def _drain(self, quiet_s: float) -> None:
        """Read and drop bytes until the line has been silent for ``quiet_s``."""
        while stale := self.line.read(256, quiet_s):
            self.discarded_bytes += len(stale)
        self._quiet_since = time.monotonic()

    def close(self) -> None:
        self.line.close()
