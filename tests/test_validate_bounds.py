"""The bridge's decision (ingest.validate) at the edges of each rule: the payload size limit, the
plausibility window's ends, the physical bounds' ends and what a dead letter's detail holds.
Written to kill the mutants ``make mutate`` found alive (issue 17)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

import ingest.validate
from edge.wire import PLAUSIBLE, readings_topic
from ingest.dlq import KEEP_DETAIL_CHARS, DeadLetter, Reason
from ingest.validate import MAX_PAYLOAD_BYTES, Accepted, classify
from ops.settings import IngestSettings
from tests.helpers import make_batch

TOPIC = readings_topic("acme-electronics", "sz-plant-1", "gw-sz1-01")
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
LIMITS = IngestSettings(max_future_s=3600, max_age_s=86_400)


def batch_at(*stamps: datetime, values: list[tuple[str, float]] | None = None) -> bytes:
    raw = json.loads(make_batch(0, meters=1, steps=1).encode())
    template = raw["readings"][0]
    values = values or [(template["quantity"], template["value"])] * len(stamps)
    raw["readings"] = [
        {**template, "ts": ts.isoformat(), "quantity": q, "value": v}
        for ts, (q, v) in zip(stamps, values, strict=True)
    ]
    return json.dumps(raw).encode()


def letter(topic: str, payload: bytes, **kw: object) -> DeadLetter:
    decided = classify(topic, payload, **kw)  # type: ignore[arg-type]
    assert isinstance(decided, DeadLetter), decided
    return decided


def test_a_payload_of_exactly_the_limit_is_not_too_large() -> None:
    assert letter(TOPIC, b" " * MAX_PAYLOAD_BYTES).reason is Reason.INVALID_JSON
    assert letter(TOPIC, b" " * (MAX_PAYLOAD_BYTES + 1)).reason is Reason.TOO_LARGE


def test_the_plausibility_window_includes_its_ends() -> None:
    latest, earliest = NOW + timedelta(seconds=3600), NOW - timedelta(seconds=86_400)
    assert isinstance(classify(TOPIC, batch_at(latest), now=NOW, limits=LIMITS), Accepted)
    assert isinstance(classify(TOPIC, batch_at(earliest), now=NOW, limits=LIMITS), Accepted)
    late = letter(TOPIC, batch_at(latest + timedelta(microseconds=1)), now=NOW, limits=LIMITS)
    assert late.reason is Reason.IMPLAUSIBLE_TIMESTAMP and "after now + 3600 s" in late.detail


def test_the_earliest_reading_of_a_batch_decides_its_age() -> None:
    too_old = NOW - timedelta(days=2)
    payload = batch_at(NOW, NOW - timedelta(hours=1), too_old)  # the oldest is not first on the wire
    decided = letter(TOPIC, payload, now=NOW, limits=LIMITS)
    assert decided.reason is Reason.IMPLAUSIBLE_TIMESTAMP
    assert too_old.isoformat() in decided.detail and "before now - 86400 s" in decided.detail


def test_physical_bounds_include_their_ends() -> None:
    """Values at a quantity's exact bound are plausible; just past it they are not. The batch
    carries one value outside [0, 1e11] so the per-reading check runs, not only the fast pass."""
    lo, hi = PLAUSIBLE["power_w"]
    e_hi = PLAUSIBLE["energy_import_kwh"][1]
    ts = [NOW, NOW + timedelta(minutes=1)]
    ok = batch_at(*ts, values=[("power_w", lo), ("energy_import_kwh", e_hi)])
    assert isinstance(classify(TOPIC, ok), Accepted)
    ok = batch_at(*ts, values=[("power_w", hi), ("power_w", lo)])
    assert isinstance(classify(TOPIC, ok), Accepted)
    below = letter(TOPIC, batch_at(*ts, values=[("power_w", lo * 1.0001), ("power_w", 0.0)]))
    assert below.reason is Reason.IMPLAUSIBLE_VALUE and "readings[0]: power_w" in below.detail
    above = letter(TOPIC, batch_at(*ts, values=[("power_w", 0.0), ("energy_import_kwh", e_hi * 1.0001)]))
    assert above.reason is Reason.IMPLAUSIBLE_VALUE and "readings[1]: energy_import_kwh" in above.detail


def test_a_bad_topic_letter_says_why() -> None:
    decided = letter("scopemeter/v1/a/b/status", make_batch(0).encode())
    assert decided.reason is Reason.BAD_TOPIC
    assert decided.detail == "not a readings topic: 'scopemeter/v1/a/b/status'"
    # Six parts under the right root, but not a readings topic.
    other = "scopemeter/v1/acme-electronics/sz-plant-1/gw-sz1-01/status"
    assert letter(other, make_batch(0).encode()).reason is Reason.BAD_TOPIC


def test_a_letter_is_stamped_with_an_aware_time() -> None:
    decided = letter(TOPIC, b"{")
    assert decided.received_at.utcoffset() == timedelta(0)


def test_a_schema_letter_names_the_field_without_echoing_the_input_or_a_url() -> None:
    raw = json.loads(make_batch(0).encode())
    raw["readings"][0]["value"] = "SECRET-PAYLOAD-TEXT"
    decided = letter(TOPIC, json.dumps(raw).encode())
    assert decided.reason is Reason.SCHEMA
    assert "'readings', 0, 'value'" in decided.detail
    assert "SECRET-PAYLOAD-TEXT" not in decided.detail  # the bytes are in payload_b64, once
    assert "errors.pydantic.dev" not in decided.detail


def test_a_letter_with_many_errors_keeps_a_bounded_detail() -> None:
    raw = json.loads(make_batch(0, meters=50, steps=20).encode())
    for r in raw["readings"]:
        r["value"] = "x"
    decided = letter(TOPIC, json.dumps(raw).encode())
    assert decided.reason is Reason.SCHEMA and len(decided.detail) == KEEP_DETAIL_CHARS


def test_an_unexpected_validator_failure_is_a_schema_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake: no payload is known to make pydantic raise anything but ValidationError, so the
    guard for such a failure (a bug in a validator, a recursion limit) is reached by replacing
    ``check_batch``. The letter keeps the topic and the bytes for a replay."""

    def broken(payload: bytes | str) -> dict[str, object]:
        raise RecursionError("too deep")

    monkeypatch.setattr(ingest.validate, "check_batch", broken)
    payload = make_batch(0).encode()
    decided = letter(TOPIC, payload)
    assert decided.reason is Reason.SCHEMA
    assert decided.detail == "RecursionError: too deep"
    assert decided.topic == TOPIC and decided.payload() == payload
