"""Dead-letter records: why a message was refused, in a form a machine can sort and a person can read.

A letter is bounded whatever a client sends: the payload is kept whole up to ``KEEP_PAYLOAD_BYTES``
and beyond that as its SHA-256 digest, its size and a prefix; the topic is cut to ``KEEP_TOPIC_CHARS``.
So a letter always fits one Kafka record (``MAX_LETTER_BYTES``, below the 1 MB default of
``message.max.bytes`` of an Apache Kafka broker and far below the bridge producer's
``max_request_size``), and a huge MQTT message can never make the bridge's DLQ send fail.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict

# Apache Kafka's broker default message.max.bytes is 1024 * 1024 + 12 (log overhead) = 1048588 since
# KAFKA-4203 (apache/kafka PR #4154), 1000000 before; a letter stays within both.
MAX_LETTER_BYTES: Final = 1_000_000
KEEP_PAYLOAD_BYTES: Final = 512 * 1024  # base64: 4/3 of this, ~700 kB
KEEP_TOPIC_CHARS: Final = 512  # an MQTT topic may be 65535 bytes
KEEP_DETAIL_CHARS: Final = 2000


class Reason(StrEnum):
    BAD_TOPIC = "bad_topic"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    IDENTITY_MISMATCH = "identity_mismatch"
    TOO_LARGE = "too_large"
    IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp"  # outside the bridge's plausibility window
    IMPLAUSIBLE_VALUE = "implausible_value"  # outside the quantity's physical bounds (edge.wire.PLAUSIBLE)
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # same meter, quantity and ts, different values
    UNREGISTERED_GATEWAY = "unregistered_gateway"  # the topic's supplier/site/gateway is not in the registry
    UNREGISTERED_METER = "unregistered_meter"  # a reading's meter is not in the fleet registry
    METER_SITE_MISMATCH = "meter_site_mismatch"  # the meter is registered to another site or gateway
    SPARKPLUG_DECODE = "sparkplug_decode"  # a Sparkplug B topic whose payload is no Sparkplug protobuf
    SPARKPLUG_METRIC = "sparkplug_metric"  # a malformed Template, or a mapped metric that is no number
    DB_REFUSED = "db_refused"  # the writer: PostgreSQL refused the record's rows (data, not an outage)


class DeadLetter(BaseModel):
    model_config = ConfigDict(frozen=True)

    reason: Reason
    detail: str
    topic: str
    received_at: datetime
    payload_b64: str  # the original bytes, untouched when not ``truncated``; else their first part
    payload_bytes: int  # the original size
    payload_sha256: str  # hex digest of the original bytes: identifies a truncated payload
    truncated: bool = False

    @classmethod
    def of(cls, reason: Reason, detail: str, topic: str, payload: bytes) -> DeadLetter:
        kept = payload[:KEEP_PAYLOAD_BYTES]
        return cls(
            reason=reason,
            detail=detail[:KEEP_DETAIL_CHARS],
            topic=topic[:KEEP_TOPIC_CHARS],
            received_at=datetime.now(UTC),
            payload_b64=base64.b64encode(kept).decode(),
            payload_bytes=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            truncated=len(kept) < len(payload),
        )

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    def key(self) -> bytes:
        """The Kafka key: the (bounded) topic, so one gateway's letters stay in order."""
        return self.topic.encode()

    def payload(self) -> bytes:
        """The kept bytes: the whole payload unless ``truncated``."""
        return base64.b64decode(self.payload_b64)
