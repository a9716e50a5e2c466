"""What the chaos tests share: a supervisor that restarts killed services, a steady MQTT load, and
exact counts of what reached the DB."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psycopg

from ingest.loadgen import LoadGenerator
from ops.pipeline import _Proc

WAIT = 45.0


class Supervised:
    """A ``scopemeter`` sub-process started again whenever it exits, like a systemd service."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env, self.log_dir = name, args, env, log_dir
        self.starts = 0
        self.exits: list[int] = []  # exit codes the watcher saw (it restarted each)
        self.kills: list[int] = []  # exit codes of the instances kill() ended
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.proc = self._start()
        self._watch = threading.Thread(target=self._watcher, daemon=True)
        self._watch.start()

    def _start(self) -> _Proc:
        self.starts += 1
        return _Proc(f"{self.name}-{self.starts}", self.args, self.env, self.log_dir)

    def _watcher(self) -> None:
        while not self._stopping.wait(0.1):
            with self._lock:
                code = self.proc.popen.poll()
                if code is not None and not self._stopping.is_set():
                    self.exits.append(code)
                    self.proc.stop()
                    self.proc = self._start()

    def kill(self) -> None:
        """SIGKILL the running instance and start the next one, as the watcher would."""
        with self._lock:
            assert self.proc.popen.poll() is None, f"{self.name} was not running when killed"
            self.proc.popen.kill()
            self.kills.append(self.proc.popen.wait())
            self.proc.stop()  # closes its log
            self.proc = self._start()

    def stop(self) -> None:
        self._stopping.set()
        self._watch.join()
        self.proc.stop()


def until(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Load:
    """Publishes a round (one batch per gateway) every ``pause`` seconds while not paused."""

    def __init__(self, gen: LoadGenerator, base: datetime, pause: float) -> None:
        self.gen, self.base, self.pause = gen, base, pause
        self.running = threading.Event()
        self.running.set()
        self._done = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()
        self._thread.start()

    def _run(self) -> None:
        step = self.gen.steps * self.gen.spacing
        while not self._done.is_set():
            if not self.running.is_set():
                self._idle.set()
                time.sleep(0.05)
                continue
            self._idle.clear()
            with self._lock:
                self.gen.publish_round(self.base + len(self.gen.rounds) * step)
            time.sleep(self.pause)

    def published(self) -> int:
        with self._lock:
            return self.gen.total

    def hold(self) -> None:
        """Pause and return once no round is being published."""
        self.running.clear()
        until("the load to pause", self._idle.is_set, 10)

    def stop(self) -> None:
        self.hold()
        self._done.set()
        self._thread.join()


def db_rows(dsn: str, prefix: str) -> list[tuple[str, datetime, float]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT meter_id, ts, value FROM readings WHERE meter_id LIKE %s ORDER BY 1, 2", (prefix + "-%",)
        ).fetchall()


def db_count(dsn: str, prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        query = "SELECT count(*) FROM readings WHERE meter_id LIKE %s"
        row = conn.execute(query, (prefix + "-%",)).fetchone()
    return int(row[0]) if row else 0
