"""RTU details at their edges (edge.rtu): the inter-frame silence against the Modbus serial-line
specification's own numbers, the serial port opened with exactly the configured framing, and the
exception response's fields. Written to kill the mutants ``make mutate`` found alive (issue 17).

Source: MODBUS over Serial Line Specification and Implementation Guide V1.02 (modbus.org, 2006),
§2.5.1.1: frames are separated by a silence of at least 3.5 character times; a character is 11 bits
in RTU mode (start, 8 data, parity, stop — or 2 stop bits without parity); above 19200 baud a fixed
1.750 ms is used for t3.5."""

from __future__ import annotations

import pytest

from edge.rtu import ExceptionResponse, SerialLine, char_silence_s
from tests.test_edge_rtu import NullModem


def test_silence_is_three_and_a_half_characters_up_to_19200_baud() -> None:
    assert char_silence_s(9600, 8, "E", 1) == pytest.approx(3.5 * 11 / 9600)  # 4.01 ms
    assert char_silence_s(9600, 8, "N", 2) == pytest.approx(3.5 * 11 / 9600)
    assert char_silence_s(9600) == pytest.approx(3.5 * 10 / 9600)  # 8N1: 10 bits, as some devices use
    assert char_silence_s(19200, 8, "E", 1) == pytest.approx(3.5 * 11 / 19200)  # 2.005 ms
    assert char_silence_s(4800, 7, "O", 1) == pytest.approx(3.5 * 10 / 4800)


def test_silence_is_fixed_at_1_75_ms_above_19200_baud() -> None:
    assert char_silence_s(38400, 8, "E", 1) == 0.00175
    assert char_silence_s(115200) == 0.00175
    assert char_silence_s(19201, 8, "E", 2) == 0.00175


def test_the_serial_port_is_opened_with_the_configured_framing() -> None:
    with NullModem() as modem:
        line = SerialLine(modem.ports[1], 9600, "E", 2, 7)
        try:
            s = line.ser
            assert (s.port, s.baudrate, s.parity, s.stopbits, s.bytesize) == (modem.ports[1], 9600, "E", 2, 7)
            assert s.timeout == 0
        finally:
            line.close()


def test_a_port_that_cannot_be_opened_is_named() -> None:
    with pytest.raises(OSError, match=r"^cannot open /dev/scopemeter-no-such-tty: "):
        SerialLine("/dev/scopemeter-no-such-tty", 9600, "N", 1, 8)


def test_an_exception_response_says_its_code() -> None:
    e = ExceptionResponse(2)
    assert (str(e), e.code, e.kind) == ("exception response code 2", 2, "exception_2")
