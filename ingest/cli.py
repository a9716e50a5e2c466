"""``scopemeter ingest bridge|writer`` and ``scopemeter db migrate``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ops.runtime import run_service, setup_logging
from ops.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = sub.add_parser("ingest", help="MQTT → Kafka bridge and Kafka → PostgreSQL writer")
    isub = ingest.add_subparsers(dest="ingest_command", required=True, metavar="PROCESS")
    bridge = isub.add_parser("bridge", help="validate MQTT batches and produce them to Kafka")
    bridge.add_argument("--metrics-port", type=int, default=9101, help="0 disables /metrics")
    bridge.add_argument(
        "--client-id",
        default=None,
        help="persistent MQTT client id, unique per bridge (default: scopemeter-bridge-HOSTNAME)",
    )
    bridge.set_defaults(handler=_bridge)
    writer = isub.add_parser("writer", help="write readings from Kafka to PostgreSQL")
    writer.add_argument("--metrics-port", type=int, default=9102, help="0 disables /metrics")
    writer.add_argument("--batch-rows", type=int, default=20_000, help="rows per DB transaction")
    writer.set_defaults(handler=_writer)

    db = sub.add_parser("db", help="database schema")
    dsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    mig = dsub.add_parser("migrate", help="create the database if needed and apply migrations")
    mig.set_defaults(handler=_migrate)


def _bridge(args: Any) -> int:
    from ingest.bridge import run_bridge
    from ops import metrics

    setup_logging()
    metrics.serve(args.metrics_port)
    settings = Settings()

    def ready() -> None:  # one JSON line on stdout: supervisors and the demo wait for it
        print(json.dumps({"event": "bridge.ready"}), flush=True)

    return run_service(lambda stop: run_bridge(settings, stop, client_id=args.client_id, on_ready=ready))


def _writer(args: Any) -> int:
    from ingest.writer import run_writer
    from ops import metrics

    setup_logging()
    metrics.serve(args.metrics_port)
    settings = Settings()
    return run_service(lambda stop: run_writer(settings, stop, batch_rows_target=args.batch_rows))


def _migrate(_args: Any) -> int:
    from ingest.db import ensure_database, migrate

    settings = Settings()
    created = ensure_database(settings.db.dsn, settings.db.admin_dsn)
    applied = migrate(settings.db.dsn)
    print(f"database {'created' if created else 'exists'}; migrations applied: {applied or 'none'}")
    return 0
