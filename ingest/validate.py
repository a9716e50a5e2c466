"""The bridge's decision for one MQTT message: a valid batch for ``readings.v1`` or a dead letter.

Pure and total — it never raises — so it can be fuzzed and so a hostile payload can never stop
the bridge.
"""

from __future__ import annotations

from pydantic import ValidationError

from edge.wire import Batch, parse_readings_topic
from ingest.dlq import DeadLetter, Reason

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024


def classify(topic: str, payload: bytes) -> Batch | DeadLetter:
    if len(payload) > MAX_PAYLOAD_BYTES:
        return DeadLetter.of(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}", topic, payload)
    try:
        claimed = parse_readings_topic(topic)
    except (ValueError, ValidationError) as exc:
        return DeadLetter.of(Reason.BAD_TOPIC, str(exc), topic, payload)
    try:
        batch = Batch.decode(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        reason = Reason.INVALID_JSON if errors and errors[0]["type"] == "json_invalid" else Reason.SCHEMA
        return DeadLetter.of(reason, str(errors)[:2000], topic, payload)
    except Exception as exc:  # never let a payload take the bridge down
        return DeadLetter.of(Reason.SCHEMA, f"{type(exc).__name__}: {exc}", topic, payload)
    if (batch.supplier, batch.site, batch.gateway) != (claimed.supplier, claimed.site, claimed.gateway):
        detail = (
            f"topic claims {claimed.supplier}/{claimed.site}/{claimed.gateway}, "
            f"payload says {batch.supplier}/{batch.site}/{batch.gateway}"
        )
        return DeadLetter.of(Reason.IDENTITY_MISMATCH, detail, topic, payload)
    return batch
