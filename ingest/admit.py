"""The bridge's decision for one wire batch, for the paths that feed the bridge's output without
being the bridge: ``dlq replay``, the Sparkplug B host and imports. One decision, the bridge's own
(``ingest.validate.classify`` with the fleet registry of ``ingest.registry``), in the shape those
callers report: a refusal's reason as the DLQ reason name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ingest.dlq import DeadLetter, Reason
from ingest.registry import MeterHome, Registry
from ingest.registry import load as load_registry
from ingest.validate import Accepted, classify
from ops.settings import IngestSettings

__all__ = ["Accepted", "MeterHome", "Refused", "Registry", "admit", "dead_letter", "load_registry"]


@dataclass(frozen=True)
class Refused:
    """A refusal: ``reason`` is a DLQ reason name (``ingest.dlq.Reason``)."""

    reason: str
    detail: str


def admit(
    topic: str,
    payload: bytes,
    registry: Registry,
    *,
    now: datetime | None = None,
    limits: IngestSettings | None = None,
) -> Accepted | Refused:
    """The bridge's checks, the registry's included. Total: never raises for anything a client sent."""
    decided = classify(topic, payload, now=now, limits=limits, registry=registry)
    if isinstance(decided, DeadLetter):
        return Refused(decided.reason.value, decided.detail)
    return decided


def dead_letter(reason: str, detail: str, topic: str, payload: bytes) -> bytes:
    """A DLQ record (``ingest.dlq.DeadLetter``) for a refusal ``admit`` or a decoder reported."""
    return DeadLetter.of(Reason(reason), detail, topic, payload).encode()
