"""Dead-letter records: why a message was refused, in a form a machine can sort and a person can read."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Reason(StrEnum):
    BAD_TOPIC = "bad_topic"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    IDENTITY_MISMATCH = "identity_mismatch"
    TOO_LARGE = "too_large"
    IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp"  # outside the bridge's plausibility window


class DeadLetter(BaseModel):
    model_config = ConfigDict(frozen=True)

    reason: Reason
    detail: str
    topic: str
    received_at: datetime
    payload_b64: str  # the original bytes, untouched, so nothing is lost

    @classmethod
    def of(cls, reason: Reason, detail: str, topic: str, payload: bytes) -> DeadLetter:
        return cls(
            reason=reason,
            detail=detail[:2000],
            topic=topic,
            received_at=datetime.now(UTC),
            payload_b64=base64.b64encode(payload).decode(),
        )

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)
