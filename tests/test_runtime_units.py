"""The systemd units that supervise the server processes: bridge, writer, compute and the Sparkplug
host restart forever (the services are fail-stop), use the edge unit's install paths and user, run
commands the CLI accepts, and pass ``systemd-analyze verify`` (apart from the install path missing
here)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ops.cli import build_parser

UNITS = Path(__file__).resolve().parent.parent / "ops" / "systemd"
SERVER = {  # unit → (command, the handler it runs, metrics port)
    "scopemeter-bridge.service": ("ingest", "ingest.cli._bridge", 9101),
    "scopemeter-writer.service": ("ingest", "ingest.cli._writer", 9102),
    "scopemeter-compute.service": ("compute", "compute.cli._run", 9103),
    "scopemeter-sparkplug.service": ("sparkplug", "ingest.tools_cli._sparkplug_host", 9104),
}


def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("name", sorted(SERVER))
def test_server_units_restart_forever_with_the_edge_conventions(name: str) -> None:
    unit, edge = _unit(UNITS / name), _unit(UNITS / "scopemeter-edge.service")
    assert unit["Restart"] == ["always"] and unit["StartLimitIntervalSec"] == ["0"]
    assert float(unit["RestartSec"][0]) > 0
    for key in ("User", "Group", "StateDirectory", "ConfigurationDirectory", "ReadWritePaths"):
        assert unit[key] == edge[key], key
    assert "SCOPEMETER_STACK__STATE_DIR=/var/lib/scopemeter" in unit["Environment"]
    assert unit["EnvironmentFile"] == ["-/etc/scopemeter/scopemeter.env"]
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[0] == shlex.split(edge["ExecStart"][0])[0] == "/opt/scopemeter/bin/scopemeter"
    args: Any = build_parser().parse_args(argv[1:])
    group, handler, port = SERVER[name]
    assert args.command == group
    assert f"{args.handler.__module__}.{args.handler.__name__}" == handler
    assert args.metrics_port == port  # the scrape targets in ops/prometheus/prometheus.yml
    assert f"127.0.0.1:{port}" in (UNITS.parent / "prometheus" / "prometheus.yml").read_text()


def test_units_pass_systemd_analyze_verify() -> None:
    names = [str(UNITS / n) for n in sorted(SERVER)]
    r = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True)
    problems = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if line.strip() and "Command /opt/scopemeter/bin/scopemeter is not executable" not in line
    ]
    assert not problems, problems
