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
    run.add_argument("--serial-port", help="serve RTU on this serial device (overrides [server].serial_port)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=_run)

    modem = sim_sub.add_parser(
        "null-modem",
        help="two connected virtual serial ports (pseudo-terminals) until SIGTERM/SIGINT",
        description="Like `socat pty,raw pty,raw`: prints one JSON line "
        '{"event": "sim.null_modem", "ports": [A, B]}; serve RTU on A (sim run --serial-port A) and '
        "poll B (transport = \"rtu\", serial_port = B). Ptys refuse parity and 7 data bits.",
    )
    modem.set_defaults(handler=_null_modem)

    outage = sim_sub.add_parser(
        "broker-outage",
        help="a TCP proxy to a broker that goes down (drops and refuses connections) on a schedule",
        description="Listen on --listen and pipe connections to --upstream; after --down-after seconds "
        "drop every connection and refuse new ones for --down-for seconds, then recover (--repeat "
        'times). Prints JSON lines {"event": "proxy.listening"|"proxy.down"|"proxy.up", ...}.',
    )
    outage.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 (0: any free port)")
    outage.add_argument("--listen-host", default="127.0.0.1")
    outage.add_argument("--upstream", required=True, help="HOST:PORT of the real broker")
    outage.add_argument("--down-after", type=float, required=True, help="seconds up before each outage")
    outage.add_argument("--down-for", type=float, required=True, help="seconds each outage lasts")
    outage.add_argument("--repeat", type=int, default=1, help="number of outages (default 1)")
    outage.set_defaults(handler=_broker_outage)


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
    if args.serial_port:
        config = config.model_copy(
            update={"server": config.server.model_copy(update={"serial_port": args.serial_port})}
        )

    def ready(sim: RunningSimulator) -> None:
        line = {"event": "sim.listening", "host": sim.host, "port": sim.port, "meters": sorted(sim.meters)}
        if sim.serial_port is not None:
            line = {"event": "sim.listening", "serial_port": sim.serial_port, "meters": sorted(sim.meters)}
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


def _null_modem(_args: argparse.Namespace) -> int:
    import asyncio

    from ops.runtime import run_service
    from simulators.nullmodem import NullModem

    async def main(stop: asyncio.Event) -> None:
        with NullModem() as modem:
            print(json.dumps({"event": "sim.null_modem", "ports": list(modem.ports)}), flush=True)
            await stop.wait()

    return run_service(main)


def _broker_outage(args: argparse.Namespace) -> int:
    import asyncio

    from ops.errors import UserError
    from ops.runtime import run_service
    from simulators.netfault import FaultProxy, parse_hostport

    try:
        upstream = parse_hostport(args.upstream)
    except ValueError as exc:
        raise UserError(f"--upstream: {exc}") from None
    if args.down_after < 0 or args.down_for < 0 or args.repeat < 1:
        raise UserError("--down-after and --down-for must be >= 0 and --repeat >= 1")

    def event(kind: str, dropped: int) -> None:
        line: dict[str, object] = {"event": f"proxy.{kind}"}
        if kind == "down":
            line["dropped"] = dropped
        print(json.dumps(line), flush=True)

    async def main(stop: asyncio.Event) -> None:
        proxy = FaultProxy((args.listen_host, args.listen), upstream)
        await proxy.start()
        print(json.dumps({"event": "proxy.listening", "port": proxy.port}), flush=True)
        schedule = asyncio.create_task(
            proxy.outage_schedule(args.down_after, args.down_for, repeat=args.repeat, on_event=event)
        )
        try:
            await stop.wait()
        finally:
            schedule.cancel()
            await proxy.stop()

    try:
        return run_service(main)
    except OSError as exc:
        print(f"scopemeter: error: cannot listen: {exc}", file=sys.stderr)
        return 2
