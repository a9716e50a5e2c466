"""The ``scopemeter`` command. Each package registers its own sub-commands here, explicitly: a
broken import fails loudly instead of hiding a command. The cli modules import only argparse and
the foundation at module level, so a gateway install (the edge extra only) builds the whole parser;
a server command run there says which extra it needs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from compute import cli as compute_cli
from compute.statements import cli as statements_cli
from edge import cli as edge_cli
from ingest import cli as ingest_cli
from ops import commands as ops_commands
from simulators import cli as simulators_cli

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

REGISTRARS: tuple[Registrar, ...] = (
    ops_commands.register,
    edge_cli.register,
    ingest_cli.register,
    compute_cli.register,
    statements_cli.register,
    simulators_cli.register,
)

# Third-party modules of the optional extras, and which extra brings each.
_EXTRA_OF = {
    "aiokafka": "server", "psycopg": "server", "psycopg_pool": "server", "numba": "server",
    "numpy": "server", "msgspec": "server", "rich": "server", "cryptography": "server",
    "matplotlib": "server", "paho": "edge", "pymodbus": "edge", "serial": "edge",
    "prometheus_client": "edge",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scopemeter",
        description="IoT energy metering to auditable GHG Protocol Scope 1/2 emissions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
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
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRA_OF:
            raise
        extra = _EXTRA_OF[top]
        print(f"scopemeter: error: `{args.command}` needs {top}, which this install lacks; "
              f"install it with: pip install 'scopemeter[{extra}]'", file=sys.stderr)
        return 2
    except Exception as exc:  # a clear one-line error, not a traceback, for expected failures
        from ops.errors import UserError

        if isinstance(exc, UserError):
            print(f"scopemeter: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
