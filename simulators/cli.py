"""``scopemeter sim …``: run the meter simulator as its own process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulators.meters import RunningSimulator


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser("sim", help="simulated meters for demos and tests")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="SUBCOMMAND")
    run = sim_sub.add_parser(
        "run",
        help="serve a simulated site over Modbus TCP until SIGTERM/SIGINT",
        description="Serve the meters of a simulation config (config/simulation/*.toml) over Modbus "
        "TCP. Values follow the shared clock (SCOPEMETER_CLOCK__*). Prints one JSON line "
        '{"event": "sim.listening", "host", "port", "meters"} on stdout once it accepts connections.',
    )
    run.add_argument("config", type=Path, help="simulation config TOML")
    run.add_argument("--host", help="override [server].host")
    run.add_argument("--port", type=int, help="override [server].port (0: any free port)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from ops.errors import UserError
    from ops.runtime import run_service, setup_logging
    from ops.settings import Settings
    from simulators.config import SimulationConfigError, load_simulation
    from simulators.meters import serve

    setup_logging(args.verbose)
    settings = Settings()
    try:
        config = load_simulation(args.config)
    except SimulationConfigError as exc:
        raise UserError(str(exc)) from None

    def ready(sim: RunningSimulator) -> None:
        line = {"event": "sim.listening", "host": sim.host, "port": sim.port, "meters": sorted(sim.meters)}
        print(json.dumps(line), flush=True)

    async def main(stop: asyncio.Event) -> None:
        await serve(
            config, settings.clock, settings.config_dir, stop, host=args.host, port=args.port, on_ready=ready
        )

    try:
        return run_service(main)
    except OSError as exc:
        print(f"scopemeter: error: cannot serve: {exc}", file=sys.stderr)
        return 2
