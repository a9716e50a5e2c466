"""What the bridge hands Kafka for one MQTT message (``ingest.bridge._produce``), in-process, with
the fleet registry in a real PostgreSQL:

- an accepted batch goes to the readings topic as received, keyed by its site, with its gateway
  and sequence number as headers, and is counted; the future returned is the record's Kafka ack;
- a batch refused because of the fleet (unknown gateway, unknown meter, meter of another gateway)
  is checked once more against a freshly loaded registry first: a fleet change made a moment ago
  must not cost a batch; within the same second the registry is not asked again;
- anything else becomes a dead letter on the DLQ topic.

The producer is a recording stand-in (``tests.test_bridge_acks.HeldKafka``): these tests check what
the bridge asks Kafka to write and when it treats the record as acknowledged, which a broker only
passes on. The same records go through a real broker in tests/test_ingest.py and
tests/test_trust_bridge_kafka_refusal.py.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from edge.wire import readings_topic
from ingest.bridge import Incoming, _produce, _refused_by_kafka
from ingest.dlq import DeadLetter, Reason
from ingest.registry import MeterHome, Registry, RegistryCache, register_gateway
from ops import metrics
from ops.procs import ManagedProcess
from ops.settings import ClockSettings, DbSettings, IngestSettings, KafkaSettings, Settings
from tests.helpers import make_batch
from tests.test_bridge_acks import HeldKafka
from tests.test_trust_bridge_kafka_refusal import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, _letters, _topics


class Recorder(HeldKafka):
    """``HeldKafka`` that also keeps each send's headers."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[object] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: object = None) -> asyncio.Future[object]:  # fmt: skip
        self.headers.append(headers)
        return await super().send(topic, value, key)


class Fleet:
    def __init__(self, dsn: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.dsn, self.tag = dsn, tag
        self.supplier, self.site, self.gateway = f"sup-{tag}", f"site-{tag}", f"gw-{tag}"
        self.prefix = f"p{tag}-"
        self.settings = Settings(db=DbSettings(dsn=dsn))

    def register(self, gateway: str, meters: list[str]) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            register_gateway(conn, self.supplier, self.site, gateway, meters)

    def item(self, seq: int, gateway: str | None = None) -> Incoming:
        gateway = gateway or self.gateway
        start = datetime.now(UTC) - timedelta(hours=1)
        batch = make_batch(seq, supplier=self.supplier, site=self.site, gateway=gateway, start=start,
                           meter_prefix=self.prefix)  # fmt: skip
        return Incoming(readings_topic(self.supplier, self.site, gateway), batch.encode(), 1, 1, 1)


@pytest.fixture
def fleet(pg_db: str) -> Fleet:
    return Fleet(pg_db)


def _sample(name: str, **labels: str) -> float:
    return metrics.BRIDGE.get_sample_value(name, labels) or 0.0


def test_an_accepted_batch_goes_to_the_readings_topic_keyed_by_site_and_is_acked_by_kafka(
    fleet: Fleet,
) -> None:
    fleet.register(fleet.gateway, [f"{fleet.prefix}0", f"{fleet.prefix}1"])
    cache = RegistryCache(fleet.dsn, refresh_s=3600)
    cache.refresh()
    item = fleet.item(7)
    accepted = _sample("scopemeter_bridge_messages_total", outcome="accepted")
    readings = _sample("scopemeter_bridge_readings_total")
    before = time.time()

    async def scenario() -> None:
        kafka = Recorder()
        fut = await _produce(kafka, fleet.settings, item, cache)
        ((topic, value, sent),) = kafka.sent
        assert (topic, value) == (fleet.settings.kafka.readings_topic, item.payload)
        assert kafka.keys == [fleet.site.encode()]
        assert kafka.headers == [[("gateway", fleet.gateway.encode()), ("seq", b"7")]]
        await asyncio.sleep(0)
        assert not fut.done()  # not acknowledged before Kafka acknowledged the record
        sent.set_result("record metadata")
        assert await fut == "record metadata"

    asyncio.run(scenario())
    assert _sample("scopemeter_bridge_messages_total", outcome="accepted") == accepted + 1
    assert _sample("scopemeter_bridge_readings_total") == readings + 6
    seen = _sample("scopemeter_gateway_last_seen_timestamp_seconds", site=fleet.site, gateway=fleet.gateway)
    assert seen >= before


def test_a_kafka_failure_of_an_accepted_batch_is_its_ack(fleet: Fleet) -> None:
    """Kafka refusing the record for another reason than its size: the returned future fails too,
    so the bridge does not PUBACK (and stops, see test_bridge_acks)."""
    fleet.register(fleet.gateway, [f"{fleet.prefix}0", f"{fleet.prefix}1"])
    cache = RegistryCache(fleet.dsn, refresh_s=3600)
    cache.refresh()

    async def scenario() -> None:
        kafka = Recorder()
        fut = await _produce(kafka, fleet.settings, fleet.item(1), cache)
        kafka.sent[0][2].set_exception(OSError("broker gone"))
        with pytest.raises(OSError, match="broker gone"):
            await fut
        assert len(kafka.sent) == 1  # no dead letter for it

    asyncio.run(scenario())


@pytest.mark.parametrize("change", ["new gateway", "new meter", "meter moved to this gateway"])
def test_a_fleet_change_a_moment_ago_is_seen_before_a_batch_is_refused(fleet: Fleet, change: str) -> None:
    other = f"gw2-{fleet.tag}"
    meters = [f"{fleet.prefix}0", f"{fleet.prefix}1"]
    if change == "new gateway":
        fleet.register(other, [])  # the site exists; the batch's gateway does not yet
    elif change == "new meter":
        fleet.register(fleet.gateway, meters[:1])
    else:
        fleet.register(fleet.gateway, meters[:1])
        fleet.register(other, meters[1:])  # meter 1 belongs to the other gateway of the site
    cache = RegistryCache(fleet.dsn, refresh_s=3600)
    cache.refresh()
    item = fleet.item(1)

    async def produce() -> list[tuple[str, bytes]]:
        kafka = Recorder()
        await _produce(kafka, fleet.settings, item, cache)
        return [(topic, value) for topic, value, _fut in kafka.sent]

    # Refused as it stands (the registry was looked at just now: not asked again this second).
    (topic, value), *_ = asyncio.run(produce())
    assert topic == fleet.settings.kafka.dlq_topic
    refused = DeadLetter.model_validate_json(value)
    want = {"new gateway": Reason.UNREGISTERED_GATEWAY, "new meter": Reason.UNREGISTERED_METER,
            "meter moved to this gateway": Reason.METER_SITE_MISMATCH}[change]  # fmt: skip
    assert refused.reason is want
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        if change == "new gateway":
            register_gateway(conn, fleet.supplier, fleet.site, fleet.gateway, meters)
        elif change == "new meter":
            register_gateway(conn, fleet.supplier, fleet.site, fleet.gateway, meters[1:])
        else:
            conn.execute("UPDATE meters SET gateway_id = %s WHERE meter_id = %s", (fleet.gateway, meters[1]))
    cache._checked -= 1.0  # the last look at the registry is now a second old (instead of waiting)
    assert asyncio.run(produce()) == [(fleet.settings.kafka.readings_topic, item.payload)]


def test_a_batch_refused_for_another_reason_does_not_reload_the_registry(fleet: Fleet) -> None:
    fleet.register(fleet.gateway, [f"{fleet.prefix}0", f"{fleet.prefix}1"])
    cache = RegistryCache(fleet.dsn, refresh_s=3600)
    cache.refresh()
    held = cache.registry
    cache._checked -= 1.0  # a reload would be allowed
    fleet.register(f"gw3-{fleet.tag}", [])  # and the fleet moved on
    bad = Incoming(fleet.item(1).topic, b"{not json", 1, 1, 1)
    dlq = _sample("scopemeter_bridge_messages_total", outcome="dlq")

    async def scenario() -> None:
        kafka = Recorder()
        await _produce(kafka, fleet.settings, bad, cache)
        ((topic, value, _fut),) = kafka.sent
        assert topic == fleet.settings.kafka.dlq_topic
        assert DeadLetter.model_validate_json(value).reason is Reason.INVALID_JSON

    asyncio.run(scenario())
    assert cache.registry is held
    assert _sample("scopemeter_bridge_messages_total", outcome="dlq") == dlq + 1


def test_a_record_kafka_refuses_as_too_large_is_a_bounded_letter_naming_the_error() -> None:
    payload = b"x" * 5000
    exc = MessageSizeTooLargeError("the message is 5000 bytes")
    letter = _refused_by_kafka(Incoming("scopemeter/v1/a/b/c/readings", payload, 1, 1, 1), exc)
    assert letter.reason is Reason.TOO_LARGE
    assert letter.detail == f"Kafka refused the record: {exc!r}"
    assert letter.topic == "scopemeter/v1/a/b/c/readings"
    assert letter.payload_bytes == 5000


@pytest.mark.parametrize("refused_by", ["broker", "producer"])
def test_the_letter_of_a_batch_kafka_refuses_as_too_large_names_the_error(
    kafka: ManagedProcess, refused_by: str
) -> None:
    """Against the real broker (its topic keeps Apache Kafka's 1 MB limit; the producer may send
    8 MiB, or only 1 MB): the too-large letter says what Kafka answered."""
    now = datetime.now(UTC)
    batch = make_batch(0, meters=100, steps=100, start=now - timedelta(hours=2), step=timedelta(seconds=30))
    payload = batch.encode()
    assert len(payload) > KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    tag = uuid.uuid4().hex[:8]
    k = KafkaSettings(bootstrap=f"{kafka.host}:{kafka.port}")
    k = k.model_copy(update={"readings_topic": f"readings-big-{tag}", "dlq_topic": f"dlq-big-{tag}"})
    s = Settings(kafka=k)
    cache = RegistryCache("postgresql://unused@127.0.0.1:1/none", refresh_s=3600)
    meters = {f"m{i}": MeterHome(batch.site, batch.gateway) for i in range(100)}
    cache.registry = Registry(1, {batch.site: batch.supplier}, {batch.gateway: batch.site}, meters)
    cache._checked = float("inf")  # never look at the (absent) DB: the registry is given
    item = Incoming(readings_topic(batch.supplier, batch.site, batch.gateway), payload, 1, 1, 1)

    async def scenario() -> list[DeadLetter]:
        await _topics(k.bootstrap, k.readings_topic, k.dlq_topic)
        limit = 8 * 1024 * 1024 if refused_by == "broker" else KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        producer = AIOKafkaProducer(bootstrap_servers=k.bootstrap, max_request_size=limit)
        await producer.start()
        try:
            await (await _produce(producer, s, item, cache))
        finally:
            await producer.stop()
        return await _letters(k.bootstrap, k.dlq_topic)

    [letter] = asyncio.run(scenario())
    assert letter.reason is Reason.TOO_LARGE
    assert re.fullmatch(r"Kafka refused the record: \w+Error\(.*\)", letter.detail), letter.detail


def test_an_unrelated_fleet_change_does_not_let_an_unregistered_gateway_in(fleet: Fleet) -> None:
    """The registry is read again (it changed), but not for this gateway: still a dead letter."""
    fleet.register(f"gw2-{fleet.tag}", [f"{fleet.prefix}0", f"{fleet.prefix}1"])
    cache = RegistryCache(fleet.dsn, refresh_s=3600)
    cache.refresh()
    held = cache.registry
    fleet.register(f"gw3-{fleet.tag}", [])  # a change elsewhere in the fleet
    cache._checked -= 1.0  # the last look at the registry is now a second old (instead of waiting)

    async def scenario() -> None:
        kafka = Recorder()
        await _produce(kafka, fleet.settings, fleet.item(1), cache)
        ((topic, value, _fut),) = kafka.sent
        assert topic == fleet.settings.kafka.dlq_topic
        assert DeadLetter.model_validate_json(value).reason is Reason.UNREGISTERED_GATEWAY

    asyncio.run(scenario())
    assert cache.registry is not held  # it was read again


def test_timestamps_are_judged_by_the_settings_clock_and_limits(fleet: Fleet) -> None:
    """The bridge's 'now' is the settings' clock (a simulation runs years ahead) and its limits are
    the settings' (here: nothing older than 10 days)."""
    fleet.register(fleet.gateway, [f"{fleet.prefix}0", f"{fleet.prefix}1"])
    cache = RegistryCache(fleet.dsn, refresh_s=3600)
    cache.refresh()
    sim_now = datetime(2031, 1, 1, tzinfo=UTC)
    settings = fleet.settings.model_copy(
        update={"clock": ClockSettings(sim_start=sim_now), "ingest": IngestSettings(max_age_s=10 * 86_400.0)}
    )

    def item(start: datetime) -> Incoming:
        batch = make_batch(1, supplier=fleet.supplier, site=fleet.site, gateway=fleet.gateway, start=start,
                           meter_prefix=fleet.prefix)  # fmt: skip
        return Incoming(readings_topic(fleet.supplier, fleet.site, fleet.gateway), batch.encode(), 1, 1, 1)

    async def decide(it: Incoming) -> tuple[str, Reason | None]:
        kafka = Recorder()
        await _produce(kafka, settings, it, cache)
        ((topic, value, _fut),) = kafka.sent
        if topic == settings.kafka.dlq_topic:
            return topic, DeadLetter.model_validate_json(value).reason
        return topic, None

    # An hour before the simulated now: plausible (by the wall clock it is years ahead).
    assert asyncio.run(decide(item(sim_now - timedelta(hours=1)))) == (settings.kafka.readings_topic, None)
    # Twelve days before it: older than this deployment's limit (the default would take it).
    old = asyncio.run(decide(item(sim_now - timedelta(days=12))))
    assert old == (settings.kafka.dlq_topic, Reason.IMPLAUSIBLE_TIMESTAMP)
