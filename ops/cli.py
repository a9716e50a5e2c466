"""The ``scopemeter`` command. Each package registers its own sub-commands; heavy imports stay
inside the handlers so that ``scopemeter edge …`` on a gateway never loads the server stack."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    from edge import cli as edge_cli
    from ops import commands as ops_commands

    found: list[Registrar] = [ops_commands.register, edge_cli.register]
    # Server-side and simulator commands are optional on a gateway install.
    for name in ("ingest.cli", "compute.cli", "compute.statements.cli", "simulators.cli"):
        try:
            module = __import__(name, fromlist=["register"])
        except ImportError:
            continue
        found.append(module.register)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scopemeter",
        description="IoT energy metering to auditable GHG Protocol Scope 1/2 emissions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error, not a traceback, for expected failures
        from ops.errors import UserError

        if isinstance(exc, UserError):
            print(f"scopemeter: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
