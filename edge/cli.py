"""``scopemeter edge …``: the gateway agent.  Imports stay inside handlers: ``ops.cli`` loads this
module on every command, and a gateway has no server dependencies."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    edge = sub.add_parser("edge", help="the edge agent that runs on a factory gateway")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="SUBCOMMAND")

    run = edge_sub.add_parser(
        "run",
        help="poll meters and publish their readings",
        description="Poll the gateway's meters every poll_interval_s of the shared clock, store batches "
        "in the outbox and publish them to MQTT (Settings().mqtt). With --polls N: poll N times, wait "
        "until every batch is acknowledged, print a JSON report line and exit (1 if batches remain).",
    )
    run.add_argument("config", type=Path, help="gateway config TOML (config/edge/*.toml)")
    run.add_argument("--polls", type=int, help="stop after N polls (default: run until SIGTERM/SIGINT)")
    run.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for PUBACKs at exit")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=_run)

    check = edge_sub.add_parser("check", help="validate a gateway config and the register maps it uses")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_check)


def _load(path: Path):  # type: ignore[no-untyped-def]
    from edge.config import EdgeConfigError, check_transports, load_device_maps, load_edge_config
    from ops.errors import UserError
    from ops.settings import Settings

    settings = Settings()
    try:
        config = load_edge_config(path)
        maps = load_device_maps(config, settings.config_dir)
        check_transports(config)
    except EdgeConfigError as exc:
        raise UserError(str(exc)) from None
    return settings, config, maps


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from edge.agent import run_agent
    from ops.errors import UserError
    from ops.runtime import run_service, setup_logging

    if args.polls is not None and args.polls < 1:
        raise UserError("--polls must be at least 1")
    setup_logging(args.verbose)
    settings, config, maps = _load(args.config)
    pending = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal pending
        report = await run_agent(
            config, settings, polls=args.polls, stop=stop, drain_timeout_s=args.drain_timeout, maps=maps
        )
        print(report.as_json(), flush=True)
        pending = report.pending_batches

    run_service(main)
    return 1 if pending else 0


def _check(args: argparse.Namespace) -> int:
    settings, config, maps = _load(args.config)
    outbox = config.resolved_outbox(settings.stack.state_dir)
    print(
        f"ok: gateway {config.gateway} ({config.supplier}/{config.site}), {len(config.meters)} meters, "
        f"models {', '.join(sorted(maps))}, poll every {config.poll_interval_s:g} s, outbox {outbox}"
    )
    return 0
