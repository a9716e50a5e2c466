"""The bridge's decision function: every message is either a valid batch or a reasoned dead letter."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.wire import Batch, readings_topic
from ingest.dlq import DeadLetter, Reason
from ingest.validate import MAX_PAYLOAD_BYTES, classify
from tests.helpers import make_batch

TOPIC = readings_topic("acme-electronics", "sz-plant-1", "gw-sz1-01")


def test_valid_batch_passes_and_round_trips() -> None:
    batch = make_batch(0)
    decided = classify(TOPIC, batch.encode())
    assert isinstance(decided, Batch)
    assert decided == batch


def test_gateway_cannot_write_another_site() -> None:
    batch = make_batch(0, site="other-site")
    decided = classify(TOPIC, batch.encode())
    assert isinstance(decided, DeadLetter)
    assert decided.reason is Reason.IDENTITY_MISMATCH
    assert decided.payload() == batch.encode()


def test_reasons_are_specific() -> None:
    cases = {
        Reason.INVALID_JSON: (TOPIC, b"{not json"),
        Reason.SCHEMA: (TOPIC, json.dumps({"v": 1, "readings": []}).encode()),
        Reason.BAD_TOPIC: ("scopemeter/v1/a/b/readings", make_batch(0).encode()),
        Reason.TOO_LARGE: (TOPIC, b" " * (MAX_PAYLOAD_BYTES + 1)),
    }
    for reason, (topic, payload) in cases.items():
        decided = classify(topic, payload)
        assert isinstance(decided, DeadLetter), reason
        assert decided.reason is reason


def test_non_finite_and_implausible_values_are_refused() -> None:
    raw = json.loads(make_batch(0).encode())
    for bad in ("NaN", "Infinity"):
        raw["readings"][0]["value"] = bad
        assert isinstance(classify(TOPIC, json.dumps(raw).encode()), DeadLetter)
    raw = json.loads(make_batch(0).encode())
    raw["readings"][0]["ts"] = "1970-01-01T00:00:00Z"
    assert isinstance(classify(TOPIC, json.dumps(raw).encode()), DeadLetter)
    raw["readings"][0]["ts"] = "2026-01-01T00:00:00"  # naive: no zone, ambiguous
    assert isinstance(classify(TOPIC, json.dumps(raw).encode()), DeadLetter)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_never_raises(payload: bytes) -> None:
    decided = classify(TOPIC, payload)
    assert isinstance(decided, Batch | DeadLetter)
