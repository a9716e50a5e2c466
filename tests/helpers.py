"""Small builders shared by tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from edge.wire import Batch, Quantity, Reading

T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)


def make_batch(
    seq: int,
    *,
    meters: int = 2,
    steps: int = 3,
    supplier: str = "acme-electronics",
    site: str = "sz-plant-1",
    gateway: str = "gw-sz1-01",
    start: datetime = T0,
    step: timedelta = timedelta(minutes=1),
    kw: float = 60.0,
    meter_prefix: str = "m",
) -> Batch:
    """Counter readings of ``meters`` meters at ``steps`` times: each meter draws ``kw`` constantly.

    Meters are named ``{meter_prefix}{i}``; tests sharing the session database give each their own
    prefix so that their reading identities never collide."""
    readings = []
    for i in range(steps):
        ts = start + (seq * steps + i) * step
        hours = (ts - T0).total_seconds() / 3600
        for m in range(meters):
            readings.append(
                Reading(
                    meter_id=f"{meter_prefix}{m}",
                    quantity=Quantity.ENERGY_IMPORT_KWH,
                    ts=ts,
                    value=1_000_000 + kw * hours,  # a counter: positive a year either side of T0
                )
            )
    return Batch(
        supplier=supplier, site=site, gateway=gateway, seq=seq, sent_at=start, readings=readings
    )
