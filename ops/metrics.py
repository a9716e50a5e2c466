"""Every Prometheus metric scopemeter exposes, in one place, on the default registry.

Each process serves the registry with ``serve(port)``; metrics a process does not touch simply
stay at zero there.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

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


def serve(port: int) -> None:
    """Expose /metrics on ``port`` (0 disables)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
