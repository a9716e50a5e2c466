"""The bridge's decision for one MQTT message: an accepted batch for ``readings.v1`` or a dead letter.

Pure and total — it never raises — so it can be fuzzed and so a hostile payload can never stop
the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

from pydantic import ValidationError

from edge.wire import PLAUSIBLE, check_batch, parse_readings_topic
from ingest.dlq import DeadLetter, Reason
from ingest.registry import Registry
from ops.settings import IngestSettings

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
_TS = itemgetter("ts")


@dataclass(frozen=True)
class Accepted:
    """A payload that is a valid ``edge.wire.Batch`` from the gateway its topic names; the bridge
    forwards the payload itself, so only what it routes and counts by is kept."""

    supplier: str
    site: str
    gateway: str
    seq: int
    readings: int


def classify(
    topic: str,
    payload: bytes,
    *,
    now: datetime | None = None,
    limits: IngestSettings | None = None,
    registry: Registry | None = None,
) -> Accepted | DeadLetter:
    """``now`` (aware) enables the plausibility window of ``limits``; without it only the wire
    contract's fixed [2000, 2100) window applies. With ``registry`` the topic's supplier, site and
    gateway and every reading's meter must be registered together (the bridge always passes it).

    Any refusal refuses the whole batch: the DLQ keeps its bytes for a replay once the cause is
    fixed, and a batch stays the unit the gateway numbered."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return DeadLetter.of(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}", topic, payload)
    try:
        claimed = parse_readings_topic(topic)
    except (ValueError, ValidationError) as exc:
        return DeadLetter.of(Reason.BAD_TOPIC, str(exc), topic, payload)
    try:
        batch = check_batch(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        reason = Reason.INVALID_JSON if errors and errors[0]["type"] == "json_invalid" else Reason.SCHEMA
        return DeadLetter.of(reason, str(errors)[:2000], topic, payload)
    except Exception as exc:  # never let a payload take the bridge down
        return DeadLetter.of(Reason.SCHEMA, f"{type(exc).__name__}: {exc}", topic, payload)
    supplier, site, gateway = batch["supplier"], batch["site"], batch["gateway"]
    if (supplier, site, gateway) != (claimed.supplier, claimed.site, claimed.gateway):
        detail = (
            f"topic claims {claimed.supplier}/{claimed.site}/{claimed.gateway}, "
            f"payload says {supplier}/{site}/{gateway}"
        )
        return DeadLetter.of(Reason.IDENTITY_MISMATCH, detail, topic, payload)
    if registry is not None and (problem := registry.source_problem(supplier, site, gateway)):
        return DeadLetter.of(Reason.UNREGISTERED_GATEWAY, problem, topic, payload)
    if now is not None:
        implausible = _implausible(batch["readings"], now, limits or IngestSettings())
        if implausible:
            return DeadLetter.of(Reason.IMPLAUSIBLE_TIMESTAMP, implausible, topic, payload)
    refused = _check_readings(batch["readings"], site, gateway, registry)
    if refused is not None:
        return DeadLetter.of(refused[0], refused[1], topic, payload)
    return Accepted(supplier, site, gateway, batch["seq"], len(batch["readings"]))


def _implausible(readings: list[dict[str, Any]], now: datetime, limits: IngestSettings) -> str:
    """Why the batch's timestamps cannot be a measurement (empty when they can). The whole batch is
    refused: one bad clock taints its neighbours, and the DLQ keeps the bytes for a replay."""
    # One sort of nearly ordered stamps compares each about once; min() and max() would compare
    # twice, and comparing aware datetimes with distinct tzinfo objects is what costs here.
    stamps = sorted(map(_TS, readings))
    lo, hi = stamps[0], stamps[-1]
    earliest = now - timedelta(seconds=limits.max_age_s)
    latest = now + timedelta(seconds=limits.max_future_s)
    if hi > latest:
        return f"reading at {hi.isoformat()} is after now + {limits.max_future_s:g} s ({latest.isoformat()})"
    if lo < earliest:
        return f"reading at {lo.isoformat()} is before now - {limits.max_age_s:g} s ({earliest.isoformat()})"
    return ""


_METER = itemgetter("meter_id")
_VALUE = itemgetter("value")
_KEY = itemgetter("meter_id", "quantity", "ts")
# Every quantity accepts [0, 1e11]: a batch whose values all lie there needs no per-reading look-up.
_ALWAYS_PLAUSIBLE = (max(lo for lo, _ in PLAUSIBLE.values()), min(hi for _, hi in PLAUSIBLE.values()))


def _check_readings(
    readings: list[dict[str, Any]], site: str, gateway: str, registry: Registry | None
) -> tuple[Reason, str] | None:
    """Why the batch holds a physically impossible value, a meter this gateway may not send, or a
    conflicting duplicate; None when it holds none. Each check has a C-speed pass for the common
    clean batch and looks reading by reading only when that pass finds something."""
    values = list(map(_VALUE, readings))
    if not _ALWAYS_PLAUSIBLE[0] <= min(values) <= max(values) <= _ALWAYS_PLAUSIBLE[1]:
        for i, r in enumerate(readings):
            lo, hi = PLAUSIBLE[r["quantity"]]
            if not lo <= r["value"] <= hi:
                return Reason.IMPLAUSIBLE_VALUE, (
                    f"readings[{i}]: {r['quantity']} {r['value']!r} of meter {r['meter_id']}"
                    f" is outside [{lo:g}, {hi:g}]"
                )
    if registry is not None:
        for meter in sorted(set(map(_METER, readings))):
            if (problem := registry.meter_problem(meter, site, gateway)) is not None:
                return problem
    if len(set(map(_KEY, readings))) < len(readings):  # some reading repeats: same value each time?
        seen: dict[tuple[str, str, datetime], float] = {}
        for i, r in enumerate(readings):
            first = seen.setdefault(_KEY(r), r["value"])
            if first != r["value"]:
                return Reason.CONFLICTING_DUPLICATE, (
                    f"readings[{i}]: meter {r['meter_id']} {r['quantity']} at {r['ts'].isoformat()}"
                    f" is both {first!r} and {r['value']!r}"
                )
    return None
