"""Every Prometheus metric scopemeter exposes, in one place, on the default registry.

Each process serves the registry with ``serve(port)``; metrics a process does not touch simply
stay at zero there.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Bridge
BRIDGE_MESSAGES = Counter("scopemeter_bridge_messages_total", "MQTT messages handled", ["outcome"])
BRIDGE_READINGS = Counter("scopemeter_bridge_readings_total", "Readings forwarded to Kafka")
BRIDGE_DLQ = Counter("scopemeter_bridge_dlq_total", "Messages sent to the DLQ", ["reason"])

# Writer
WRITER_ROWS = Counter("scopemeter_writer_rows_total", "Rows offered to the DB", ["outcome"])
WRITER_BATCH_ROWS = Histogram(
    "scopemeter_writer_batch_rows",
    "Rows per DB transaction",
    buckets=(100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000),
)
WRITER_COMMIT_SECONDS = Histogram("scopemeter_writer_commit_seconds", "COPY + INSERT + commit time")
WRITER_LATENCY = Histogram(
    "scopemeter_writer_reading_latency_seconds",
    "Reading timestamp to DB commit",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)

# Compute
COMPUTE_RANGES = Counter("scopemeter_compute_ranges_total", "Dirty ranges recomputed")
# The writer publishes a dirty range right after its DB commit, so the record's Kafka timestamp
# stands for that commit.
COMPUTE_LATENCY = Histogram(
    "scopemeter_compute_latency_seconds",
    "Dirty range published after its DB commit (Kafka timestamp) to the recompute commit",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)


def serve(port: int) -> None:
    """Expose /metrics on ``port`` (0 disables)."""
    if port:
        start_http_server(port, addr="127.0.0.1")

# Edge agent metrics live in edge/metrics.py, on the gateway process's own registry.

# --- Operations alerts (ops/prometheus/alerts.yml, issue 6) -------------------------------------
# Declared here so the alert rules and dashboards name real metrics; the consumers and the bridge
# set them (wiring is the ingest/compute owners' part).
KAFKA_CONSUMER_LAG = Gauge(
    "scopemeter_kafka_consumer_lag",
    "Messages between the group's committed offset and the partition end",
    ["group", "topic", "partition"],
)
GATEWAY_LAST_SEEN = Gauge(
    "scopemeter_gateway_last_seen_timestamp_seconds",
    "Unix time the bridge last accepted a batch from the gateway",
    ["site", "gateway"],
)

# --- Ingest (ingest/bridge.py, ingest/writer.py, issue 4) ----------------------------------------
BRIDGE_IN_FLIGHT = Gauge(
    "scopemeter_bridge_in_flight_messages", "MQTT messages produced to Kafka and not yet acked there"
)
WRITER_DECODE_SECONDS = Histogram(
    "scopemeter_writer_decode_seconds", "Kafka records to DB rows, per DB transaction"
)
WRITER_ASSIGNED_PARTITIONS = Gauge(
    "scopemeter_writer_assigned_partitions", "Kafka partitions of readings.v1 this writer holds now"
)
WRITER_LAST_COMMIT = Gauge(
    "scopemeter_writer_last_commit_timestamp_seconds",
    "Unix time of the writer's last DB commit that inserted rows (alert when it stops moving)",
)
WRITER_SLOW_PATH = Counter(
    "scopemeter_writer_dedup_path_total",
    "Transactions that met an existing reading and went through staging + ON CONFLICT",
)
