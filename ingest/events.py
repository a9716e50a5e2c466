"""Messages the server side passes between its own processes over Kafka (not the edge wire contract).

The writer publishes a ``DirtyRange`` to ``readings.committed.v1`` (key = site) after each DB commit,
naming per meter the span of timestamps it just wrote; the compute worker recomputes exactly that.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict


class DirtyRange(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    site_id: str
    meter_id: str
    quantity: str
    t_min: AwareDatetime
    t_max: AwareDatetime
    rows: int  # rows offered for this span in the committed batch (before de-duplication)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, payload: bytes) -> DirtyRange:
        return cls.model_validate_json(payload)
