"""Messages the server side passes between its own processes over Kafka (not the edge wire contract).

The writer publishes a ``DirtyBatch`` to ``readings.committed.v1`` (key = site) after each DB commit,
naming per meter the span of timestamps it just wrote; the compute worker recomputes exactly that.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError


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


class DirtyBatch(BaseModel):
    """The dirty ranges of one site from one DB commit, in one record: a record per meter cost
    the writer more than decoding the readings did (``scopemeter bench ingest``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_id: str
    ranges: list[DirtyRange]

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


def decode_dirty(payload: bytes) -> list[DirtyRange]:
    """The ranges of a ``readings.committed.v1`` record: a ``DirtyBatch``, or a single
    ``DirtyRange`` as earlier writers published them (still in the topic after an upgrade).
    Raises ``pydantic.ValidationError`` when it is neither."""
    try:
        return DirtyBatch.model_validate_json(payload).ranges
    except ValidationError:
        return [DirtyRange.decode(payload)]
