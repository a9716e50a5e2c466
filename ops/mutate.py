"""Mutation testing of the code that decides what is stored, computed or signed (``make mutate``).

Runs mutmut 3 one module at a time, each against only its own fast tests, and prints the kill rate
per module. A mutant that survives is either killed by a new test or listed, with the reason it
cannot change behaviour (or, for import-time code, why mutmut cannot run it), in
``tests/mutation/equivalent.toml``; the rate leaves those out (column "excluded").

Each module runs in its own work directory (``.mutate/<module>/``): a ``pyproject.toml`` whose
``[tool.mutmut]`` names that module and its tests, and links to the project's folders. mutmut keeps
its results there, so a second run only re-tests mutants whose function changed (or every mutant,
when the module's tests changed).

It is slow (minutes per module, the tests run once per mutant), so CI does not run it; its latest
result is in the README. numba kernels are mutated through their Python reference
(``compute/reference.py``); ``NUMBA_DISABLE_JIT=1`` keeps compile time out of every mutant's run.

    python -m ops.mutate                  # every module
    python -m ops.mutate edge/counters.py # one module (or several)
    python -m ops.mutate --list           # the module → tests map
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutate"
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent.toml"
# Wall-clock limit of one test under a mutant; the module's tests each take a few seconds clean.
TEST_TIMEOUT_S = 30
# Environment variable naming a mutation run in every process it starts (see reap), and how often
# the processes it orphaned are looked for while it runs.
RUN_TAG = "MUTATE_RUN_ID"
REAP_EVERY_S = 10.0
# The folders a test run needs (the packages, their data, the tests).
LINKED = ("edge", "ingest", "compute", "ops", "simulators", "config", "tests", "bench")

# module → its fast tests (files or node ids). Only these run against each mutant.
MODULES: dict[str, list[str]] = {
    "edge/counters.py": ["tests/test_edge_counters.py", "tests/test_edge_counters_bounds.py"],
    "edge/modbus.py": [
        "tests/test_edge_modbus_bounds.py", "tests/test_edge_devices_bounds.py", "tests/test_edge_devices.py",
        "tests/test_edge_profiles.py", "tests/test_edge_drivers.py",
        "tests/test_edge_serial.py::test_sdm120_on_a_serial_line_reads_the_truth_and_silence_and_noise_are_counted",
    ],
    "edge/devices.py": [
        "tests/test_edge_devices_bounds.py", "tests/test_edge_devices.py", "tests/test_edge_profiles.py"
    ],
    "edge/rtu.py": [
        "tests/test_edge_rtu_frames.py", "tests/test_edge_rtu_bounds.py", "tests/test_edge_rtu.py"
    ],
    "edge/wire.py": [
        "tests/test_validate.py", "tests/test_validate_bounds.py", "tests/test_edge_counters.py"
    ],
    "ingest/validate.py": ["tests/test_validate.py", "tests/test_validate_bounds.py"],
    "ingest/registry.py": ["tests/test_registry_cache.py", "tests/test_validate.py"],
    "ingest/dlq.py": ["tests/test_validate.py", "tests/test_validate_bounds.py"],
    "ingest/bridge.py": [
        "tests/test_bridge_produce.py", "tests/test_bridge_run.py", "tests/test_bridge_acks.py",
        "tests/test_trust_bridge_kafka_refusal.py",
    ],
    "compute/factors.py": ["tests/test_factors.py", "tests/test_factors_messages.py"],
    "compute/recompute.py": [
        "tests/test_recompute_mut.py", "tests/test_recompute_mut_set.py", "tests/test_compute_recompute.py",
        "tests/test_compute_append.py", "tests/test_compute_fuels.py", "tests/test_compute_fuel_units.py",
        "tests/test_recompute_mut_windows.py",
    ],
    "compute/rebuild.py": [
        "tests/test_compute_rebuild.py",
        "tests/test_recompute_mut.py::test_bulk_load_drops_and_restores_keys",
        "tests/test_recompute_mut.py::test_recompute_uses_the_chosen_factor_series",
        "tests/test_recompute_mut.py::test_rebuild_of_nothing_and_of_unregistered_meters_writes_no_rollups",
        "tests/test_recompute_mut.py::test_rebuild_reports_every_phase",
        "tests/test_recompute_mut.py::test_rebuild_keeps_three_classes_over_two_buckets_apart",
        "tests/test_compute_recompute.py", "tests/test_compute_fuels.py", "tests/test_compute_fuel_units.py",
        "tests/test_compute_market.py::test_incremental_out_of_order_equals_rebuild",
    ],
    "compute/reference.py": ["tests/test_compute_kernels.py", "tests/test_compute_reference.py"],
    "ingest/writer.py": [
        "tests/test_writer_refused.py", "tests/test_writer_store.py", "tests/test_writer_order.py",
        "tests/test_writer_decode.py", "tests/test_writer_loop.py",
    ],
    "compute/market.py": ["tests/test_market_mut.py", "tests/test_compute_market.py"],
    "compute/statements/document.py": [
        "tests/test_statements_mut_document.py", "tests/test_statements_differences.py"
    ],
    "compute/statements/verify.py": ["tests/test_statements_mut_verify.py"],
    "compute/statements/figures.py": [
        "tests/test_statements_mut_figures.py",
        # the one test that states a month's contractual instruments
        "tests/test_statements_market.py::test_gec_lowers_market_scope2_and_sets_renewable_share",
    ],
}


@dataclass
class Outcome:
    module: str
    total: int = 0
    killed: int = 0
    survived: int = 0
    timeout: int = 0
    no_tests: int = 0
    equivalent: int = 0
    pending: int = 0  # not run yet (an interrupted run)
    other: int = 0
    ran: bool = True  # False: no results at all

    @property
    def rate(self) -> float:
        """Killed (a timeout counts: the mutant changed behaviour) over the non-equivalent mutants
        that were run."""
        judged = self.total - self.equivalent - self.pending
        return 100.0 * (self.killed + self.timeout) / judged if judged else 100.0


def equivalents() -> dict[str, str]:
    """Mutant name → why it cannot change observable behaviour."""
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text())
    return {name: str(entry["reason"]) for name, entry in data.items()}


def _work_dir(module: str, tests: list[str]) -> Path:
    work = WORK / module.replace("/", "_").removesuffix(".py")
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pytest_cfg = project["tool"]["pytest"]["ini_options"]
    mutmut_cfg = project["tool"].get("mutmut", {})
    lines = [
        "# generated by ops/mutate.py",
        "[tool.pytest.ini_options]",
        f"testpaths = {json.dumps(pytest_cfg['testpaths'])}",
        f"markers = {json.dumps(pytest_cfg.get('markers', []))}",
        # A mutant that makes a test wait (a refused connection, an ack that never comes) uses no
        # CPU, so mutmut's CPU limit never ends it: pytest-timeout does, and the test fails (killed).
        f"timeout = {TEST_TIMEOUT_S}",
        "",
        "[tool.mutmut]",
        f"source_paths = {json.dumps([module])}",
        f"also_copy = {json.dumps(list(LINKED))}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        f"pytest_add_cli_args = {json.dumps(mutmut_cfg.get('pytest_add_cli_args', []))}",
        f"timeout_multiplier = {mutmut_cfg.get('timeout_multiplier', 5.0)}",
        f"timeout_constant = {mutmut_cfg.get('timeout_constant', 5.0)}",
        "",
    ]
    (work / "pyproject.toml").write_text("\n".join(lines))
    return work


def _tests_digest(tests: list[str]) -> dict[str, str]:
    """Each test file of the module (and the shared fixtures) with the SHA-256 of its text."""
    files = sorted({t.split("::")[0] for t in tests} | {"tests/conftest.py", "tests/helpers.py"})
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest() for f in files}


def run_module(module: str, tests: list[str], children: int, equivalent: dict[str, str]) -> Outcome:
    work = _work_dir(module, tests)
    # mutmut keeps a mutant's result until its function changes; new tests would not be tried on
    # the survivors. So a changed test list, or a changed test file, starts the module afresh.
    stamp, tests_now = work / "tests.json", _tests_digest(tests)
    if not stamp.exists() or json.loads(stamp.read_text()) != tests_now:
        shutil.rmtree(work / "mutants", ignore_errors=True)
    stamp.write_text(json.dumps(tests_now))
    run_id = uuid.uuid4().hex
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONDONTWRITEBYTECODE="1", **{RUN_TAG: run_id})
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    log = work / "mutmut.log"
    with log.open("w") as out:
        run = subprocess.Popen([mutmut, "run", "--max-children", str(children)], cwd=work, env=env,
                               stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            while run.poll() is None:
                reap(run_id, orphans_only=True)
                time.sleep(REAP_EVERY_S)
        finally:
            run.kill()
            run.wait()
            reap(run_id, orphans_only=False)
    return outcome(module, work, equivalent)


def reap(run_id: str, *, orphans_only: bool) -> list[int]:
    """Kill the processes a mutation run left behind; returns their pids.

    A test session starts Kafka and Mosquitto in sessions of their own (``ops.procs.spawn``), so
    when mutmut kills a mutant's run for its time or CPU limit, the brokers live on, adopted by
    init: one run once left twenty 512 MB JVMs. Every process of a run carries ``RUN_TAG`` in its
    environment; while mutmut runs, those adopted by init (parent pid 1) are killed, and when it
    ends, all of them."""
    mark = f"{RUN_TAG}={run_id}".encode()
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
        if orphans_only and ppid != 1:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
    return killed


def outcome(module: str, work: Path, equivalent: dict[str, str]) -> Outcome:
    result = Outcome(module)
    meta = work / "mutants" / (module + ".meta")
    if not meta.exists():
        print(f"{module}: no results (see {work / 'mutmut.log'})", file=sys.stderr)
        result.ran = False
        return result
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    for name, code in codes.items():
        result.total += 1
        if code in (1, 3):
            result.killed += 1
        elif code in (24, -24, 152, 255, 36, -9):
            result.timeout += 1
        elif code == 0 and name in equivalent:
            result.equivalent += 1
        elif code == 0:
            result.survived += 1
        elif code in (5, 33):
            result.no_tests += 1
        elif code is None:
            result.pending += 1
        else:
            result.other += 1
    return result


def survivors(module: str) -> list[str]:
    work = WORK / module.replace("/", "_").removesuffix(".py")
    meta = work / "mutants" / (module + ".meta")
    if not meta.exists():
        return []
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    known = equivalents()
    return sorted(n for n, c in codes.items() if c in (0, 5, 33, None) and n not in known)


def table(rows: list[Outcome]) -> str:
    head = "| module | mutants | killed | timeout | survived | no tests | excluded | not run | kill rate |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = (f"{r.rate:.0f} %" + (" (partial)" if r.pending else "")) if r.ran else "not run"
        lines.append(f"| {r.module} | {r.total} | {r.killed} | {r.timeout} | {r.survived} | {r.no_tests} "
                     f"| {r.equivalent} | {r.pending} | {rate} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: all in MODULES)")
    parser.add_argument("--children", type=int, default=1, help="parallel mutants (default 1)")
    parser.add_argument("--list", action="store_true", help="print the module → tests map")
    parser.add_argument("--report", action="store_true", help="print the last results without running")
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants of the modules")
    args = parser.parse_args(argv)
    chosen = args.modules or list(MODULES)
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        parser.error(f"not in ops/mutate.py MODULES: {', '.join(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m}: {' '.join(MODULES[m])}")
        return 0
    if args.survivors:
        for m in chosen:
            for name in survivors(m):
                print(name)
        return 0
    known = equivalents()
    rows = []
    for module in chosen:
        if args.report:
            work = WORK / module.replace("/", "_").removesuffix(".py")
            rows.append(outcome(module, work, known))
        else:
            print(f"mutating {module} against {' '.join(MODULES[module])}", flush=True)
            rows.append(run_module(module, MODULES[module], args.children, known))
    print(table(rows))
    return 0 if all(r.ran and r.rate >= 90.0 and not r.pending for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
