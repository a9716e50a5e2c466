"""Edge agent footprint: RSS and CPU of a real ``scopemeter edge run`` process polling 100
simulated meters every second (4 Modbus TCP endpoints x 25 units, like 4 RS485 converters),
publishing to a real Mosquitto.  Goal: RSS <= 60 MB.

    .venv/bin/python bench/edge_agent.py [--meters 100] [--seconds 20]

Simulators and broker run in their own processes, so only the agent is measured (from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.progress import Progress

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ops.procs import free_port  # noqa: E402
from ops.stack import start_mosquitto  # noqa: E402

CLI = [sys.executable, "-c", "from ops.cli import main; raise SystemExit(main())"]
ENDPOINTS = 4
TICK = os.sysconf("SC_CLK_TCK")


def sim_file(d: Path, index: int, units: int) -> Path:
    meters = "".join(
        f'[[meters]]\nid = "b{index}-{u}"\nunit_id = {u}\nseed = {u}\n'
        f'[meters.profile]\nkind = "production"\nbase_kw = 10.0\npeak_kw = 50.0\n\n'
        for u in range(1, units + 1)
    )
    path = d / f"sim{index}.toml"
    path.write_text(f'[server]\nhost = "127.0.0.1"\nport = 0\n\n{meters}')
    return path


def gateway_file(d: Path, ports: list[int], units: int, metrics_port: int) -> Path:
    meters = "".join(
        f'[[meters]]\nid = "b{i}-{u}"\nhost = "127.0.0.1"\nport = {port}\nunit_id = {u}\n'
        'model = "eastron_sdm630"\n\n'
        for i, port in enumerate(ports)
        for u in range(1, units + 1)
    )
    path = d / "gateway.toml"
    path.write_text(
        'supplier = "bench"\nsite = "bench-site"\ngateway = "gw-bench"\npoll_interval_s = 1\n'
        f'quantities = ["energy_import_kwh", "energy_export_kwh", "power_w"]\nmetrics_port = {metrics_port}\n'
        f'outbox_path = "{d / "outbox.sqlite"}"\n\n{meters}'
    )
    return path


def proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, RSS bytes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    rss = next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return cpu, rss


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("scopemeter_edge_") and " " in line:
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]  # summed over labels (per-meter series)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meters", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    args = ap.parse_args()
    units = max(1, args.meters // ENDPOINTS)
    procs: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker = start_mosquitto(free_port(), d / "mosquitto")
        try:
            ports = []
            for i in range(ENDPOINTS):
                sim = subprocess.Popen(
                    [*CLI, "sim", "run", str(sim_file(d, i, units))],
                    cwd=REPO,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
                procs.append(sim)
                assert sim.stdout is not None
                ports.append(int(json.loads(sim.stdout.readline())["port"]))
            metrics_port = free_port()
            env = {
                **os.environ,
                "SCOPEMETER_MQTT__PORT": str(broker.port),
                "SCOPEMETER_STACK__STATE_DIR": tmp,
            }
            agent = subprocess.Popen(
                [*CLI, "edge", "run", str(gateway_file(d, ports, units, metrics_port))],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(agent)
            with Progress(transient=True) as progress:
                task = progress.add_task("warm-up", total=args.warmup + args.seconds)
                t_end = time.monotonic() + args.warmup
                while time.monotonic() < t_end:
                    time.sleep(0.25)
                    progress.advance(task, 0.25)
                cpu0, _ = proc_sample(agent.pid)
                m0 = scrape(metrics_port)
                w0 = time.monotonic()
                peak = 0
                progress.update(task, description="measuring")
                while time.monotonic() - w0 < args.seconds:
                    time.sleep(0.25)
                    peak = max(peak, proc_sample(agent.pid)[1])
                    progress.advance(task, 0.25)
                cpu1, rss = proc_sample(agent.pid)
                m1 = scrape(metrics_port)
                wall = time.monotonic() - w0
        finally:
            for p in procs:
                p.kill()
                p.wait()
            broker.stop()
    polls = m1["scopemeter_edge_polls_total"] - m0["scopemeter_edge_polls_total"]
    errors = m1.get("scopemeter_edge_poll_errors_total", 0) - m0.get("scopemeter_edge_poll_errors_total", 0)
    cpu_share = (cpu1 - cpu0) / wall
    queued = m1["scopemeter_edge_readings_total"] - m0["scopemeter_edge_readings_total"]
    meters = units * ENDPOINTS
    print(
        f"meters {meters} on {ENDPOINTS} endpoints, poll every 1 s, "
        f"measured {wall:.1f} s after {args.warmup:g} s"
    )
    print(f"polls completed  {polls:.0f} ({polls / wall:.2f}/s), meter read errors {errors:.0f}")
    print(f"readings queued  {queued:.0f}, outbox at end {m1['scopemeter_edge_outbox_batches']:.0f} batches")
    print(f"RSS              {rss / 2**20:.1f} MB (peak {peak / 2**20:.1f} MB; goal <= 60 MB)")
    print(
        f"CPU              {100 * cpu_share:.1f} % of one core = {100 * cpu_share * 100 / meters:.1f} % "
        f"per 100 meters polled each second"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
