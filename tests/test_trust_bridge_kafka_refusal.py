"""A batch Kafka refuses as too large becomes a bounded dead letter instead of stopping the bridge.

Against the session's real Apache Kafka, both ways a record can be too large:
- the broker refuses it: the lane's readings topic keeps Apache Kafka's default ``max.message.bytes``
  (1,048,588 bytes) while the producer may send 8 MiB, and a valid batch of 10,000 readings is 1.3 MB;
- the producer refuses it before sending: its ``max_request_size`` is below the batch.
The letter lands in the real DLQ topic with the payload's digest, and the MQTT message would be acked.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edge.wire import readings_topic
from ingest.bridge import Incoming, _produce
from ingest.dlq import DeadLetter, Reason
from ingest.registry import MeterHome, Registry, RegistryCache
from ops.settings import Settings
from tests.helpers import make_batch

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # Apache Kafka's message.max.bytes default (KAFKA-4203)


async def _topics(bootstrap: str, readings: str, dlq: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        limit = {"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)}
        await admin.create_topics([NewTopic(readings, 1, 1, topic_configs=limit), NewTopic(dlq, 1, 1)])
    finally:
        await admin.close()


async def _letters(bootstrap: str, dlq: str) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(dlq, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[DeadLetter] = []
        for _ in range(50):
            for msgs in (await consumer.getmany(tp, timeout_ms=200)).values():
                got += [DeadLetter.model_validate_json(m.value or b"") for m in msgs]
            if got:
                break
        return got
    finally:
        await consumer.stop()


@pytest.mark.parametrize("refused_by", ["broker", "producer"])
def test_a_batch_kafka_refuses_as_too_large_is_dead_lettered(settings: Settings, refused_by: str) -> None:
    now = datetime.now(UTC)
    batch = make_batch(0, meters=100, steps=100, start=now - timedelta(hours=2), step=timedelta(seconds=30))
    payload = batch.encode()
    assert len(payload) > KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    tag = uuid.uuid4().hex[:8]
    topics = {"readings_topic": f"readings-big-{tag}", "dlq_topic": f"dlq-big-{tag}"}
    kafka = settings.kafka.model_copy(update=topics)
    s = settings.model_copy(update={"kafka": kafka})
    cache = RegistryCache("postgresql://unused@127.0.0.1:1/none", refresh_s=3600)
    meters = {f"m{i}": MeterHome(batch.site, batch.gateway) for i in range(100)}
    cache.registry = Registry(1, {batch.site: batch.supplier}, {batch.gateway: batch.site}, meters)
    cache._checked = float("inf")  # never look at the (absent) DB: the registry is given
    item = Incoming(readings_topic(batch.supplier, batch.site, batch.gateway), payload, 1, 1, 1)
    # The broker's refusal needs a producer allowed to send the batch; the producer's, one that is not.
    max_request = 8 * 1024 * 1024 if refused_by == "broker" else KAFKA_DEFAULT_MAX_MESSAGE_BYTES

    async def scenario() -> list[DeadLetter]:
        await _topics(kafka.bootstrap, kafka.readings_topic, kafka.dlq_topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True,
                                    max_request_size=max_request)  # fmt: skip
        await producer.start()
        try:
            fut = await _produce(producer, s, item, cache)
            await fut  # the letter's Kafka ack: from here the bridge acks the MQTT message
        finally:
            await producer.stop()
        return await _letters(kafka.bootstrap, kafka.dlq_topic)

    [letter] = asyncio.run(scenario())
    assert letter.reason is Reason.TOO_LARGE and letter.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert letter.truncated and letter.payload_bytes == len(payload)
