"""``scopemeter dlq list|show|replay``: read the dead-letter topic back, and replay letters once
their cause (a setting, a registry entry) is fixed.

Letters are read from ``kafka.dlq_topic`` from the beginning of every partition up to its end as of
the start of the command, without a consumer group (reading commits nothing and moves nobody's
offsets). A letter is named ``PARTITION:OFFSET``. Letters are parsed leniently (any ``reason``
string, unknown fields kept): a letter written by a newer or older bridge must still be listed.

Replay sends a letter's original bytes through the bridge's checks again (``ingest.admit``:
``ingest.validate.classify`` with the current settings' live window, then the fleet registry as
the DB holds it now) and produces what passes to ``readings.v1`` exactly as the bridge does (key =
site, headers gateway and seq), plus a ``replayed-from`` header. What still fails is reported with
its new reason and left where it is: the DLQ is append-only, and re-sending a letter that fails
again would only duplicate it. Replaying a letter twice is harmless: the writer drops the second
copy by the reading identity.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError

from ingest.admit import Refused, admit, load_registry
from ops.errors import UserError
from ops.kafka_client import client_kwargs
from ops.settings import KafkaSettings, Settings

UNREADABLE = "(unreadable letter)"


@dataclass(frozen=True)
class Letter:
    partition: int
    offset: int
    kafka_ts_ms: int
    reason: str
    detail: str
    topic: str
    received_at: str
    payload: bytes
    truncated: bool
    payload_bytes: int
    fields: dict[str, Any] = field(default_factory=dict)  # the record as stored

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"


def parse_letter(partition: int, offset: int, ts_ms: int, value: bytes | None) -> Letter:
    """A DLQ record as a ``Letter``; anything that is not one becomes an UNREADABLE letter that
    carries the record's bytes as its payload."""
    try:
        rec = json.loads(value or b"")
        if not isinstance(rec, dict):
            raise ValueError("not an object")
        payload = base64.b64decode(str(rec.get("payload_b64", "")), validate=True)
        return Letter(
            partition, offset, ts_ms,
            reason=str(rec.get("reason", UNREADABLE)),
            detail=str(rec.get("detail", "")),
            topic=str(rec.get("topic", "")),
            received_at=str(rec.get("received_at", "")),
            payload=payload,
            truncated=bool(rec.get("truncated", False)),
            payload_bytes=int(rec.get("payload_bytes", len(payload))),
            fields=rec,
        )  # fmt: skip
    except (ValueError, TypeError, binascii.Error) as exc:
        raw = value or b""
        return Letter(partition, offset, ts_ms, UNREADABLE, str(exc), "", "", raw, False, len(raw))


async def _records(kafka: KafkaSettings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` up to its end as of now, read without a consumer group."""
    bootstrap = kafka.bootstrap
    # Without a group, a subscribed consumer is assigned every partition of the topic by itself.
    consumer = AIOKafkaConsumer(
        topic,
        **client_kwargs(kafka),
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
    )
    try:
        await consumer.start()
    except KafkaConnectionError as exc:
        await consumer.stop()
        raise UserError(f"cannot reach Kafka at {bootstrap} (SCOPEMETER_KAFKA__BOOTSTRAP): {exc}") from None
    try:
        for _ in range(100):
            if consumer.assignment():
                break
            await asyncio.sleep(0.1)
        else:
            raise UserError(f"no topic {topic!r} on {bootstrap}")
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        pending = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=1000, max_records=5000)
            for tp, got in batches.items():
                records.extend(r for r in got if r.offset < ends[tp])
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))
    finally:
        await consumer.stop()


def read_records(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    return asyncio.run(_records(settings.kafka, topic))


def read_letters(
    settings: Settings,
    *,
    reasons: list[str] | None = None,
    topic_contains: str | None = None,
    ids: list[str] | None = None,
) -> list[Letter]:
    records = read_records(settings, settings.kafka.dlq_topic)
    letters = [parse_letter(r.partition, r.offset, r.timestamp, r.value) for r in records]
    return [
        x
        for x in letters
        if (not reasons or x.reason in reasons)
        and (topic_contains is None or topic_contains in x.topic)
        and (not ids or x.id in ids)
    ]


def find_letter(settings: Settings, letter_id: str) -> Letter:
    found = read_letters(settings, ids=[letter_id])
    if not found:
        raise UserError(f"no letter {letter_id!r} in {settings.kafka.dlq_topic} (see `scopemeter dlq list`)")
    return found[0]


def summarize(letters: list[Letter], *, limit: int = 20) -> str:
    counts = Counter(x.reason for x in letters)
    lines = [f"{len(letters)} letters"]
    lines += [f"  {reason:<24} {n:>8,}" for reason, n in counts.most_common()]
    if limit and letters:
        lines.append(f"newest {min(limit, len(letters))}:  ID  RECEIVED  REASON  MQTT TOPIC  DETAIL")
        for x in letters[-limit:]:
            lines.append(f"  {x.id:<10} {x.received_at[:19]}  {x.reason}  {x.topic}  {x.detail[:100]}")
    return "\n".join(lines)


def describe(x: Letter, *, show_bytes: int = 512) -> str:
    head = x.payload[:show_bytes]
    try:
        text = head.decode("utf-8")
        printable = text.isprintable() or all(c.isprintable() or c in "\n\r\t" for c in text)
    except UnicodeDecodeError:
        printable = False
    lines = [
        f"letter      {x.id}",
        f"reason      {x.reason}",
        f"detail      {x.detail}",
        f"MQTT topic  {x.topic}",
        f"received    {x.received_at}",
        f"payload     {x.payload_bytes:,} bytes"
        + (" (only a prefix was kept: not replayable)" if x.truncated else ""),
    ]
    if printable:
        lines.append(f"text        {head.decode('utf-8')!r}" + (" …" if len(x.payload) > len(head) else ""))
    lines.append("hex")
    for i in range(0, len(head), 16):
        chunk = head[i : i + 16]
        lines.append(
            f"  {i:08x}  {chunk.hex(' '):<47}  {''.join(chr(b) if 32 <= b < 127 else '.' for b in chunk)}"
        )
    return "\n".join(lines)


@dataclass
class ReplayResult:
    replayed: list[str] = field(default_factory=list)  # letter ids sent to readings.v1
    refused: dict[str, str] = field(default_factory=dict)  # letter id → "reason: detail" now

    def summary(self, *, dry_run: bool) -> str:
        verb = "would pass" if dry_run else "replayed to readings"
        lines = [f"{len(self.replayed)} {verb}, {len(self.refused)} still refused"]
        by_reason = Counter(v.split(":", 1)[0] for v in self.refused.values())
        lines += [f"  still {reason}: {n}" for reason, n in by_reason.most_common()]
        lines += [f"  {i}: {why[:200]}" for i, why in list(self.refused.items())[:20]]
        return "\n".join(lines)


async def replay(settings: Settings, letters: list[Letter], *, dry_run: bool = False) -> ReplayResult:
    with psycopg.connect(settings.db.dsn) as conn:
        registry = load_registry(conn)
    result = ReplayResult()
    producer: AIOKafkaProducer | None = None
    if not dry_run:
        producer = AIOKafkaProducer(
            **client_kwargs(settings.kafka),
            acks="all",
            enable_idempotence=True,
            max_request_size=settings.kafka.max_message_bytes,
        )
        await producer.start()
    try:
        for x in letters:
            if x.truncated or x.reason == UNREADABLE:
                result.refused[x.id] = f"{x.reason}: only a prefix of the payload was kept"
                continue
            now: datetime = settings.clock.now()
            decided = admit(x.topic, x.payload, registry, now=now, limits=settings.ingest)
            if isinstance(decided, Refused):
                result.refused[x.id] = f"{decided.reason}: {decided.detail}"
                continue
            result.replayed.append(x.id)
            if producer is not None:
                await producer.send_and_wait(
                    settings.kafka.readings_topic,
                    value=x.payload,
                    key=decided.site.encode(),
                    headers=[
                        ("gateway", decided.gateway.encode()),
                        ("seq", str(decided.seq).encode()),
                        ("replayed-from", f"{settings.kafka.dlq_topic}:{x.id}".encode()),
                    ],
                )
    finally:
        if producer is not None:
            await producer.stop()
    return result
