"""The bridge's decision function: every message is either a valid batch or a reasoned dead letter."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.wire import PLAUSIBLE, Batch, Quantity, check_batch, readings_topic
from ingest.dlq import KEEP_PAYLOAD_BYTES, MAX_LETTER_BYTES, DeadLetter, Reason
from ingest.registry import MeterHome, Registry
from ingest.validate import MAX_PAYLOAD_BYTES, Accepted, classify
from ops.settings import IngestSettings
from tests.helpers import make_batch

TOPIC = readings_topic("acme-electronics", "sz-plant-1", "gw-sz1-01")


def test_valid_batch_is_accepted_with_its_routing_facts() -> None:
    batch = make_batch(0)
    decided = classify(TOPIC, batch.encode())
    assert decided == Accepted(batch.supplier, batch.site, batch.gateway, batch.seq, len(batch.readings))


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
    assert isinstance(decided, Accepted | DeadLetter)


# --- plausibility of timestamps -------------------------------------------------------------------

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_implausible_timestamps_go_to_the_dlq_with_their_reason() -> None:
    limits = IngestSettings(max_future_s=86_400, max_age_s=400 * 86_400)
    ok = [NOW - timedelta(days=399), NOW, NOW + timedelta(hours=23)]
    bad = [NOW + timedelta(days=1, seconds=1), NOW - timedelta(days=401), datetime(2099, 1, 1, tzinfo=UTC)]
    for ts in ok:
        assert isinstance(classify(TOPIC, make_batch(0, start=ts).encode(), now=NOW, limits=limits), Accepted)
    for ts in bad:
        decided = classify(TOPIC, make_batch(0, start=ts).encode(), now=NOW, limits=limits)
        assert isinstance(decided, DeadLetter) and decided.reason is Reason.IMPLAUSIBLE_TIMESTAMP, ts
    # One bad reading taints its batch; the window is configurable.
    mixed = json.loads(make_batch(0, start=NOW).encode())
    mixed["readings"][-1]["ts"] = "2027-06-01T00:00:00Z"
    decided = classify(TOPIC, json.dumps(mixed).encode(), now=NOW, limits=limits)
    assert isinstance(decided, DeadLetter) and decided.reason is Reason.IMPLAUSIBLE_TIMESTAMP
    wide = IngestSettings(max_future_s=400 * 86_400)
    assert isinstance(classify(TOPIC, json.dumps(mixed).encode(), now=NOW, limits=wide), Accepted)


# --- structured hostile payloads ------------------------------------------------------------------

VALID = json.loads(make_batch(0, start=NOW - timedelta(hours=1)).encode())
BATCH_FIELDS = ["v", "supplier", "site", "gateway", "seq", "sent_at", "readings"]
READING_FIELDS = ["meter_id", "quantity", "ts", "value", "quality"]
# No field of the contract accepts any of these, in lax mode or not.
wrong_types = (
    st.none()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.none(), max_size=2)
)
hostile_ids = st.sampled_from(
    [
        "a/b",
        "+",
        "#",
        "../x",
        "x\u0000y",
        "x" * 65,
        "",
        " site",
        "s\u00e9te",
        "site\u202e",
        "\U0001f525",
        "$SYS",
        "a/#",
        "site\n",
    ]
)


def _deep(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    """A payload that must be refused: a valid batch with one field broken, or structural abuse."""
    raw = json.loads(json.dumps(VALID))
    kind = draw(st.sampled_from(["batch_type", "reading_type", "id", "missing", "extra", "huge", "deep",
                                 "number", "bytes"]))  # fmt: skip
    if kind == "batch_type":
        raw[draw(st.sampled_from(BATCH_FIELDS))] = draw(wrong_types)
    elif kind == "reading_type":
        reading = raw["readings"][draw(st.integers(0, len(raw["readings"]) - 1))]
        reading[draw(st.sampled_from(READING_FIELDS))] = draw(wrong_types)
    elif kind == "id":
        field = draw(st.sampled_from(["supplier", "site", "gateway", "meter_id"]))
        target = raw["readings"][0] if field == "meter_id" else raw
        target[field] = draw(hostile_ids)
    elif kind == "missing":
        del raw[draw(st.sampled_from(BATCH_FIELDS[1:]))]
    elif kind == "extra":
        raw[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in raw))] = draw(st.integers())
    elif kind == "huge":
        raw["readings"] = raw["readings"][:1] * (10_001)
    elif kind == "deep":
        return _deep(draw(st.integers(100, 100_000)))
    elif kind == "number":
        token = draw(st.sampled_from(["1e999", "-1e999", "NaN", "0x10", "1_0"]))  # not JSON numbers
        raw["readings"][0]["value"] = "@@"
        return json.dumps(raw).replace('"@@"', token).encode()
    else:
        return draw(st.binary(min_size=1, max_size=200)).replace(b"{", b"\xff")
    return json.dumps(raw, ensure_ascii=draw(st.booleans())).encode()


@settings(max_examples=400, deadline=None)
@given(payload=hostile_payloads())
def test_fuzz_hostile_payloads_all_land_in_the_dlq(payload: bytes) -> None:
    decided = classify(TOPIC, payload, now=NOW)
    assert isinstance(decided, DeadLetter)
    assert decided.payload_sha256 == hashlib.sha256(payload).hexdigest()
    if len(payload) <= KEEP_PAYLOAD_BYTES:
        assert decided.payload() == payload and not decided.truncated  # kept byte for byte
    else:
        assert payload.startswith(decided.payload()) and decided.truncated
    encoded = decided.encode()
    assert len(encoded) <= MAX_LETTER_BYTES
    DeadLetter.model_validate_json(encoded)  # and the letter itself always encodes


def test_the_valid_template_is_accepted() -> None:
    """The fuzz above breaks exactly one thing of this batch: the batch itself must be fine."""
    assert isinstance(classify(TOPIC, json.dumps(VALID).encode(), now=NOW), Accepted)


# --- the bridge's validation is the contract's ----------------------------------------------------


def _verdict(check: Callable[[bytes], object], payload: bytes) -> list[tuple[object, str]] | None:
    """None when accepted, else the (location, type) of every error; "not an object" is worded
    model_type by a model and dict_type by a TypedDict."""
    try:
        check(payload)
    except ValidationError as exc:
        return [(e["loc"], "dict_type" if e["type"] == "model_type" else e["type"]) for e in exc.errors()]
    return None


payloads = (
    hostile_payloads()
    | st.just(json.dumps(VALID).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
)


@settings(max_examples=400, deadline=None)
@given(
    payload=hostile_payloads()
    | st.just(json.dumps(VALID).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
)
def test_plain_data_check_is_exactly_batch_decode(payload: bytes) -> None:
    """The bridge validates with check_batch (dicts, no models); it must accept and refuse exactly
    what Batch.decode does, for the same reasons at the same places."""
    assert _verdict(check_batch, payload) == _verdict(Batch.decode, payload)


# --- strict types, DB-sized numbers, duplicates (issue 11) -----------------------------------------


def _with(path: tuple[object, ...], value: object) -> bytes:
    raw = json.loads(make_batch(0, start=NOW - timedelta(hours=1)).encode())
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(raw).encode()


def test_booleans_numeric_strings_and_numbers_past_the_db_columns_are_refused() -> None:
    value = ("readings", 0, "value")
    refused = {
        "value true": _with(value, True),
        'value "12.5"': _with(value, "12.5"),
        "value 1.7e308": _with(value, 1.7e308),
        "seq 2**63": _with(("seq",), 2**63),
        'seq "7"': _with(("seq",), "7"),
        "seq 7.0": _with(("seq",), 7.0),
        "quality true": _with(("readings", 0, "quality"), True),
        "quality 2**31": _with(("readings", 0, "quality"), 2**31),
        "v true": _with(("v",), True),
    }
    for name, payload in refused.items():
        decided = classify(TOPIC, payload, now=NOW)
        assert isinstance(decided, DeadLetter) and decided.reason is Reason.SCHEMA, name
    assert isinstance(classify(TOPIC, _with(("seq",), 2**63 - 1), now=NOW), Accepted)  # bigint's max
    assert isinstance(classify(TOPIC, _with(value, 1_000_000), now=NOW), Accepted)  # an integer is a number


def test_physically_impossible_values_are_implausible() -> None:
    assert set(PLAUSIBLE) == {q.value for q in Quantity}
    for payload in (_with(("readings", 0, "value"), -1.0), _with(("readings", 0, "value"), 2e12)):
        decided = classify(TOPIC, payload, now=NOW)
        assert isinstance(decided, DeadLetter) and decided.reason is Reason.IMPLAUSIBLE_VALUE
        assert "m0" in decided.detail


def test_conflicting_duplicates_in_a_batch_are_refused_identical_ones_are_not() -> None:
    raw = json.loads(make_batch(0, start=NOW - timedelta(hours=1)).encode())
    raw["readings"].append(dict(raw["readings"][0]))
    assert isinstance(classify(TOPIC, json.dumps(raw).encode(), now=NOW), Accepted)
    raw["readings"][-1]["value"] += 0.5
    raw["readings"][-1]["ts"] = raw["readings"][-1]["ts"].replace("Z", "+00:00")  # the same instant
    decided = classify(TOPIC, json.dumps(raw).encode(), now=NOW)
    assert isinstance(decided, DeadLetter) and decided.reason is Reason.CONFLICTING_DUPLICATE


# --- the fleet registry -----------------------------------------------------------------------------

REGISTRY = Registry(
    version=1,
    sites={"sz-plant-1": "acme-electronics", "other-site": "globex"},
    gateways={"gw-sz1-01": "sz-plant-1", "gw-other": "other-site"},
    meters={
        "m0": MeterHome("sz-plant-1", "gw-sz1-01"),
        "m1": MeterHome("sz-plant-1", None),  # any gateway of the site
        "y-meter": MeterHome("other-site", "gw-other"),
    },
)


def test_registered_meters_of_the_topics_site_and_gateway_are_accepted() -> None:
    batch = make_batch(0, start=NOW - timedelta(hours=1))
    assert isinstance(classify(TOPIC, batch.encode(), now=NOW, registry=REGISTRY), Accepted)


def test_readings_not_bound_to_the_topic_in_the_registry_are_refused() -> None:
    start = NOW - timedelta(hours=1)
    cases = {
        # Supplier X's gateway publishing supplier Y's meter on its own topic.
        Reason.METER_SITE_MISMATCH: (TOPIC, make_batch(0, start=start, meters=1, meter_prefix="y-meter")),
        Reason.UNREGISTERED_METER: (TOPIC, make_batch(0, start=start, meter_prefix="ghost")),
    }
    for reason, (topic, batch) in cases.items():
        payload = batch.encode()
        if reason is Reason.METER_SITE_MISMATCH:
            payload = payload.replace(b'"y-meter0"', b'"y-meter"')
        decided = classify(topic, payload, now=NOW, registry=REGISTRY)
        assert isinstance(decided, DeadLetter) and decided.reason is reason, reason
    sources = [
        ("unknown-supplier", "sz-plant-1", "gw-sz1-01"),
        ("acme-electronics", "unknown-site", "gw-sz1-01"),
        ("acme-electronics", "sz-plant-1", "unknown-gw"),
        ("acme-electronics", "other-site", "gw-other"),  # another supplier's site
        ("acme-electronics", "sz-plant-1", "gw-other"),  # another site's gateway
    ]
    for supplier, site, gateway in sources:
        batch = make_batch(0, start=start, supplier=supplier, site=site, gateway=gateway)
        topic = readings_topic(supplier, site, gateway)
        decided = classify(topic, batch.encode(), now=NOW, registry=REGISTRY)
        assert isinstance(decided, DeadLetter) and decided.reason is Reason.UNREGISTERED_GATEWAY, topic


def test_a_meter_registered_to_another_gateway_of_the_same_site_is_a_mismatch() -> None:
    registry = Registry(2, REGISTRY.sites, {**REGISTRY.gateways, "gw-sz1-02": "sz-plant-1"}, REGISTRY.meters)
    topic = readings_topic("acme-electronics", "sz-plant-1", "gw-sz1-02")
    batch = make_batch(0, start=NOW - timedelta(hours=1), gateway="gw-sz1-02")  # m0 is gw-sz1-01's
    decided = classify(topic, batch.encode(), now=NOW, registry=registry)
    assert isinstance(decided, DeadLetter) and decided.reason is Reason.METER_SITE_MISMATCH


# --- oversize: a bounded letter ---------------------------------------------------------------------


def test_an_oversized_message_becomes_a_bounded_letter_with_digest_and_prefix() -> None:
    payload = b'{"v": 1, "pad": "' + b"x" * 6_300_000 + b'"}'
    topic = "scopemeter/v1/" + "t" * 65_000
    decided = classify(topic, payload)
    assert isinstance(decided, DeadLetter) and decided.reason is Reason.TOO_LARGE
    encoded = decided.encode()
    assert len(encoded) <= MAX_LETTER_BYTES  # always one Kafka record, whatever the client sent
    assert decided.truncated and decided.payload_bytes == len(payload)
    assert decided.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert payload.startswith(decided.payload()) and len(decided.payload()) == KEEP_PAYLOAD_BYTES
    assert len(decided.key()) <= 4 * 512
