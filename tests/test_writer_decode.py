"""The writer's fast path must mean exactly what the wire contract means.

The bridge forwards a validated payload as received; the writer decodes it with a msgspec decoder
(C) instead of pydantic. For every payload the bridge accepts, the rows must be identical to the
contract's own decoding, whatever spelling of numbers and timestamps the gateway used; anything
the fast decoder does not take goes through pydantic. Dirty ranges are computed from rows in
identity order and must still cover every counter row, per site, meter and quantity.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.wire import COUNTER_QUANTITIES, PLAUSIBLE, Batch, Quantity, Reading, readings_topic
from ingest.dlq import DeadLetter, Reason
from ingest.events import DirtyBatch, DirtyRange, decode_dirty
from ingest.validate import Accepted, classify
from ingest.writer import (
    Row,
    _TrustedBatch,
    _TrustedReading,
    batch_rows,
    decode_records,
    dirty_ranges,
    prepare,
    trusted_rows,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TOPIC = readings_topic("acme", "site-1", "gw-1")


def test_fast_decoder_has_the_fields_of_the_wire_contract() -> None:
    """A field added to edge.wire without the writer knowing would silently fall back to pydantic
    (slow) or, worse, be ignored: the two field lists must stay equal."""
    for model, struct in ((Reading, _TrustedReading), (Batch, _TrustedBatch)):
        assert list(model.model_fields) == list(struct.__struct_fields__)
    # A reading without quality is a good one on both paths.
    assert _TrustedReading.__struct_defaults__ == (Reading.model_fields["quality"].default,)


def _spell_ts(ts: datetime, draw: st.DrawFn) -> str:
    """One timestamp in one of the spellings a gateway may use for the same instant."""
    offset = timedelta(minutes=draw(st.sampled_from([0, 0, 60, 480, -300, 345, -720])))
    local = ts.astimezone(timezone(offset))
    digits = draw(st.sampled_from([0, 3, 6]))
    text = local.isoformat(timespec={0: "seconds", 3: "milliseconds", 6: "microseconds"}[digits])
    if offset == timedelta(0) and draw(st.booleans()):
        text = text.replace("+00:00", "Z")
    return text


@st.composite
def gateway_payloads(draw: st.DrawFn) -> bytes:
    """Valid batches written the ways a gateway might: offsets, precision, ints for floats,
    defaults left out, key order, whitespace."""
    n = draw(st.integers(1, 20))
    quantities = [q.value for q in Quantity]
    base = NOW - timedelta(hours=draw(st.integers(1, 48)))
    readings: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, datetime], float | int] = {}  # a repeated reading repeats its value
    for _ in range(n):
        ts = base + timedelta(seconds=draw(st.integers(0, 3600)), microseconds=draw(st.integers(0, 999_999)))
        meter, quantity = f"m{draw(st.integers(0, 5))}", draw(st.sampled_from(quantities))
        lo, hi = PLAUSIBLE[quantity]  # the bridge refuses values outside the quantity's bounds
        value: float | int = draw(
            st.floats(lo, hi, allow_nan=False, allow_infinity=False) | st.integers(int(lo), int(hi))
        )
        reading: dict[str, Any] = {
            "meter_id": meter,
            "quantity": quantity,
            "ts": (spelled := _spell_ts(ts, draw)),
            # Keyed by the instant as spelled: a spelling in whole seconds drops the microseconds.
            "value": seen.setdefault((meter, quantity, datetime.fromisoformat(spelled)), value),
        }
        if draw(st.booleans()):
            reading["quality"] = draw(st.integers(0, 0xFFFF))
        readings.append(reading if draw(st.booleans()) else dict(reversed(list(reading.items()))))
    payload = {
        "v": 1, "supplier": "acme", "site": "site-1", "gateway": "gw-1",
        "seq": draw(st.integers(0, 2**40)), "sent_at": _spell_ts(NOW, draw), "readings": readings,
    }  # fmt: skip
    indent = draw(st.sampled_from([None, 1]))
    return json.dumps(payload, indent=indent).encode()


def _record(value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("readings", 0, offset, 0, 0, None, value, None, 0, len(value), [])


@settings(max_examples=300, deadline=None)
@given(payload=gateway_payloads())
def test_fast_rows_equal_the_contracts_rows(payload: bytes) -> None:
    assert isinstance(classify(TOPIC, payload, now=NOW), Accepted)
    want = batch_rows([Batch.decode(payload)])
    fast = trusted_rows(payload)
    assert fast is not None  # every spelling above is one the fast path must take
    assert fast == want
    assert [r[2].utcoffset() is not None for r in fast] == [True] * len(fast)
    rows, letters = decode_records([_record(payload)])
    assert rows == want and letters == []


def _one_reading_with(change: dict[str, Any]) -> bytes:
    raw = json.loads(Batch(
        supplier="acme", site="site-1", gateway="gw-1", seq=1, sent_at=NOW,
        readings=[Reading(meter_id="m1", quantity=Quantity.ENERGY_IMPORT_KWH, ts=NOW, value=1.0)],
    ).encode())  # fmt: skip
    for key, value in change.items():
        (raw if key == "seq" else raw["readings"][0])[key] = value
    return json.dumps(raw).encode()


@pytest.mark.parametrize("change", [{"value": "12.5"}, {"value": True}, {"quality": 3.0}, {"seq": "1"}])
def test_coercible_spellings_are_refused_by_bridge_and_writer(change: dict[str, Any]) -> None:
    """Types are strict (issue 11): a boolean or numeric string is no number, for the bridge and for
    a record that reaches the writer some other way."""
    payload = _one_reading_with(change)
    decided = classify(TOPIC, payload, now=NOW + timedelta(days=1))
    assert isinstance(decided, DeadLetter) and decided.reason is Reason.SCHEMA
    assert trusted_rows(payload) is None
    rows, letters = decode_records([_record(payload)])
    assert rows == [] and [letter.reason for letter in letters] == [Reason.SCHEMA]


@pytest.mark.parametrize("change", [{"seq": 2**63}, {"seq": -1}, {"value": 1.7e308}, {"value": -1.7e308}])
def test_numbers_the_db_cannot_hold_never_reach_a_row(change: dict[str, Any]) -> None:
    """The fast decoder keeps the wire contract's bounds (seq fits bigint, |value| <= 1e15): such a
    record, written to readings.v1 by anything but the bridge, becomes a letter, never a COPY that
    would fail (or a counter that would reach a signed statement)."""
    payload = _one_reading_with(change)
    assert trusted_rows(payload) is None
    rows, letters = decode_records([_record(payload)])
    assert rows == [] and [letter.reason for letter in letters] == [Reason.SCHEMA]


@pytest.mark.parametrize("change", [{"ts": 1_763_640_000}])  # epoch seconds
def test_lax_spellings_fall_back_to_pydantic_with_the_same_result(change: dict[str, Any]) -> None:
    raw = json.loads(Batch(
        supplier="acme", site="site-1", gateway="gw-1", seq=1, sent_at=NOW,
        readings=[Reading(meter_id="m1", quantity=Quantity.ENERGY_IMPORT_KWH, ts=NOW, value=1.0)],
    ).encode())  # fmt: skip
    raw["readings"][0].update(change)
    payload = json.dumps(raw).encode()
    assert isinstance(classify(TOPIC, payload, now=NOW + timedelta(days=1)), Accepted)
    assert trusted_rows(payload) is None
    rows, letters = decode_records([_record(payload)])
    assert rows == batch_rows([Batch.decode(payload)]) and letters == []


def test_foreign_records_are_dead_letters_not_rows() -> None:
    good = Batch(
        supplier="acme", site="site-1", gateway="gw-1", seq=1, sent_at=NOW,
        readings=[Reading(meter_id="m1", quantity=Quantity.ENERGY_IMPORT_KWH, ts=NOW, value=1.0)],
    ).encode()  # fmt: skip
    raw = json.loads(good)
    raw["readings"][0]["ts"] = raw["readings"][0]["ts"].rstrip("Z")
    naive = json.dumps(raw).encode()  # only the reading's timestamp lacks its zone
    for bad in (b"not json", b"{}", naive, good.replace(b"energy_import_kwh", b"energy_kwh")):
        assert trusted_rows(bad) is None
        rows, letters = decode_records([_record(good), _record(bad, 1)])
        assert len(rows) == 1 and len(letters) == 1


# --- prepare and dirty ranges --------------------------------------------------------------------

T0 = datetime(2026, 11, 2, tzinfo=UTC)


@st.composite
def row_sets(draw: st.DrawFn) -> list[Row]:
    """Rows of a few sites, one meter shared by two sites, counters and power, duplicates."""
    rows = []
    for _ in range(draw(st.integers(1, 80))):
        site = draw(st.sampled_from(["s1", "s2", "s3"]))
        meter = draw(st.sampled_from(["m1", "m2", "shared"]))
        quantity = draw(st.sampled_from([Quantity.ENERGY_IMPORT_KWH.value, Quantity.GAS_M3.value,
                                         Quantity.POWER_W.value]))  # fmt: skip
        ts = T0 + timedelta(seconds=draw(st.integers(0, 500)))
        rows.append((meter, quantity, ts, draw(st.floats(0, 1e6)), 0, site, "gw", draw(st.integers(0, 3))))
    return draw(st.permutations(rows + rows[: draw(st.integers(0, 5))]))


@settings(max_examples=300, deadline=None)
@given(rows=row_sets())
def test_dirty_ranges_cover_every_counter_row_exactly(rows: list[Row]) -> None:
    ranges = dirty_ranges(rows)
    counters = [r for r in rows if r[1] in COUNTER_QUANTITIES]
    assert sum(d.rows for d in ranges) == len(counters)
    assert all(d.quantity in COUNTER_QUANTITIES for d in ranges)
    keys = {(r[5], r[0], r[1]) for r in counters}
    assert {(d.site_id, d.meter_id, d.quantity) for d in ranges} == keys
    for site, meter, quantity in keys:
        ts = [r[2] for r in counters if (r[5], r[0], r[1]) == (site, meter, quantity)]
        mine = [d for d in ranges if (d.site_id, d.meter_id, d.quantity) == (site, meter, quantity)]
        assert min(d.t_min for d in mine) == min(ts) and max(d.t_max for d in mine) == max(ts)
        assert all(any(d.t_min <= t <= d.t_max for d in mine) for t in ts)
    # What the writer publishes must survive its own wire format.
    for d in ranges:
        assert DirtyRange.decode(d.encode()) == d


def test_prepare_orders_rows_and_takes_the_highest_offset_per_partition() -> None:
    def payload(seq: int, meters: list[str]) -> bytes:
        return Batch(
            supplier="acme", site="site-1", gateway="gw-1", seq=seq, sent_at=NOW,
            readings=[Reading(meter_id=m, quantity=Quantity.ENERGY_IMPORT_KWH,
                              ts=NOW - timedelta(minutes=seq), value=float(seq)) for m in meters],
        ).encode()  # fmt: skip

    records = [_record(payload(3, ["m2", "m1"]), 7), _record(payload(1, ["m3", "m1"]), 5)]
    prepared = prepare(records)
    assert prepared.rows == sorted(prepared.rows) and len(prepared.rows) == 4
    assert [(r[0], r[7]) for r in prepared.rows] == [("m1", 3), ("m1", 1), ("m2", 3), ("m3", 1)]
    ((tp, meta),) = prepared.offsets.items()
    assert (tp.topic, tp.partition, meta.offset) == ("readings", 0, 8)
    assert sum(d.rows for d in prepared.dirty) == 4 and prepared.letters == []
    stamps = [r[2] for r in prepared.rows]
    assert prepared.span == (min(stamps), max(stamps))


def test_committed_records_decode_in_both_formats() -> None:
    d = DirtyRange(site_id="s", meter_id="m", quantity="gas_m3", t_min=T0, t_max=T0, rows=2)
    assert decode_dirty(DirtyBatch(site_id="s", ranges=[d, d]).encode()) == [d, d]
    assert decode_dirty(d.encode()) == [d]  # as published before batches, still in the topic
    with pytest.raises(ValidationError):
        decode_dirty(b'{"site_id": "s"}')
