"""``scopemeter edge …``: the gateway agent.  Imports stay inside handlers: ``ops.cli`` loads this
module on every command, and a gateway has no server dependencies."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.config import EdgeConfig
    from edge.devices import DeviceMap
    from edge.modbus import PollResult
    from ops.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    edge = sub.add_parser("edge", help="the edge agent that runs on a factory gateway")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="SUBCOMMAND")

    run = edge_sub.add_parser(
        "run",
        help="poll meters and publish their readings",
        description="Poll the gateway's meters every poll_interval_s of the shared clock, store batches "
        "in the outbox and publish them to MQTT (Settings().mqtt). With --polls N: poll N times, wait "
        "until every batch is acknowledged, print a JSON report line and exit (1 if batches remain, "
        "2 if every meter read failed).",
    )
    run.add_argument("config", type=Path, help="gateway config TOML (config/edge/*.toml)")
    run.add_argument("--polls", type=int, help="stop after N polls (default: run until SIGTERM/SIGINT)")
    run.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for PUBACKs at exit")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(handler=_run)

    check = edge_sub.add_parser(
        "check",
        help="validate a gateway config and the register maps it uses",
        description="Errors name the file, line and meter id.  With --connect, also read every meter "
        "once (model code included) and report each endpoint; exit 1 if any meter cannot be read.",
    )
    check.add_argument("config", type=Path)
    check.add_argument("--connect", action="store_true", help="read every meter once")
    check.set_defaults(handler=_check)

    probe = edge_sub.add_parser(
        "probe",
        help="read meters once and print every decoded value with its unit (publishes nothing)",
        description="Connect, check the model code, read every register of each meter's map once and "
        "print name, value, unit and register.  Nothing is stored or published.  Exit 1 if no meter "
        "could be read.",
    )
    probe.add_argument("config", type=Path)
    probe.add_argument("--meter", action="append", help="only this meter id (repeatable)")
    probe.set_defaults(handler=_probe)

    status = edge_sub.add_parser(
        "status", help="the gateway's outbox: pending batches, oldest age, quarantine, counter baselines"
    )
    status.add_argument("config", type=Path)
    status.set_defaults(handler=_status)


def _load(path: Path):  # type: ignore[no-untyped-def]
    from edge.config import EdgeConfigError, check_transports, load_device_maps, load_edge_config
    from ops.errors import UserError
    from ops.settings import Settings

    settings = Settings()
    try:
        config = load_edge_config(path)
        maps = load_device_maps(config, settings.config_dir, path)
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
    reports = []

    async def main(stop: asyncio.Event) -> None:
        report = await run_agent(
            config, settings, polls=args.polls, stop=stop, drain_timeout_s=args.drain_timeout, maps=maps
        )
        print(report.as_json(), flush=True)
        reports.append(report)

    run_service(main)
    if not reports:
        return 1
    report = reports[0]
    if report.polls and not report.successful_meter_reads:
        return 2  # every read failed: nothing was measured
    return 1 if report.pending_batches else 0


def _check(args: argparse.Namespace) -> int:
    from edge.devices import available_models

    settings, config, maps = _load(args.config)
    outbox = config.resolved_outbox(settings.stack.state_dir)
    print(
        f"ok: gateway {config.gateway} ({config.supplier}/{config.site}), {len(config.meters)} meters, "
        f"models {', '.join(sorted(maps))}, poll every {config.poll_interval_s:g} s, outbox {outbox}"
    )
    print(f"available models: {', '.join(available_models(settings.config_dir))}")
    if not args.connect:
        return 0
    result = _read_once(config, maps, settings, all_registers=False)
    failed = 0
    for meter in config.meters:
        state = result.status.get(meter.id, "failed")
        errors = {k: n for (m, k), n in result.meter_errors.items() if m == meter.id}
        detail = f" ({', '.join(f'{k} x{n}' for k, n in sorted(errors.items()))})" if errors else ""
        print(f"{meter.id}: {meter.endpoint} unit {meter.unit_id}: {state}{detail}")
        failed += state in ("failed", "wrong_model")
    return 1 if failed else 0


def _read_once(
    config: EdgeConfig, maps: dict[str, DeviceMap], settings: Settings, *, all_registers: bool
) -> PollResult:
    """One poll of ``config``'s meters; nothing is stored or published."""
    import asyncio

    from edge.modbus import ModbusPoller

    async def main() -> PollResult:
        poller = ModbusPoller(config, maps, settings.clock, all_registers=all_registers)
        try:
            return await poller.poll()
        finally:
            poller.close()

    return asyncio.run(main())


def _probe(args: argparse.Namespace) -> int:
    from ops.errors import UserError

    settings, config, maps = _load(args.config)
    if args.meter:
        unknown = sorted(set(args.meter) - {m.id for m in config.meters})
        if unknown:
            ids = ", ".join(m.id for m in config.meters)
            raise UserError(f"{args.config}: no meter {', '.join(unknown)}; meters: {ids}")
        config = config.model_copy(update={"meters": tuple(m for m in config.meters if m.id in args.meter)})
    result = _read_once(config, maps, settings, all_registers=True)
    for meter in config.meters:
        state = result.status.get(meter.id, "failed")
        print(f"meter {meter.id} ({meter.model}, {meter.endpoint} unit {meter.unit_id}): {state}")
        for (m, kind), n in sorted(result.meter_errors.items()):
            if m == meter.id:
                print(f"  error {kind} x{n}")
        for reg, value in result.decoded.get(meter.id, []):
            shown = "not available" if value != value else f"{value:.10g} {reg.unit}".rstrip()
            quantity = f"  -> {reg.quantity.value}" if reg.quantity is not None else ""
            print(f"  {reg.name:<22} {shown:<22} {reg.type.value} {reg.address:#06x}{quantity}")
        if meter.ratio != 1.0 and meter.id in result.decoded:
            print(f"  (secondary values; published quantities are x{meter.ratio:g} CT*PT)")
    return 0 if len(result.failed_meters) < len(config.meters) else 1


def _status(args: argparse.Namespace) -> int:
    import json

    from edge.counters import CounterGuard
    from edge.outbox import Outbox
    from ops.errors import UserError

    settings, config, _maps = _load(args.config)
    path = config.resolved_outbox(settings.stack.state_dir)
    if not path.is_file():
        raise UserError(f"{path}: no outbox yet (the agent has not run with this config)")
    with Outbox(path, config.gateway, max_batches=config.outbox_max_batches) as outbox:
        guard = CounterGuard.loads(outbox.get_meta("counters"))
        status = {
            "gateway": config.gateway,
            "outbox": str(path),
            "pending_batches": outbox.count(),
            "oldest_pending_age_s": round(outbox.oldest_age_s(), 1),
            "next_seq": outbox.next_seq(),
            "quarantined": outbox.quarantined(),
            "counters": {
                k: {
                    "baseline": s.value,
                    "at": s.ts.isoformat(),
                    "serial": s.serial,
                    "unconfirmed_drop": s.pending,
                }
                for k, s in sorted(guard.states.items())
            },
        }
    print(json.dumps(status, indent=2))
    return 0
