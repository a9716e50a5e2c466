"""A batch Kafka refuses as too large becomes a bounded dead letter instead of stopping the bridge.

Uses a stand-in producer: the fault (a readings topic keeping Apache Kafka's 1 MB default
``max.message.bytes`` refusing a valid 1.3 MB batch of 10,000 readings) cannot be produced by the
suite's broker, which accepts records of any size (checked: 12 MB accepted).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from edge.wire import readings_topic
from ingest.bridge import Incoming, _produce
from ingest.dlq import DeadLetter, Reason
from ingest.registry import MeterHome, Registry, RegistryCache
from ops.settings import Settings
from tests.helpers import make_batch


class StandInProducer:
    """Refuses every readings record the way the given error says; takes dead letters."""

    def __init__(self, refusal: BaseException, *, at_send: bool) -> None:
        self.refusal, self.at_send = refusal, at_send
        self.letters: list[DeadLetter] = []

    async def send(self, topic: str, value: bytes, key: bytes, headers: Any = None) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if topic == "readings.v1":
            if self.at_send:
                raise self.refusal
            fut.set_exception(self.refusal)
        else:
            self.letters.append(DeadLetter.model_validate_json(value))
            fut.set_result("letter stored")
        return fut


@pytest.mark.parametrize(
    ("refusal", "at_send"),
    [(RecordTooLargeError("broker: record too large"), False), (MessageSizeTooLargeError("client"), True)],
)
def test_a_batch_kafka_refuses_as_too_large_is_dead_lettered(refusal: BaseException, at_send: bool) -> None:
    now = datetime.now(UTC)
    batch = make_batch(0, meters=100, steps=100, start=now - timedelta(hours=2), step=timedelta(seconds=30))
    payload = batch.encode()
    assert len(payload) > 1_048_588  # past Apache Kafka's default message.max.bytes
    cache = RegistryCache("postgresql://unused@127.0.0.1:1/none", refresh_s=3600)
    meters = {f"m{i}": MeterHome(batch.site, batch.gateway) for i in range(100)}
    cache.registry = Registry(1, {batch.site: batch.supplier}, {batch.gateway: batch.site}, meters)
    cache._checked = float("inf")  # never look at the (absent) DB
    producer = StandInProducer(refusal, at_send=at_send)
    item = Incoming(readings_topic(batch.supplier, batch.site, batch.gateway), payload, 1, 1, 1)

    async def scenario() -> object:
        fut = await _produce(producer, Settings(), item, cache)  # type: ignore[arg-type]
        return await fut

    assert asyncio.run(scenario()) == "letter stored"  # the MQTT message gets acked after the letter
    [letter] = producer.letters
    assert letter.reason is Reason.TOO_LARGE and letter.payload_sha256 == hashlib.sha256(payload).hexdigest()
