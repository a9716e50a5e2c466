"""A gateway install: the wheel carries the device maps (edge/device_maps), ``edge check`` works
from the installed package alone (no repository, no config/devices), loads no server-side
dependency, and a map in the override directory (<config_dir>/devices) replaces the packaged one."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ops.settings import REPO_ROOT

SNIPPET = """
import sys
from ops.cli import main
code = main()
import edge.devices
print("edge from", edge.devices.__file__)
print("server modules", sorted(m for m in ("aiokafka", "psycopg", "numba", "msgspec") if m in sys.modules))
raise SystemExit(code)
"""


def test_the_wheel_ships_the_maps_and_edge_check_runs_from_it(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheels.glob("scopemeter-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        maps = sorted(n for n in names if n.startswith("edge/device_maps/") and n.endswith(".toml"))
        assert maps == sorted(
            f"edge/device_maps/{p.name}" for p in (REPO_ROOT / "edge/device_maps").glob("*.toml")
        )
        site = tmp_path / "site"
        zf.extractall(site)  # what pip lays out in site-packages
    config_dir = tmp_path / "etc"
    (config_dir / "devices").mkdir(parents=True)
    gateway = config_dir / "gateway.toml"
    gateway.write_text(
        "supplier = 's'\nsite = 'x'\ngateway = 'g'\n"
        "[[meters]]\nid = 'm1'\nhost = '10.0.0.5'\nunit_id = 1\nmodel = 'carlo_gavazzi_em24'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "SCOPEMETER_CONFIG_DIR": str(config_dir)}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", SNIPPET, "edge", "check", str(gateway)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = check()
    assert out.returncode == 0, out.stderr
    assert f"edge from {site}/edge/devices.py" in out.stdout
    assert "server modules []" in out.stdout
    # The override directory wins over the packaged map.
    (config_dir / "devices/carlo_gavazzi_em24.toml").write_text("model = 'carlo_gavazzi_em24'\n")
    overridden = check()
    assert overridden.returncode == 2
    assert f"{config_dir}/devices/carlo_gavazzi_em24.toml: source: Field required" in overridden.stderr
