"""Daemon processes the stack (and the tests) start themselves: spawn detached, pid files, ports.

Stdlib only. A ``ManagedProcess`` is a handle on one daemon: ``stop()`` (SIGTERM, then SIGKILL),
``kill()`` (SIGKILL, for chaos tests). Brokers are told apart from other programs on a port by a
protocol probe (an MQTT CONNECT, a Kafka ApiVersions request), so ``stack up`` never mistakes an
unrelated listener for the broker it wanted.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ops.errors import UserError

# Children spawned by this interpreter, so that stopping them by pid also reaps them (no zombies,
# no "subprocess still running" warnings) when the caller is a long-lived process such as pytest.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class PortState(Enum):
    CLOSED = "closed"  # nothing accepts connections
    SPEAKS = "speaks"  # a server that speaks the expected protocol
    OTHER = "other"  # something listens but does not answer like the expected server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; racy only against other pickers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float, proc: ManagedProcess | None = None) -> bool:
    """Wait until ``host:port`` accepts connections; False on timeout or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return True
        if proc is not None and not proc.alive():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def wait_port_closed(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while port_open(host, port, timeout=0.2):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def probe_mqtt(host: str, port: int, timeout: float = 2.0) -> PortState:
    """Send an MQTT 3.1.1 CONNECT (clean session, empty client id); any CONNACK means a broker."""
    connect = bytes([0x10, 12]) + b"\x00\x04MQTT" + bytes([4, 0x02, 0, 10]) + b"\x00\x00"
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(connect)
            reply = _recv_exact(s, 4)
            if len(reply) == 4 and reply[0] == 0x20 and reply[1] == 2:
                with contextlib.suppress(OSError):
                    s.sendall(b"\xe0\x00")  # DISCONNECT
                return PortState.SPEAKS
            return PortState.OTHER
    except ConnectionRefusedError:
        return PortState.CLOSED
    except OSError:
        return PortState.OTHER if port_open(host, port) else PortState.CLOSED


def probe_kafka(host: str, port: int, timeout: float = 2.0) -> PortState:
    """Send a Kafka ApiVersions v0 request; a response with our correlation id means a broker."""
    correlation = 0x5C0BE
    client_id = b"scopemeter-probe"
    body = struct.pack(">hhih", 18, 0, correlation, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 8)
            if len(head) == 8:
                size, got = struct.unpack(">ii", head)
                if 4 <= size < 1 << 20 and got == correlation:
                    return PortState.SPEAKS
            return PortState.OTHER
    except ConnectionRefusedError:
        return PortState.CLOSED
    except OSError:
        return PortState.OTHER if port_open(host, port) else PortState.CLOSED


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead; our own zombie children are reaped)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: trust kill(0)
    return fields[0] not in ("Z", "X")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): the state first, then the
    rest in order; None when there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _proc_pids() -> Iterator[Path]:
    """Every /proc/PID directory."""
    return (entry for entry in Path("/proc").iterdir() if entry.name.isdigit())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (0 when it is gone or there is no /proc)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the command: state is field 3, utime and stime are fields 14 and 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_named(comm: str) -> list[int]:
    """Pids whose executable name (/proc/PID/comm) is ``comm``, e.g. every ``postgres`` backend."""
    found = []
    for entry in _proc_pids():
        try:
            if (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0, 0.0
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def listener_pid(port: int) -> int | None:
    """The local process listening on TCP ``port`` (any address), found through /proc; None when
    the listener is remote, invisible to this user, or there is no /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in _proc_pids():
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def last_log_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log (ANSI colours removed), for one-line error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in tail.splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


@dataclass
class ManagedProcess:
    """A daemon we started (or found through its pid file)."""

    name: str
    pid: int
    host: str
    port: int
    log_path: Path
    pid_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _forget(self) -> None:
        _CHILDREN.pop(self.pid, None)
        if self.pid_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.pid_path.read_text().strip() == str(self.pid):
                    self.pid_path.unlink()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (brokers flush their persistence), then SIGKILL after ``timeout`` seconds."""
        if self.alive():
            self._signal(signal.SIGTERM)
            if not self._wait(timeout):
                self._signal(signal.SIGKILL)
                self._wait(5.0)
        self._forget()

    def kill(self) -> None:
        """SIGKILL now — a crash, as chaos tests want it. Waits until the process is gone."""
        if self.alive():
            self._signal(signal.SIGKILL)
            self._wait(5.0)
        self._forget()

    @classmethod
    def from_pid_file(
        cls, name: str, pid_path: Path, host: str, port: int, log_path: Path, expect_in_cmdline: str
    ) -> ManagedProcess | None:
        """The live process a pid file names, or None (a stale pid file is removed).

        ``expect_in_cmdline`` guards against a recycled pid: the process must still be our binary.
        """
        try:
            pid = int(pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        cmdline = pid_cmdline(pid)
        if not pid_alive(pid) or (cmdline and expect_in_cmdline not in cmdline):
            with contextlib.suppress(FileNotFoundError):
                pid_path.unlink()
            return None
        return cls(name, pid, host, port, log_path, pid_path, _CHILDREN.get(pid))


def launch(
    name: str,
    argv: Sequence[str],
    *,
    host: str,
    port: int,
    log_path: Path,
    pid_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """Start ``argv`` detached (own session, output appended to ``log_path``); do not wait.

    Raises UserError when the port is already taken or the program cannot be run."""
    if port_open(host, port):
        raise UserError(f"{name}: cannot start, {host}:{port} is already in use by another process")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # survives the CLI that started it, and its Ctrl-C
            )
        except OSError as exc:
            raise UserError(f"{name}: cannot run {argv[0]}: {exc.strerror or exc}") from exc
    _CHILDREN[popen.pid] = popen
    proc = ManagedProcess(name, popen.pid, host, port, log_path, pid_path, popen)
    if pid_path is not None:
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{popen.pid}\n")
    return proc


def wait_listening(proc: ManagedProcess, timeout: float) -> None:
    """Wait until ``proc`` listens on its port; raise UserError naming the piece, the reason and the
    log (and stop it) when it exits first or does not answer within ``timeout``."""
    host, port = proc.host, proc.port
    answered = wait_port(host, port, timeout, proc)
    if answered:
        time.sleep(0.1)  # a process that lost a bind race may answer via the other owner, then die
    if not answered or not proc.alive():
        if proc.alive():
            proc.kill()
            reason = f"did not listen on {host}:{port} within {timeout:g}s"
        else:
            code = proc.popen.returncode if proc.popen is not None else "?"
            proc._forget()
            reason = f"exited with code {code} before listening on {host}:{port}"
        last = last_log_line(proc.log_path)
        detail = f" ({last})" if last else ""
        raise UserError(f"{proc.name}: {reason}{detail}; log: {proc.log_path}")


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    host: str,
    port: int,
    log_path: Path,
    pid_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> ManagedProcess:
    """:func:`launch`, then :func:`wait_listening`."""
    proc = launch(name, argv, host=host, port=port, log_path=log_path, pid_path=pid_path, cwd=cwd, env=env)
    wait_listening(proc, timeout)
    return proc
