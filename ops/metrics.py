"""Every Prometheus metric scopemeter exposes, in one place, each on the registry of the process
that sets it: a process serves only its own registry, so a bridge never exports (and alerts never
fire on) a writer's gauges. ``serve`` exposes a registry at /metrics beside /healthz.

Registries: ``BRIDGE``, ``WRITER``, ``COMPUTE``; the edge agent's are its own
(``edge.metrics.EDGE_REGISTRY``). Each registry also carries the process, platform and GC collectors. Any
process (the edge agent too) serves its registry with ``serve(port, registry, bind=…, health=…)``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


BRIDGE = _registry()
WRITER = _registry()
COMPUTE = _registry()

# Bridge
BRIDGE_MESSAGES = Counter(
    "scopemeter_bridge_messages_total", "MQTT messages handled", ["outcome"], registry=BRIDGE
)
BRIDGE_READINGS = Counter("scopemeter_bridge_readings_total", "Readings forwarded to Kafka", registry=BRIDGE)
BRIDGE_DLQ = Counter("scopemeter_bridge_dlq_total", "Messages sent to the DLQ", ["reason"], registry=BRIDGE)
BRIDGE_IN_FLIGHT = Gauge(
    "scopemeter_bridge_in_flight_messages",
    "MQTT messages produced to Kafka and not yet acked there",
    registry=BRIDGE,
)
GATEWAY_LAST_SEEN = Gauge(
    "scopemeter_gateway_last_seen_timestamp_seconds",
    "Unix time the bridge last accepted a batch from the gateway",
    ["site", "gateway"],
    registry=BRIDGE,
)

# Writer
WRITER_ROWS = Counter(
    "scopemeter_writer_rows_total", "Rows offered to the DB", ["outcome"], registry=WRITER
)
WRITER_BATCH_ROWS = Histogram(
    "scopemeter_writer_batch_rows",
    "Rows per DB transaction",
    buckets=(100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000),
    registry=WRITER,
)
WRITER_COMMIT_SECONDS = Histogram(
    "scopemeter_writer_commit_seconds", "COPY + INSERT + commit time", registry=WRITER
)
WRITER_LATENCY = Histogram(
    "scopemeter_writer_reading_latency_seconds",
    "Reading timestamp to DB commit",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
    registry=WRITER,
)
WRITER_DECODE_SECONDS = Histogram(
    "scopemeter_writer_decode_seconds", "Kafka records to DB rows, per DB transaction", registry=WRITER
)
WRITER_ASSIGNED_PARTITIONS = Gauge(
    "scopemeter_writer_assigned_partitions",
    "Kafka partitions of readings.v1 this writer holds now",
    registry=WRITER,
)
WRITER_LAST_COMMIT = Gauge(
    "scopemeter_writer_last_commit_timestamp_seconds",
    "Unix time of the writer's last DB commit that inserted rows (alert when it stops moving)",
    registry=WRITER,
)
WRITER_SLOW_PATH = Counter(
    "scopemeter_writer_dedup_path_total",
    "Transactions that met an existing reading and went through staging + ON CONFLICT",
    registry=WRITER,
)

# Compute
COMPUTE_RANGES = Counter("scopemeter_compute_ranges_total", "Dirty ranges recomputed", registry=COMPUTE)
# The writer publishes a dirty range right after its DB commit, so the record's Kafka timestamp
# stands for that commit.
COMPUTE_LATENCY = Histogram(
    "scopemeter_compute_latency_seconds",
    "Dirty range published after its DB commit (Kafka timestamp) to the recompute commit",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
    registry=COMPUTE,
)

# Both consumers (ops/kafka_client.py sets it; one definition of lag for both).
KAFKA_CONSUMER_LAG = Gauge(
    "scopemeter_kafka_consumer_lag",
    "Messages between the group's committed offset and the partition end",
    ["group", "topic", "partition"],
    registry=WRITER,
)
COMPUTE.register(KAFKA_CONSUMER_LAG)

# Every service: what /healthz reports, for Prometheus too.
DEPENDENCY_UP = Gauge(
    "scopemeter_dependency_up",
    "1 while the process reaches this dependency (kafka, db, mqtt), 0 while it does not",
    ["dependency"],
    registry=BRIDGE,
)
WRITER.register(DEPENDENCY_UP)
COMPUTE.register(DEPENDENCY_UP)

# Server process → its registry (tests and the monitoring checks walk them all). The edge agent's
# metrics are the edge's own (edge.metrics.EDGE_REGISTRY).
REGISTRIES: dict[str, CollectorRegistry] = {"bridge": BRIDGE, "writer": WRITER, "compute": COMPUTE}


class Health:
    """What a process's /healthz says: each dependency is up, or down with the reason.

    The service sets it from its own connection attempts (and probes); the HTTP thread reads it.
    Until a dependency has been reached once, it is down ("not connected yet")."""

    def __init__(self, *dependencies: str) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, str | None] = {}
        for dependency in dependencies:
            self.down(dependency, "not connected yet")

    def up(self, dependency: str) -> None:
        with self._lock:
            self._down[dependency] = None
        DEPENDENCY_UP.labels(dependency).set(1)

    def down(self, dependency: str, reason: str) -> None:
        with self._lock:
            self._down[dependency] = reason
        DEPENDENCY_UP.labels(dependency).set(0)

    def is_up(self, dependency: str) -> bool:
        with self._lock:
            return self._down.get(dependency, "unknown") is None

    def report(self) -> tuple[bool, dict[str, str]]:
        """(healthy, dependency → "ok" or why it is down)."""
        with self._lock:
            state = dict(self._down)
        return all(v is None for v in state.values()), {k: v or "ok" for k, v in state.items()}


def serve(
    port: int,
    registry: CollectorRegistry = REGISTRY,
    *,
    bind: str = "127.0.0.1",
    health: Health | None = None,
) -> ThreadingHTTPServer | None:
    """Serve ``registry`` at /metrics and ``health`` at /healthz (200 when every dependency is up,
    503 with the reasons otherwise) on ``bind:port`` in a daemon thread; port 0 disables both."""
    if not port:
        return None
    checks = health or Health()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                healthy, state = checks.report()
                body = json.dumps({"status": "ok" if healthy else "down", "dependencies": state})
                self._send(200 if healthy else 503, "application/json", body.encode() + b"\n")
            else:
                self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            pass

    server = ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
    return server

# Edge agent metrics live in edge/metrics.py, on the gateway process's own registry.

