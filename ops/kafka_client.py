"""Kafka for every scopemeter process: how clients connect (one place for bootstrap, TLS and SASL)
and the group consumer the writer and the compute worker share.

``client_kwargs`` goes into every AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient.
``GroupConsumer`` owns what both consumers must get right the same way: offsets committed by hand
(after the DB commit, and only for partitions still held after a rebalance), the lag metric (one
definition: partition end minus the group's committed offset) and the broker's health.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata

from ops import metrics
from ops.settings import KafkaSettings

log = logging.getLogger("scopemeter.kafka")

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

# A partition no consumer is assigned: asking only for it polls (the group sees the member alive)
# without taking records that the caller would then have to hold or rewind.
_NOWHERE = TopicPartition("__scopemeter_keepalive__", 0)


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection keyword arguments for any aiokafka client, from the settings: bootstrap servers,
    and TLS (an SSL context verifying the brokers against ``ssl_cafile`` or the system store, with
    the client certificate when given) and SASL credentials as the security protocol asks."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
        if kafka.ssl_certfile is not None:
            keyfile = str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
            context.load_cert_chain(str(kafka.ssl_certfile), keyfile)
        kwargs["ssl_context"] = context
    if kafka.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = kafka.sasl_password
    return kwargs


async def watch_broker(
    fetch_metadata: Callable[[], Awaitable[object]],
    health: metrics.Health,
    *,
    interval: float = 5.0,
    timeout: float = 10.0,
) -> None:
    """Keep ``health``'s "kafka" entry true to the broker: a metadata request every ``interval``
    seconds (until cancelled). A client's own connection errors are retried inside aiokafka and
    never surface, so the health endpoint asks for itself."""
    while True:
        try:
            await asyncio.wait_for(fetch_metadata(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            health.down("kafka", f"no metadata from the brokers: {type(exc).__name__}: {exc}"[:300])
        else:
            health.up("kafka")
        await asyncio.sleep(interval)


def last_offsets(records: list[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit once ``records`` are done: one past the last record per partition."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for rec in records:
        tp = TopicPartition(rec.topic, rec.partition)
        if tp not in offsets or offsets[tp].offset <= rec.offset:
            offsets[tp] = OffsetAndMetadata(rec.offset + 1, "")
    return offsets


class _Rebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    """Logs what each rebalance takes and gives, and counts what it takes."""

    def __init__(self, owner: GroupConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            self.owner.revoked += len(revoked)
            log.info("%s: rebalance takes %s", self.owner.group, sorted(str(tp.partition) for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("%s: holds partitions %s", self.owner.group, sorted(tp.partition for tp in assigned))


class GroupConsumer:
    """One topic consumed in a group, offsets committed by the caller after its DB commit."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        group: str,
        *,
        health: metrics.Health | None = None,
        **options: Any,
    ) -> None:
        self.group = group
        self.health = health
        self.consumer = AIOKafkaConsumer(
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            **client_kwargs(kafka),
            **options,
        )
        self.consumer.subscribe([topic], listener=_Rebalances(self))
        # The group's committed offset per held partition: asked of the broker once, then ours.
        self._committed: dict[TopicPartition, int] = {}
        self._watch: asyncio.Task[None] | None = None
        # Partitions taken from this member by rebalances so far (each logged).
        self.revoked = 0

    async def start(self) -> None:
        await self.consumer.start()
        if self.health is not None:
            self.health.up("kafka")
            self._watch = asyncio.create_task(watch_broker(self.consumer.topics, self.health))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.consumer.stop()

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    async def getmany(self, timeout_ms: int, max_records: int) -> Records:
        records: Records = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return records

    async def keepalive(self) -> None:
        """Poll without taking records, while the caller is busy for long (a DB outage): the group
        would otherwise count this member dead after ``max_poll_interval_ms`` and rebalance."""
        await self.consumer.getmany(_NOWHERE, timeout_ms=0)

    async def commit(
        self, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Commit the offsets of partitions this consumer still holds; returns what was committed.

        Call it only after the DB commit of those records. A partition a rebalance took away in
        the meantime is skipped (aiokafka raises IllegalStateError for a partition not assigned
        and CommitFailedError when the group moved on): its next owner replays from the last
        committed offset, and the DB key (writer) or the idempotent recompute (compute) absorbs
        the replay. A consumer must not die for that."""
        held = self.consumer.assignment()
        mine = {tp: meta for tp, meta in offsets.items() if tp in held}
        if len(mine) < len(offsets):
            gone = sorted(str(tp) for tp in offsets.keys() - mine.keys())
            log.warning("%s: partitions %s moved before their offsets were committed (they are replayed)",
                        self.group, gone)  # fmt: skip
        if not mine:
            return {}
        try:
            await self.consumer.commit(mine)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("%s: offset commit failed after the DB commit (the records are replayed): %s",
                        self.group, exc)  # fmt: skip
            return {}
        self._committed.update({tp: meta.offset for tp, meta in mine.items()})
        return mine

    async def report_lag(self) -> None:
        """Set ``scopemeter_kafka_consumer_lag`` for every held partition whose end the fetcher has
        seen: the partition end minus the group's committed offset, i.e. the records a restart
        would have to (re)process. Records fetched but not yet committed count as lag."""
        held = self.consumer.assignment()
        for tp in list(self._committed):
            if tp not in held:  # another member may commit it meanwhile: ask again if it comes back
                del self._committed[tp]
        for tp in held:
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            if tp not in self._committed:
                self._committed[tp] = await self.consumer.committed(tp) or 0
            lag = max(0, end - self._committed[tp])
            labels = {"group": self.group, "topic": tp.topic, "partition": str(tp.partition)}
            metrics.KAFKA_CONSUMER_LAG.labels(**labels).set(lag)
