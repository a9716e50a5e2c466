"""The edge agent's Prometheus metrics, on a registry of their own: a gateway process exports its
metrics only (``serve``), never the server processes' families.

Per-meter series carry ``gateway`` and ``meter`` labels, so a plant engineer sees which meter fails.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge

from ops.metrics import DEPENDENCY_UP, Health
from ops.metrics import serve as serve_registry

EDGE_REGISTRY = CollectorRegistry(auto_describe=True)

EDGE_POLLS = Counter("scopemeter_edge_polls_total", "Poll rounds over all meters", registry=EDGE_REGISTRY)
EDGE_POLL_ERRORS = Counter(
    "scopemeter_edge_poll_errors_total",
    "Failed requests and dropped values, by meter and kind (timeout, exception_N, bad_reply, …)",
    ["gateway", "meter", "kind"],
    registry=EDGE_REGISTRY,
)
EDGE_METER_LAST_SUCCESS = Gauge(
    "scopemeter_edge_meter_last_success_timestamp_seconds",
    "Wall time of the meter's last read that gave values",
    ["gateway", "meter"],
    registry=EDGE_REGISTRY,
)
EDGE_METER_FAILURES = Gauge(
    "scopemeter_edge_meter_consecutive_failures",
    "Polls in a row in which the meter gave no values",
    ["gateway", "meter"],
    registry=EDGE_REGISTRY,
)
EDGE_METER_STATUS = Enum(
    "scopemeter_edge_meter_status",
    "Outcome of the meter's last poll",
    ["gateway", "meter"],
    states=["unknown", "ok", "partial", "failed", "wrong_model"],
    registry=EDGE_REGISTRY,
)
EDGE_READINGS = Counter(
    "scopemeter_edge_readings_total", "Readings stored in the outbox", registry=EDGE_REGISTRY
)
EDGE_FLAGGED_READINGS = Counter(
    "scopemeter_edge_flagged_readings_total",
    "Readings sent with quality bits set",
    ["flag"],
    registry=EDGE_REGISTRY,
)
EDGE_PUBLISHED_BATCHES = Counter(
    "scopemeter_edge_published_batches_total", "Batches acknowledged (PUBACK)", registry=EDGE_REGISTRY
)
EDGE_OUTBOX_BATCHES = Gauge(
    "scopemeter_edge_outbox_batches", "Unacknowledged batches in the outbox", registry=EDGE_REGISTRY
)
EDGE_OUTBOX_OLDEST_AGE = Gauge(
    "scopemeter_edge_outbox_oldest_age_seconds",
    "Wall seconds the oldest unsent batch has waited",
    registry=EDGE_REGISTRY,
)
EDGE_OUTBOX_EVICTED_BATCHES = Counter(
    "scopemeter_edge_outbox_evicted_batches_total",
    "Batches evicted (drop_oldest) from a full outbox",
    registry=EDGE_REGISTRY,
)
EDGE_OUTBOX_EVICTED_READINGS = Counter(
    "scopemeter_edge_outbox_evicted_readings_total",
    "Readings evicted from a full outbox",
    registry=EDGE_REGISTRY,
)
EDGE_QUARANTINED_READINGS = Counter(
    "scopemeter_edge_quarantined_readings_total",
    "Readings kept back for implausible time",
    ["reason"],
    registry=EDGE_REGISTRY,
)
EDGE_CLOCK_OFFSET = Gauge(
    "scopemeter_edge_clock_offset_seconds",
    "Reference clock minus gateway clock (NaN: not measured)",
    registry=EDGE_REGISTRY,
)
EDGE_MQTT_CONNECTED = Gauge(
    "scopemeter_edge_mqtt_connected", "1 while the MQTT session is up", registry=EDGE_REGISTRY
)


# /healthz follows the agent's MQTT session (set by the agent's connect and disconnect callbacks).
EDGE_REGISTRY.register(DEPENDENCY_UP)
HEALTH = Health("mqtt")


def serve(port: int, bind: str = "127.0.0.1") -> None:
    """Expose the edge registry's /metrics and the agent's /healthz on ``bind:port`` (0 disables)."""
    serve_registry(port, EDGE_REGISTRY, bind=bind, health=HEALTH)
