"""``make mutate`` must not leave brokers behind: a process a mutation run orphaned (its parent gone,
adopted by init, as a test's Kafka is when mutmut kills the test) is killed while the run goes on;
the run's processes that still have a parent are left alone until the run ends; nothing of another
run is touched."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid

from ops.mutate import RUN_TAG, reap
from ops.procs import pid_alive

# A parent that starts a sleeper in its own session (as ops.procs.spawn starts a broker), prints its
# pid, and either waits (the sleeper keeps its parent) or exits (the sleeper is orphaned).
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
if sys.argv[1] == "wait":
    time.sleep(120)
"""


def _sleeper(run_id: str, parent: str) -> tuple[int, subprocess.Popen[str]]:
    env = dict(os.environ, **{RUN_TAG: run_id})
    argv = [sys.executable, "-c", PARENT, parent]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    if parent == "exit":
        proc.wait(10)
        for _ in range(100):  # until init has adopted it
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == "1":
                    break
            time.sleep(0.05)
    return pid, proc


def _gone(pid: int) -> bool:
    for _ in range(100):
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_orphans_of_the_run_are_killed_and_nothing_else() -> None:
    run, other = uuid.uuid4().hex, uuid.uuid4().hex
    orphan, _ = _sleeper(run, "exit")
    adopted_elsewhere, _ = _sleeper(other, "exit")
    kept, parent = _sleeper(run, "wait")
    try:
        assert reap(run, orphans_only=True) == [orphan]
        assert _gone(orphan)
        assert pid_alive(kept) and pid_alive(adopted_elsewhere)
        assert sorted(reap(run, orphans_only=False)) == sorted([kept, parent.pid])
        assert _gone(kept)
        assert pid_alive(adopted_elsewhere)
    finally:
        for pid in (orphan, adopted_elsewhere, kept, parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        parent.wait(10)
