"""RTU framing byte by byte (edge.rtu.RtuMaster): the request it sends and every way a reply can be
refused, against a scripted peer on a real loopback TCP socket (a transparent converter) that sends
exactly the bytes a test gives it. Nothing here waits for a long timeout, so ``make mutate`` runs
these first and most mutants of edge/rtu.py die in milliseconds (issue 17); the slower end-to-end
cases stay in tests/test_edge_rtu.py.

Sources, computed independently of edge.rtu:
* MODBUS over Serial Line Specification and Implementation Guide V1.02 (modbus.org, 2006), §2.5.1.2
  (RTU frame: address, function, data, CRC low byte first) and §6.2.2 (CRC generation), whose worked
  example is the frame ``02 07`` with CRC 0x1241, sent as ``41 12``.
* MODBUS Application Protocol Specification V1.1b3 (modbus.org, 2012), §6.3/§6.4 (read holding /
  input registers: request unit, function, start address, quantity, big-endian; response byte
  count = 2 x quantity) and §7 (exception response: function code + 0x80, one exception code).
* Every other CRC below is computed by pymodbus's table-driven ``FramerRTU.compute_CRC`` (pymodbus
  3.16), a separate implementation, which returns the two CRC bytes in wire order.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pymodbus.framer.rtu import FramerRTU

from edge.rtu import (
    BadReply,
    ExceptionResponse,
    ModbusTimeout,
    RtuMaster,
    SerialLine,
    TcpLine,
    crc16,
    with_crc,
)

SILENCE_S = 0.005  # the master's inter-frame silence in these tests (short: nothing here is slow)
TIMEOUT_S = 0.5  # a reply arrives within milliseconds; only a silent peer makes the master wait it


def wire(hex_frame: str) -> bytes:
    """A frame written as hex, CRC appended by pymodbus (independent of edge.rtu)."""
    body = bytes.fromhex(hex_frame)
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


# A reply is a list of (pause before, bytes) chunks sent one after another; None: no answer;
# "close": the peer closes the connection.
Reply = list[tuple[float, bytes]] | str | None


class Peer:
    """The other end of the line: for each 8-byte request it receives, sends the next scripted
    reply. ``junk`` is sent as soon as the master connects (noise waiting on the line)."""

    def __init__(self, replies: list[Reply], junk: bytes = b"") -> None:
        self.replies = list(replies)
        self.junk = junk
        self.requests: list[bytes] = []
        self.arrivals: list[float] = []  # monotonic time each request arrived
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.junk:
                conn.sendall(self.junk)
            buf = b""
            while True:
                try:
                    chunk = conn.recv(256)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 8:
                    self.requests.append(buf[:8])
                    self.arrivals.append(time.monotonic())
                    buf = buf[8:]
                    reply = self.replies.pop(0) if self.replies else None
                    if reply is None:
                        continue
                    if reply == "close":
                        return
                    assert not isinstance(reply, str)
                    for pause, data in reply:
                        if pause:
                            time.sleep(pause)
                        conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def line() -> Iterator[list[Peer]]:
    peers: list[Peer] = []
    yield peers
    for p in peers:
        p.close()


def master(
    peers: list[Peer], replies: list[Reply], junk: bytes = b"", silence_s: float = SILENCE_S
) -> tuple[Peer, RtuMaster]:
    peer = Peer(replies, junk)
    peers.append(peer)
    return peer, RtuMaster(TcpLine("127.0.0.1", peer.port, 1.0), silence_s)


def now(data: bytes) -> Reply:
    return [(0.0, data)]


# --- CRC and request frames --------------------------------------------------------------------


def test_crc_is_the_specifications_worked_example() -> None:
    assert crc16(b"\x02\x07") == 0x1241
    assert with_crc(b"\x02\x07") == b"\x02\x07\x41\x12"  # low byte first


def test_crc_agrees_with_an_independent_implementation() -> None:
    rng = random.Random(17)
    frames = [b"", b"\x00", b"\xff", bytes(range(256))] + [
        rng.randbytes(rng.randrange(1, 40)) for _ in range(200)
    ]
    for f in frames:
        assert with_crc(f) == f + FramerRTU.compute_CRC(f).to_bytes(2, "big"), f.hex()


def test_the_request_is_unit_function_address_count_big_endian_then_crc(line: list[Peer]) -> None:
    peer, m = master(line, [now(wire("0103020102")), now(wire("11040400010002"))])
    try:
        assert m.read_registers(1, 3, 0x0000, 1, TIMEOUT_S) == [0x0102]
        assert m.read_registers(0x11, 4, 0x006B, 2, TIMEOUT_S) == [0x0001, 0x0002]
    finally:
        m.close()
    # 01 03 0000 0001 84 0A and 11 04 006B 0002 (CRC by pymodbus)
    assert peer.requests == [bytes.fromhex("010300000001840a"), wire("1104006B0002")]


# --- replies that answer the request -----------------------------------------------------------


def test_registers_are_decoded_big_endian_in_order(line: list[Peer]) -> None:
    _, m = master(line, [now(wire("03040806AB0000FFFF8001")), now(wire("0703021234"))])
    try:
        assert m.read_registers(3, 4, 0x10, 4, TIMEOUT_S) == [0x06AB, 0x0000, 0xFFFF, 0x8001]
        assert m.read_registers(7, 3, 0x10, 1, TIMEOUT_S) == [0x1234]
        assert m.discarded_bytes == 0
    finally:
        m.close()


def test_a_reply_in_several_pieces_is_put_together(line: list[Peer]) -> None:
    """A converter may forward a frame in pieces; the master reads on until the frame is whole."""
    whole = wire("01040400010002")
    pieces = [(0.0, whole[:1]), (0.03, whole[1:4]), (0.03, whole[4:6]), (0.03, whole[6:])]
    _, m = master(line, [pieces])
    try:
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [1, 2]
    finally:
        m.close()


# --- replies that do not answer the request ----------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (wire("02040400010002"), "reply from unit 2 function 0x04 to a request to unit 1 function 0x04"),
        (wire("01030400010002"), "reply from unit 1 function 0x03 to a request to unit 1 function 0x04"),
        # An exception response from another unit, or to another function, is not ours either.
        (wire("028402"), "reply from unit 2 function 0x84 to a request to unit 1 function 0x04"),
        (wire("018302"), "reply from unit 1 function 0x83 to a request to unit 1 function 0x04"),
        (wire("0104020001"), "byte count 2, requested 2 registers (4 bytes)"),
        (wire("010406000100020003"), "byte count 6, requested 2 registers (4 bytes)"),
        (wire("01040400010002")[:-1] + b"\x00", "CRC mismatch"),
        (wire("01040400010003")[:-2] + wire("01040400010002")[-2:], "CRC mismatch"),
        (wire("018402")[:-1] + b"\x00", "CRC mismatch"),
    ],
)
def test_a_reply_that_does_not_answer_is_refused_with_its_reason(
    line: list[Peer], reply: bytes, message: str
) -> None:
    _, m = master(line, [now(reply), now(wire("01040400070008"))])
    try:
        with pytest.raises(BadReply) as err:
            m.read_registers(1, 4, 0, 2, TIMEOUT_S)
        assert str(err.value) == message and err.value.kind == "bad_reply"
        # The line is usable again: the next request gets its own reply.
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [7, 8]
    finally:
        m.close()


def test_an_exception_response_gives_its_code(line: list[Peer]) -> None:
    _, m = master(line, [now(wire("018402")), now(wire("0283" + "04"))])
    try:
        with pytest.raises(ExceptionResponse) as err:
            m.read_registers(1, 4, 0, 2, TIMEOUT_S)
        assert (err.value.code, err.value.kind) == (2, "exception_2")
        with pytest.raises(ExceptionResponse) as err:
            m.read_registers(2, 3, 0, 2, TIMEOUT_S)
        assert (err.value.code, err.value.kind) == (4, "exception_4")
    finally:
        m.close()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (wire("01040400010002")[:2], "incomplete frame (0 of 1 bytes)"),  # unit and function only
        (wire("01040400010002")[:5], "incomplete frame (2 of 6 bytes)"),  # cut inside the data
        (wire("018402")[:3], "incomplete frame (1 of 3 bytes)"),  # exception cut before its CRC
    ],
)
def test_a_frame_cut_short_is_incomplete_not_a_timeout(line: list[Peer], reply: bytes, message: str) -> None:
    _, m = master(line, [now(reply)])
    try:
        with pytest.raises(BadReply) as err:
            m.read_registers(1, 4, 0, 2, 0.1)
        assert str(err.value) == message
    finally:
        m.close()


def test_no_answer_at_all_is_a_timeout(line: list[Peer]) -> None:
    _, m = master(line, [None])
    try:
        with pytest.raises(ModbusTimeout) as err:
            m.read_registers(1, 4, 0, 2, 0.05, guard_s=0.01)
        assert (str(err.value), err.value.kind) == ("no reply within the timeout", "timeout")
    finally:
        m.close()


def test_a_stale_frame_followed_by_the_real_one_is_refused_as_a_whole(line: list[Peer]) -> None:
    """The first 9 bytes are a well-formed reply of the right shape; 9 more follow at once."""
    stale, real = wire("01040400010002"), wire("01040400030004")
    _, m = master(line, [now(stale + real), now(wire("01040400050006"))])
    try:
        with pytest.raises(BadReply) as err:
            m.read_registers(1, 4, 0, 2, TIMEOUT_S)
        assert str(err.value) == "9 more bytes followed the reply: a stale frame on the line"
        assert m.discarded_bytes == 18
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [5, 6]
    finally:
        m.close()


def test_a_stale_frame_behind_a_reply_delivered_in_pieces_is_still_refused(line: list[Peer]) -> None:
    """The master reads exactly the frame's bytes, however they come, and no byte of what follows."""
    stale, real = wire("01040400010002"), wire("01040400030004")
    pieces = [(0.0, stale[:4]), (0.03, stale[4:] + real)]
    _, m = master(line, [pieces])
    try:
        with pytest.raises(BadReply) as err:
            m.read_registers(1, 4, 0, 2, TIMEOUT_S)
        assert str(err.value) == "9 more bytes followed the reply: a stale frame on the line"
        assert m.discarded_bytes == 18
    finally:
        m.close()


# --- the line around a request -----------------------------------------------------------------


def test_bytes_waiting_before_a_request_are_thrown_away_and_counted(line: list[Peer]) -> None:
    """Noise on the line (more than one read's worth) answers no request: dropped, counted."""
    junk = bytes(range(256)) + bytes(44)
    _, m = master(line, [now(wire("01040400010002"))], junk=junk)
    try:
        assert isinstance(m.line, TcpLine)
        while len(m.line.sock.recv(len(junk), socket.MSG_PEEK)) < len(junk):  # all of it arrived
            time.sleep(0.001)
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [1, 2]
        assert m.discarded_bytes == 300
    finally:
        m.close()


def test_the_first_request_waits_the_inter_frame_silence(line: list[Peer]) -> None:
    """Lower bound only: a request never goes out sooner than the silence after the line opened
    (Serial Line V1.02 §2.5.1.1); it may go out later under load."""
    started = time.monotonic()
    peer, m = master(line, [now(wire("01040400010002"))], silence_s=0.1)
    try:
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [1, 2]
    finally:
        m.close()
    assert peer.arrivals[0] - started >= 0.1


def test_a_late_reply_inside_the_guard_is_drained_not_read_as_the_next_reply(line: list[Peer]) -> None:
    """Timeout 0.05 s, the reply comes 0.3 s late, the guard is 1 s: it arrives while the master
    drains, and the next request (same shape) gets its own words."""
    late = [(0.3, wire("01040400010002"))]
    _, m = master(line, [late, now(wire("01040400030004"))])
    try:
        with pytest.raises(ModbusTimeout):
            m.read_registers(1, 4, 0, 2, 0.05, guard_s=1.0)
        assert m.discarded_bytes == 9
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [3, 4]
    finally:
        m.close()


def test_every_thrown_away_byte_is_counted(line: list[Peer]) -> None:
    """A reply with the wrong byte count is refused after its first 3 bytes and its other 8 are
    drained off the line; a stale frame and what follows it are thrown away whole (9 + 9)."""
    wrong = wire("010406000100020003")  # 11 bytes
    stale, real = wire("01040400010002"), wire("01040400030004")
    _, m = master(line, [now(wrong), now(wrong), now(stale + real), now(wire("01040400050006"))])
    try:
        for _ in range(3):
            with pytest.raises(BadReply):
                m.read_registers(1, 4, 0, 2, 0.1)
        assert m.discarded_bytes == 8 + 8 + 18
        assert m.read_registers(1, 4, 0, 2, TIMEOUT_S) == [5, 6]
    finally:
        m.close()


def test_a_request_whose_time_is_up_is_a_timeout_without_made_up_bytes(line: list[Peer]) -> None:
    _, m = master(line, [None])
    try:
        with pytest.raises(ModbusTimeout):
            m.read_registers(1, 4, 0, 2, 0.0, guard_s=0.01)
    finally:
        m.close()


def test_the_real_reply_after_a_refused_one_is_drained_not_read_as_the_next_reply(line: list[Peer]) -> None:
    """Module doc: after a refused reply the line is drained until quiet for the guard. Unit 2's
    late answer comes first (refused: wrong unit), unit 1's own answer 0.1 s later; the next
    request, of the same shape, must get its own words, not the drained ones."""
    refused_then_real = [(0.0, wire("02040400090009")), (0.1, wire("01040400010002"))]
    _, m = master(line, [refused_then_real, [(0.05, wire("01040400030004"))]])
    try:
        with pytest.raises(BadReply, match="reply from unit 2"):
            m.read_registers(1, 4, 0, 2, 0.5, guard_s=0.5)
        assert m.read_registers(1, 4, 0, 2, 0.5) == [3, 4]
    finally:
        m.close()


def test_a_converter_that_accepts_no_connection_is_given_up_after_the_timeout() -> None:
    """Its accept queue is full (backlog 0, one connection waiting), so the kernel drops our SYNs:
    the connect would wait for minutes without its own timeout."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname(), timeout=1.0), pytest.raises(TimeoutError):
            TcpLine("127.0.0.1", full.getsockname()[1], 0.2)


def test_a_serial_line_is_opened_at_the_configured_speed() -> None:
    from simulators.nullmodem import NullModem

    with NullModem() as modem:
        line = SerialLine(modem.ports[1], 19200, "N", 2, 8)
        try:
            assert (line.ser.baudrate, line.ser.parity, line.ser.stopbits, line.ser.bytesize) == (
                19200,
                "N",
                2,
                8,
            )
        finally:
            line.close()


def test_a_converter_that_closes_the_connection_is_a_connection_error(line: list[Peer]) -> None:
    _, m = master(line, ["close"])
    try:
        with pytest.raises(ConnectionError, match=r"^connection closed by the converter$"):
            m.read_registers(1, 4, 0, 2, TIMEOUT_S)
    finally:
        m.close()
