"""Hostile traffic through a real bridge and writer, and the /metrics each ingest process serves.

The bridge and the writer run as ``python -m ops.cli ingest bridge|writer`` subprocesses against the
session's Mosquitto, Kafka and PostgreSQL, on this test's own topics, group and client id. The
traffic is the regression corpus in tests/hostile/ (one file per attack that once stopped or fooled
the pipeline, with the dead-letter reason it must get) plus a seeded fuzz of the unit fuzz's
families; both processes must be alive afterwards and only the valid batch may reach ``readings``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import string
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from edge.wire import readings_topic
from ingest.dlq import MAX_LETTER_BYTES, DeadLetter, Reason
from ingest.loadgen import forget_session
from ingest.registry import register_gateway
from ops.bench_ingest import lane_settings, scrape
from ops.pipeline import _Proc, settings_env
from ops.procs import free_port
from ops.settings import Settings
from ops.stack import ensure_topics
from tests.helpers import make_batch

HOSTILE = 300
CORPUS = Path(__file__).parent / "hostile"


def corpus(tag: str, now: datetime) -> list[tuple[str, str, bytes, Reason]]:
    """(name, topic, payload, expected reason) of every file in tests/hostile/, filled in for this
    run's registered supplier ``sup-{tag}`` (site, gateway, meters) and another supplier's site."""
    ids = {
        "supplier": f"sup-{tag}", "site": f"site-{tag}", "gateway": f"gw-{tag}", "meter": f"{tag}-m0",
        "other_supplier": f"other-sup-{tag}", "other_site": f"other-site-{tag}", "other_meter": f"{tag}-y0",
        "ts": (now - timedelta(hours=1)).isoformat(), "next_year": (now + timedelta(days=365)).isoformat(),
    }  # fmt: skip
    own = (ids["supplier"], ids["site"], ids["gateway"])
    topics = {
        "own": readings_topic(*own),
        "unknown_gateway": readings_topic(own[0], own[1], own[2] + "-ghost"),
        "unknown_site": readings_topic(own[0], own[1] + "-ghost", own[2]),
        "unknown_supplier": readings_topic(own[0] + "-ghost", own[1], own[2]),
        "other_site": readings_topic(ids["other_supplier"], ids["other_site"], own[2]),
    }
    cases = []
    for path in sorted(CORPUS.glob("*.json")):
        case = json.loads(path.read_text())
        text = string.Template(case["payload"]).safe_substitute(ids, pad="")
        if "pad_to_bytes" in case:
            pad = "x" * (case["pad_to_bytes"] - len(text))
            text = string.Template(case["payload"]).safe_substitute(ids, pad=pad)
        topic = topics.get(case["topic"]) or string.Template(case["topic"]).substitute(ids)
        cases.append((path.stem, topic, text.encode(), Reason(case["reason"])))
    return cases


def hostile(rng: random.Random, valid: dict[str, object]) -> bytes:
    """One message the bridge must refuse, drawn from the same families as the unit fuzz."""
    raw = json.loads(json.dumps(valid))
    readings = raw["readings"]
    assert isinstance(readings, list)
    kind = rng.randrange(7)
    if kind == 0:
        raw[rng.choice(["v", "supplier", "site", "gateway", "seq", "sent_at", "readings"])] = rng.choice(
            [None, [1, 2], {"a": None}]
        )
    elif kind == 1:
        readings[rng.randrange(len(readings))][rng.choice(["meter_id", "quantity", "ts", "value"])] = None
    elif kind == 2:
        raw[rng.choice(["site", "gateway"])] = rng.choice(["a/b", "+", "#", "x" * 65, "\u202e", "\U0001f525"])
    elif kind == 3:
        return ("[" * rng.randrange(100, 50_000)).encode()
    elif kind == 4:
        raw["readings"] = readings[:1] * 10_001
    elif kind == 5:
        readings[0]["ts"] = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    else:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"{", b"\xff")
    return json.dumps(raw, ensure_ascii=rng.random() < 0.5).encode()


async def _dlq_letters(s: Settings, want: int, timeout: float) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(s.kafka.dlq_topic, p) for p in range(s.kafka.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + timeout
        while len(letters) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(*parts, timeout_ms=200)).values():
                letters += [DeadLetter.model_validate_json(r.value or b"") for r in records]
        return letters
    finally:
        await consumer.stop()


def test_hostile_messages_through_a_real_bridge_all_land_in_the_dlq(
    settings: Settings, tmp_path: Path
) -> None:
    tag = f"hostile-{uuid.uuid4().hex[:8]}"
    s = lane_settings(settings, tag)
    ensure_topics(s.kafka)
    supplier, site, gateway, meters = f"sup-{tag}", f"site-{tag}", f"gw-{tag}", f"{tag}-m"
    with psycopg.connect(s.db.dsn, autocommit=True) as conn:  # the bridge checks the registry
        register_gateway(conn, supplier, site, gateway, [f"{meters}0", f"{meters}1"])
        register_gateway(conn, f"other-sup-{tag}", f"other-site-{tag}", f"other-gw-{tag}", [f"{tag}-y0"])
    topic = readings_topic(supplier, site, gateway)
    now = datetime.now(UTC).replace(microsecond=0)
    template = make_batch(0, supplier=supplier, site=site, gateway=gateway, meter_prefix=meters, start=now)
    rng = random.Random(20261123)
    payloads = [hostile(rng, json.loads(template.encode())) for _ in range(HOSTILE)]
    cases = corpus(tag, now)
    valid = make_batch(
        1, supplier=supplier, site=site, gateway=gateway, meter_prefix=meters, start=now - timedelta(hours=1)
    )
    env = settings_env(s)
    bridge_port, writer_port = free_port(), free_port()
    bridge_id = f"{tag}-bridge"
    bridge_args = ["ingest", "bridge", "--metrics-port", str(bridge_port), "--client-id", bridge_id]
    bridge = _Proc("bridge", bridge_args, env, tmp_path)
    writer = _Proc("writer", ["ingest", "writer", "--metrics-port", str(writer_port)], env, tmp_path)
    try:
        bridge.wait_event("bridge.ready", 60)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{tag}-edge", clean_session=True)
        pub.connect(s.mqtt.host, s.mqtt.port)
        pub.loop_start()
        infos = [pub.publish(topic, p, qos=1) for p in payloads]
        infos += [pub.publish(case_topic, p, qos=1) for _, case_topic, p, _ in cases]
        infos.append(pub.publish(topic, valid.encode(), qos=1))
        for info in infos:
            info.wait_for_publish(30)
        pub.disconnect()
        pub.loop_stop()

        letters = asyncio.run(_dlq_letters(s, HOSTILE + len(cases), 60))
        deadline = time.monotonic() + 60
        with psycopg.connect(s.db.dsn, autocommit=True) as conn:
            while True:
                rows = conn.execute(
                    "SELECT meter_id, ts, value FROM readings WHERE meter_id LIKE %s ORDER BY 1, 2",
                    (meters + "%",),
                ).fetchall()
                if len(rows) >= len(valid.readings) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert bridge.popen.poll() is None and writer.popen.poll() is None  # both still alive
        bridge_dlq = sum(scrape(bridge_port, "scopemeter_bridge_dlq_total", reason=r.value) for r in Reason)
        accepted = scrape(bridge_port, "scopemeter_bridge_messages_total", outcome="accepted")
        in_flight = scrape(bridge_port, "scopemeter_bridge_in_flight_messages")
        inserted = scrape(writer_port, "scopemeter_writer_rows_total", outcome="inserted")
        with urllib.request.urlopen(f"http://127.0.0.1:{writer_port}/metrics", timeout=5) as response:
            lag_lines = [
                line for line in response.read().decode().splitlines()
                if line.startswith("scopemeter_kafka_consumer_lag{") and s.kafka.writer_group in line
            ]  # fmt: skip
    finally:
        bridge.stop()
        writer.stop()
        forget_session(s, bridge_id)

    assert len(letters) == HOSTILE + len(cases)
    sha = {letter.payload_sha256: letter for letter in letters}
    digests = [hashlib.sha256(p).hexdigest() for p in payloads]
    assert sorted(letter.payload_sha256 for letter in letters) == sorted(
        digests + [hashlib.sha256(p).hexdigest() for _, _, p, _ in cases]
    )  # each message exactly once
    for digest, payload in zip(digests, payloads, strict=True):
        assert payload.startswith(sha[digest].payload())  # whole, or its prefix when truncated
    assert {sha[d].reason for d in digests} >= {Reason.SCHEMA, Reason.INVALID_JSON,
                                                Reason.IMPLAUSIBLE_TIMESTAMP}  # fmt: skip
    got = {name: sha[hashlib.sha256(p).hexdigest()].reason for name, _, p, _ in cases}
    assert got == {name: reason for name, _, _, reason in cases}
    assert all(len(letter.encode()) <= MAX_LETTER_BYTES for letter in letters)  # incl. the 6.3 MB one
    assert rows == sorted((r.meter_id, r.ts, r.value) for r in valid.readings)  # the valid batch after them
    # What the processes' /metrics say matches what happened.
    assert (bridge_dlq, accepted, in_flight) == (HOSTILE + len(cases), 1, 0)
    assert inserted == len(valid.readings)
    assert len(lag_lines) == s.kafka.partitions  # one lag gauge per partition the writer owns
