"""The edge agent: poll meters on the shared clock's schedule, store each batch in the outbox,
publish it with MQTT QoS 1 and delete it only when the broker acknowledged it.

Threads: paho's network thread only forwards events (connect, PUBACK) into the asyncio loop, so the
outbox (SQLite) is touched from one thread only.  Paho keeps QoS 1 messages it was handed and
re-sends them after a reconnect; the outbox covers what paho cannot: a restart of the process.
At most ``max_inflight`` batches are handed to paho at once, so a long outage does not load the
whole outbox into memory, and at most ``backfill_batches_per_s`` per second, so the backlog of a
long outage reaches the broker at a bounded rate.

Before a reading is stored, its time stamp is checked (``edge.clock.ClockCheck``): readings with
an implausible gateway time are quarantined in the outbox file and counted, never published.
Reconnects back off exponentially with full jitter, so a fleet of gateways that lost the broker
together does not reconnect in lockstep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edge import metrics
from edge.clock import ClockCheck, measure_http_offset, now_ms, wall_seconds_until
from edge.config import EdgeConfig, load_device_maps
from edge.counters import CounterGuard
from edge.devices import DeviceMap
from edge.modbus import ModbusPoller, PollResult
from edge.mqtt_client import new_client
from edge.outbox import Outbox
from edge.wire import Batch, Quality, Reading, readings_topic, status_topic
from ops.settings import ClockSettings, MqttSettings, Settings

log = logging.getLogger("scopemeter.edge")


@dataclass
class RunReport:
    """What a run did; printed as the final JSON line of ``scopemeter edge run``."""

    gateway: str
    polls: int = 0
    missed_ticks: int = 0  # schedule ticks skipped because a poll overran
    failed_meter_reads: int = 0
    successful_meter_reads: int = 0  # meter reads that gave values (0 with polls > 0: all failed)
    readings_produced: int = 0
    batches_produced: int = 0
    readings_published: int = 0  # acknowledged by the broker during this run (incl. older batches)
    batches_published: int = 0
    pending_batches: int = 0  # still in the outbox at exit (sent on the next run)
    dropped_readings: int = 0  # dropped because the outbox was full
    quarantined_readings: int = 0  # kept back for an implausible time stamp
    flagged_readings: int = 0  # sent with quality bits (wrap, reset, replaced, out of range)
    clock_offset_s: float | None = None  # last measured reference - gateway clock
    first_seq: int | None = None
    last_seq: int | None = None

    def as_json(self) -> str:
        return json.dumps({"event": "edge.report", **asdict(self)})


def make_client(
    mqtt_settings: MqttSettings, config: EdgeConfig, backoff: Backoff | None = None
) -> mqtt.Client:
    """A paho client with the gateway's persistent session and its last will."""
    # The gateway id is the client id: a persistent session survives restarts.
    client = new_client(mqtt_settings, config.gateway)
    client.will_set(
        status_topic(config.supplier, config.site, config.gateway),
        json.dumps({"gateway": config.gateway, "state": "offline", "reason": "connection lost"}),
        qos=1,
        retain=True,
    )
    client.max_inflight_messages_set(config.max_inflight)
    client.max_queued_messages_set(0)
    backoff = backoff or Backoff()
    backoff.apply(client)
    failures = BrokerFailureLog(mqtt_settings.host, mqtt_settings.port)

    def on_connect_fail(c: mqtt.Client, _u: Any) -> None:
        failures.failed()
        backoff.apply(c)

    client.on_connect_fail = on_connect_fail
    return client


@dataclass
class BrokerFailureLog:
    """Logs why the broker cannot be reached (paho's connect-fail callback carries no cause):
    one TCP connect attempt names it -- refused, unreachable, unknown host.  Logged on the first
    failure and whenever the cause changes, then every ``every`` attempts."""

    host: str
    port: int
    every: int = 20
    attempts: int = 0
    last_cause: str = ""

    def failed(self) -> None:
        self.attempts += 1
        cause = broker_failure_cause(self.host, self.port)
        if cause != self.last_cause or self.attempts % self.every == 1:
            log.error(
                "MQTT broker %s:%d unreachable (attempt %d): %s", self.host, self.port, self.attempts, cause
            )
        self.last_cause = cause


def broker_failure_cause(host: str, port: int, timeout_s: float = 2.0) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return "TCP connects; the MQTT/TLS handshake failed (see the broker's log)"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2**self.attempt)
        self.attempt += 1
        return max(0.05, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0

    def apply(self, client: mqtt.Client) -> None:
        """Set paho's next reconnect wait to a fresh draw (call after each failed attempt).

        Paho waits min(previous wait * 2, max_delay); min = max = the draw bounds it by the draw.
        """
        delay = self.next()
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]


@dataclass
class RateLimit:
    """Token bucket: at most ``rate`` per second on average, bursts of at most ``burst``."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = -1.0
    stamp: float = 0.0

    def available(self) -> int:
        now = self.clock()
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n

    def wait_s(self) -> float:
        """Seconds until one more token is available."""
        return max(0.0, (1 - self.tokens) / self.rate)


def next_tick(now: datetime, interval_s: float) -> datetime:
    """The first instant after ``now`` on the grid of ``interval_s`` since the epoch."""
    ts = now.timestamp()
    return datetime.fromtimestamp(math.floor(ts / interval_s + 1) * interval_s, tz=now.tzinfo)


def make_batches(
    config: EdgeConfig, outbox: Outbox, readings: list[Reading], sent_at: datetime
) -> list[Batch]:
    """Store readings as one or more batches (at most ``max_readings_per_batch`` each)."""
    size = config.max_readings_per_batch
    return [
        outbox.enqueue(_builder(config, readings[i : i + size], sent_at))
        for i in range(0, len(readings), size)
    ]


def _builder(config: EdgeConfig, readings: list[Reading], sent_at: datetime) -> Callable[[int], Batch]:
    def build(seq: int) -> Batch:
        return Batch(
            supplier=config.supplier,
            site=config.site,
            gateway=config.gateway,
            seq=seq,
            sent_at=sent_at,
            readings=readings,
        )

    return build


@dataclass
class _Sender:
    """Hands outbox batches to paho and deletes them on PUBACK (all on the event loop thread)."""

    client: mqtt.Client
    outbox: Outbox
    topic: str
    window: int
    report: RunReport
    limit: RateLimit
    inflight: dict[int, tuple[int, int]] = field(default_factory=dict)  # mid -> (seq, n_readings)
    handed_up_to: int = -1  # highest seq handed to paho in this process
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _refill: asyncio.TimerHandle | None = None

    def fill(self) -> None:
        room = min(self.window - len(self.inflight), self.limit.available())
        if room <= 0:
            self._schedule_refill()
            return
        items = self.outbox.pending(after=self.handed_up_to, limit=room)
        self.limit.take(len(items))
        if len(items) == room:  # more may wait: come back when the rate allows
            self._schedule_refill()
        for item in items:
            info = self.client.publish(self.topic, item.payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.error("publish of seq %d refused by client: %s", item.seq, mqtt.error_string(info.rc))
                return  # retried on the next fill
            # NO_CONN: paho keeps the QoS 1 message and sends it once connected.
            self.inflight[info.mid] = (item.seq, item.n_readings)
            self.handed_up_to = item.seq

    def _schedule_refill(self) -> None:
        if self._refill is None or self._refill.cancelled() or self._refill.when() < self._loop().time():
            self._refill = self._loop().call_later(self.limit.wait_s() + 0.001, self.fill)

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def on_puback(self, mid: int, failed: bool) -> None:
        entry = self.inflight.pop(mid, None)
        if entry is None:
            return
        seq, n = entry
        if failed:  # MQTT 5 negative ack; not expected with 3.1.1, but never delete on it
            log.error("broker refused seq %d; it stays in the outbox", seq)
            return
        if self.outbox.ack(seq):
            self.report.batches_published += 1
            self.report.readings_published += n
            metrics.EDGE_PUBLISHED_BATCHES.inc()
        self.fill()
        self.changed.set()


async def run_agent(
    config: EdgeConfig,
    settings: Settings,
    *,
    polls: int | None = None,
    stop: asyncio.Event | None = None,
    drain_timeout_s: float = 30.0,
    maps: dict[str, DeviceMap] | None = None,
) -> RunReport:
    """Run the agent: ``polls`` polls (forever if None, until ``stop``), then wait up to
    ``drain_timeout_s`` wall seconds for every batch to be acknowledged, then disconnect cleanly."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    clock = settings.clock
    maps = maps if maps is not None else load_device_maps(config, settings.config_dir)
    report = RunReport(gateway=config.gateway)
    outbox = Outbox(
        config.resolved_outbox(settings.stack.state_dir),
        config.gateway,
        max_batches=config.outbox_max_batches,
    )
    guard = CounterGuard.loads(outbox.get_meta("counters"))
    clock_check = ClockCheck(config.max_clock_offset_s)
    clock_check.load(outbox.get_meta("last_ts"))
    poller = ModbusPoller(config, maps, clock, guard)
    backoff = Backoff()
    client = make_client(settings.mqtt, config, backoff)
    sender = _Sender(
        client,
        outbox,
        readings_topic(config.supplier, config.site, config.gateway),
        config.max_inflight,
        report,
        RateLimit(config.backfill_batches_per_s, burst=max(1.0, config.backfill_batches_per_s)),
    )
    status = status_topic(config.supplier, config.site, config.gateway)
    metrics.serve(config.metrics_port, settings.metrics.bind)
    for meter in config.meters:
        metrics.EDGE_METER_STATUS.labels(config.gateway, meter.id).state("unknown")
        metrics.EDGE_METER_FAILURES.labels(config.gateway, meter.id).set(0)
    metrics.EDGE_CLOCK_OFFSET.set(math.nan)
    _update_outbox_gauges(outbox)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("MQTT connect refused: %s", rc)
            metrics.HEALTH.down("mqtt", f"connect refused: {rc}")
            backoff.apply(c)
            return
        backoff.reset()
        metrics.EDGE_MQTT_CONNECTED.set(1)
        metrics.HEALTH.up("mqtt")
        log.info("MQTT connected to %s:%d", settings.mqtt.host, settings.mqtt.port)
        c.publish(status, json.dumps({"gateway": config.gateway, "state": "online"}), qos=1, retain=True)

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        loop.call_soon_threadsafe(sender.on_puback, mid, rc.is_failure)

    def on_disconnect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        metrics.EDGE_MQTT_CONNECTED.set(0)
        metrics.HEALTH.down("mqtt", f"disconnected: {rc}")
        if rc.is_failure:
            backoff.apply(c)
            log.warning("MQTT disconnected: %s (reconnecting with backoff)", rc)

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.connect_async(settings.mqtt.host, settings.mqtt.port, keepalive=settings.mqtt.keepalive)
    client.loop_start()
    offset_task = (
        asyncio.create_task(_watch_clock(config, clock, clock_check, report, stop))
        if config.clock_reference_url
        else None
    )
    try:
        sender.fill()  # batches left by an earlier run go first
        if offset_task is not None:  # the first measurement precedes the first poll
            await _measure_offset(config, clock, clock_check, report)
        await _poll_loop(config, clock, poller, outbox, sender, report, polls, stop, clock_check)
        await _drain(outbox, sender, drain_timeout_s)
        if client.is_connected():  # a clean exit says so; otherwise the broker publishes the will
            info = client.publish(
                status, json.dumps({"gateway": config.gateway, "state": "offline"}), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                await loop.run_in_executor(None, info.wait_for_publish, 5.0)
    finally:
        if offset_task is not None:
            offset_task.cancel()
        client.disconnect()
        client.loop_stop()
        poller.close()
        report.pending_batches = outbox.count()
        report.dropped_readings = outbox.dropped_readings
        outbox.close()
    log.info("%s", report.as_json())
    return report


async def _poll_loop(
    config: EdgeConfig,
    clock: ClockSettings,
    poller: ModbusPoller,
    outbox: Outbox,
    sender: _Sender,
    report: RunReport,
    polls: int | None,
    stop: asyncio.Event,
    clock_check: ClockCheck,
) -> None:
    """Poll on the grid of ``poll_interval_s`` of the shared (simulated) clock."""
    tick = next_tick(clock.now(), config.poll_interval_s)
    while (polls is None or report.polls < polls) and not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=wall_seconds_until(clock, tick))
            return  # stopped while waiting
        except TimeoutError:
            pass
        result = await poller.poll()
        report.polls += 1
        report.failed_meter_reads += len(result.failed_meters)
        report.successful_meter_reads += len(config.meters) - len(result.failed_meters)
        metrics.EDGE_POLLS.inc()
        _meter_metrics(config.gateway, poller, result)
        if result.quarantined:
            outbox.quarantine("outside_wire_window", result.quarantined)
            report.quarantined_readings += len(result.quarantined)
        readings = _screen(result.readings, clock_check, outbox, report)
        if readings:
            for batch in make_batches(config, outbox, readings, now_ms(clock)):
                report.batches_produced += 1
                report.readings_produced += len(batch.readings)
                report.first_seq = batch.seq if report.first_seq is None else report.first_seq
                report.last_seq = batch.seq
            metrics.EDGE_READINGS.inc(len(readings))
            sender.fill()
        # After the batch is stored: a crash in between re-checks against older state (harmless).
        outbox.set_meta("counters", poller.guard.dumps())
        outbox.set_meta("last_ts", clock_check.dumps())
        _update_outbox_gauges(outbox)
        following = tick + timedelta(seconds=config.poll_interval_s)
        now = clock.now()
        if following <= now:  # the poll overran: skip to the next future tick
            nxt = next_tick(now, config.poll_interval_s)
            report.missed_ticks += round((nxt - following).total_seconds() / config.poll_interval_s)
            following = nxt
        tick = following


def _meter_metrics(gateway: str, poller: ModbusPoller, result: PollResult) -> None:
    for (meter, kind), n in result.meter_errors.items():
        metrics.EDGE_POLL_ERRORS.labels(gateway, meter, kind).inc(n)
    for meter, state in poller.states.items():
        metrics.EDGE_METER_STATUS.labels(gateway, meter).state(state.status)
        metrics.EDGE_METER_FAILURES.labels(gateway, meter).set(state.consecutive_failures)
        if state.last_success is not None:
            metrics.EDGE_METER_LAST_SUCCESS.labels(gateway, meter).set(state.last_success)


def _screen(readings: list[Reading], check: ClockCheck, outbox: Outbox, report: RunReport) -> list[Reading]:
    """Readings that may be sent; the others are quarantined by reason, and flags are counted."""
    keep: list[Reading] = []
    held: dict[str, list[dict[str, object]]] = {}
    for r in readings:
        reason = check.verdict(r.meter_id, r.ts)
        if reason is not None:
            held.setdefault(reason, []).append(r.model_dump(mode="json"))
            continue
        keep.append(r)
        if r.quality:
            report.flagged_readings += 1
            for flag in Quality(r.quality):
                metrics.EDGE_FLAGGED_READINGS.labels(flag.name or str(flag.value)).inc()
    for r in keep:
        check.accept(r.meter_id, r.ts)
    for reason, items in held.items():
        log.warning("quarantined %d readings: %s", len(items), reason)
        outbox.quarantine(reason, items)
        report.quarantined_readings += len(items)
    return keep


def _update_outbox_gauges(outbox: Outbox) -> None:
    metrics.EDGE_OUTBOX_BATCHES.set(outbox.count())
    metrics.EDGE_OUTBOX_OLDEST_AGE.set(outbox.oldest_age_s())


async def _measure_offset(
    config: EdgeConfig, clock: ClockSettings, check: ClockCheck, report: RunReport
) -> None:
    assert config.clock_reference_url is not None
    loop = asyncio.get_running_loop()
    try:
        offset = await loop.run_in_executor(None, measure_http_offset, config.clock_reference_url, clock.now)
    except (OSError, ValueError) as exc:
        log.warning("clock reference %s: %s", config.clock_reference_url, exc)
        return
    check.offset_s = report.clock_offset_s = offset
    metrics.EDGE_CLOCK_OFFSET.set(offset)
    if abs(offset) > config.max_clock_offset_s:
        log.error("gateway clock is off by %.1f s: readings are quarantined until it is fixed", offset)


async def _watch_clock(
    config: EdgeConfig, clock: ClockSettings, check: ClockCheck, report: RunReport, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.clock_check_interval_s)
        if not stop.is_set():
            await _measure_offset(config, clock, check, report)


async def _drain(outbox: Outbox, sender: _Sender, timeout_s: float) -> None:
    """Wait until every batch in the outbox was acknowledged, or the timeout passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while outbox.count() > 0:
        sender.fill()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning(
                "%d batches not acknowledged in %.1f s; they stay in the outbox", outbox.count(), timeout_s
            )
            return
        sender.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sender.changed.wait(), timeout=remaining)
    _update_outbox_gauges(outbox)
