"""``scopemeter dlq list|show|replay`` against real Kafka, PostgreSQL and the real writer.

The letters are made by the bridge's own checks (``ingest.validate.classify`` through
``ingest.admit``, which adds the fleet-registry check this branch's bridge does not do yet) and
produced to a per-test DLQ topic in the bridge's record format.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

from edge.wire import readings_topic
from ingest.admit import Refused, admit, dead_letter, load_registry
from ingest.dlq_tools import describe, read_letters, replay, summarize
from ingest.writer import run_writer
from ops.settings import Settings
from tests.helpers import make_batch


def _lane(settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    kafka = settings.kafka.model_copy(
        update={"dlq_topic": f"dlq-{tag}", "readings_topic": f"readings-{tag}", "writer_group": f"w-{tag}",
                "committed_topic": f"committed-{tag}"}
    )  # fmt: skip
    return settings.model_copy(update={"kafka": kafka})


async def _produce(settings: Settings, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(settings.kafka.dlq_topic, v)
    finally:
        await producer.stop()


def _stored(dsn: str, meter_prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM readings WHERE meter_id LIKE %s", (meter_prefix + "%",)
        ).fetchone()
    return int(row[0]) if row else 0


async def _write_until(settings: Settings, meter_prefix: str, want: int) -> int:
    """Run the real writer until ``want`` readings of the meters are stored (or 60 s pass)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_writer(settings, stop, linger_s=0.1))
    try:
        for _ in range(600):
            if _stored(settings.db.dsn, meter_prefix) >= want or task.done():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a second copy, if any, would be written in this time too
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
    return _stored(settings.db.dsn, meter_prefix)


def test_list_show_and_replay_after_registering_the_meter(settings: Settings) -> None:
    lane = _lane(settings)
    tag = uuid.uuid4().hex[:8]
    supplier, site, gateway, prefix = f"sup-{tag}", f"site-{tag}", f"gw-{tag}", f"dm{tag}-"
    with psycopg.connect(lane.db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO suppliers VALUES (%s, %s)", (supplier, supplier))
        conn.execute("INSERT INTO sites (site_id, supplier_id, name, grid_region) VALUES (%s, %s, %s, 'CN')",
                     (site, supplier, site))  # fmt: skip
        conn.execute("INSERT INTO gateways VALUES (%s, %s)", (gateway, site))
        registry = load_registry(conn)
    now = datetime.now(UTC)
    batch = make_batch(1, meters=1, steps=4, supplier=supplier, site=site, gateway=gateway,
                       start=now - timedelta(hours=1), meter_prefix=prefix)  # fmt: skip
    topic = readings_topic(supplier, site, gateway)
    payload = batch.encode()
    refused = admit(topic, payload, registry, now=now, limits=lane.ingest)
    assert isinstance(refused, Refused) and refused.reason == "unregistered_meter"
    bad_json = admit(topic, b"{not json", registry, now=now, limits=lane.ingest)
    assert isinstance(bad_json, Refused) and bad_json.reason == "invalid_json"
    asyncio.run(_produce(lane, [
        dead_letter(refused.reason, refused.detail, topic, payload),
        dead_letter(bad_json.reason, bad_json.detail, topic, b"{not json"),
        b"\x00\x01 not a letter",
    ]))  # fmt: skip

    letters = read_letters(lane)
    assert sorted(x.reason for x in letters) == ["(unreadable letter)", "invalid_json", "unregistered_meter"]
    listing = summarize(letters)
    assert "3 letters" in listing and "unregistered_meter" in listing
    (mine,) = read_letters(lane, reasons=["unregistered_meter"])
    assert mine.payload == payload and mine.topic == topic
    shown = describe(mine, show_bytes=32)
    assert "reason      unregistered_meter" in shown and payload[:16].hex(" ") in shown

    # Not registered yet: replay refuses it again, sends nothing.
    before = asyncio.run(replay(lane, [mine]))
    assert before.replayed == [] and before.refused[mine.id].startswith("unregistered_meter")

    with psycopg.connect(lane.db.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO meters (meter_id, site_id, gateway_id, carrier, model)"
            " VALUES (%s, %s, %s, 'electricity', 'x')",
            (f"{prefix}0", site, gateway),
        )
    after = asyncio.run(replay(lane, read_letters(lane, reasons=["unregistered_meter"])))
    assert after.replayed == [mine.id]
    again = asyncio.run(replay(lane, read_letters(lane, reasons=["unregistered_meter"])))
    assert again.replayed == [mine.id]  # replayed twice on purpose: it must still land once
    everything = asyncio.run(replay(lane, read_letters(lane)))
    assert set(everything.refused) == {x.id for x in letters if x.reason != "unregistered_meter"}

    assert asyncio.run(_write_until(lane, prefix, len(batch.readings))) == len(batch.readings)


def test_cli_lists_counts_per_reason(settings: Settings, capsys: Any, monkeypatch: Any) -> None:
    from ops.cli import main

    lane = _lane(settings)
    asyncio.run(
        _produce(lane, [dead_letter("implausible_timestamp", "before now - 3.456e+07 s", "t/x", b"{}")])
    )
    (letter,) = read_letters(lane)
    monkeypatch.setenv("SCOPEMETER_KAFKA__BOOTSTRAP", lane.kafka.bootstrap)
    monkeypatch.setenv("SCOPEMETER_KAFKA__DLQ_TOPIC", lane.kafka.dlq_topic)
    assert main(["dlq", "list", "--reason", "implausible_timestamp"]) == 0
    out = capsys.readouterr().out
    assert "1 letters" in out and "implausible_timestamp" in out and letter.id in out
    assert main(["dlq", "list", "--reason", "schema"]) == 0
    assert "0 letters" in capsys.readouterr().out
    assert main(["dlq", "show", letter.id]) == 0
    assert "before now - 3.456e+07 s" in capsys.readouterr().out


def test_every_dlq_reason_is_documented_with_what_governs_it() -> None:
    """The README's DLQ table has a row, with a non-empty 'governed by', for every reason a letter
    can carry (``ingest.dlq.Reason``: the bridge's, the registry's, the Sparkplug host's and the
    writer's); the live window names its settings and their real defaults."""
    import re
    from pathlib import Path

    from ingest.dlq import Reason
    from ops.settings import IngestSettings

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", readme, re.M))
    for reason in (r.value for r in Reason):
        assert rows.get(reason, "").strip(), f"README: no DLQ row for {reason}"
    window = next(line for line in readme.splitlines() if line.startswith("| `implausible_timestamp`"))
    limits = IngestSettings()
    assert "SCOPEMETER_INGEST__MAX_AGE_S" in window and f"{limits.max_age_s:,.0f} s" in window
    assert "SCOPEMETER_INGEST__MAX_FUTURE_S" in window and f"{limits.max_future_s:,.0f} s" in window
    for reason in (Reason.UNREGISTERED_METER, Reason.METER_SITE_MISMATCH):
        assert "SCOPEMETER_CONFIG_DIR" in rows[reason]
