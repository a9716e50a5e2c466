"""``scopemeter stack up|down|status`` (the embedded Mosquitto + Apache Kafka beside the local PostgreSQL)
and ``scopemeter demo`` (the whole pipeline on one simulated site)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stack = sub.add_parser(
        "stack",
        help="start/stop/inspect the local Mosquitto, Apache Kafka and PostgreSQL",
        description="Pid files, logs and broker data live in SCOPEMETER_STACK__STATE_DIR (.scopemeter/).",
    )
    ssub = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    up = ssub.add_parser("up", help="start what is not running; create the database and Kafka topics")
    up.add_argument("--timeout", type=float, default=None, help="seconds each piece may take to answer")
    up.set_defaults(handler=_up)
    down = ssub.add_parser("down", help="stop the brokers `stack up` started (PostgreSQL keeps running)")
    down.set_defaults(handler=_down)
    st = ssub.add_parser("status", help="table of pieces: reachable?, pid, port")
    st.set_defaults(handler=_status)
    lock = ssub.add_parser(
        "kafka-lock", help="after changing ops/kafka/pom.xml: fetch its jars and rewrite ops/kafka/jars.lock"
    )
    lock.set_defaults(handler=_kafka_lock)

    demo = sub.add_parser("demo", help="run one simulated site through the whole pipeline, check the result")
    demo.add_argument("--hours", type=float, default=2.0, help="simulated hours (default 2)")
    demo.add_argument("--speed", type=float, default=240.0, help="simulated seconds per second (default 240)")
    demo.add_argument("--keep-stack", action="store_true", help="leave the brokers running afterwards")
    demo.set_defaults(handler=_demo)


def _demo(args: Any) -> int:
    from ops import demo

    return demo.run(args)


def _up(args: Any) -> int:
    from ops import stack
    from ops.settings import Settings

    result = stack.up(Settings(), timeout=args.timeout)
    print(result.table())
    print(
        f"started: {', '.join(result.started) or 'nothing (all were running)'}; "
        f"topics created: {', '.join(result.topics_created) or 'none'}; "
        f"migrations applied: {', '.join(map(str, result.migrations_applied)) or 'none'}"
    )
    return 0


def _down(_args: Any) -> int:
    from ops import stack
    from ops.settings import Settings

    stopped = stack.down(Settings())
    if stopped:
        print(f"stopped: {', '.join(stopped)}")
    else:
        print("nothing to stop (no broker started by the stack is running)")
    return 0


def _status(_args: Any) -> int:
    from ops import stack
    from ops.settings import Settings

    result = stack.status(Settings())
    print(result.table())
    return 0 if result.ok else 1


def _kafka_lock(_args: Any) -> int:
    from ops.kafka_broker import write_lock
    from ops.settings import Settings

    print(f"wrote {write_lock(Settings().stack.kafka_cache_dir)}")
    return 0
