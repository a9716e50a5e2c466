"""A load generator that publishes like a fleet of edge gateways, for the ingest benchmark and the
chaos test.

One MQTT client per site (one gateway each), persistent session (clean_session=False), QoS 1. paho
keeps every message until its PUBACK and re-sends the un-acknowledged ones after each reconnect
(``_messages_reconnect_reset_out``): the in-memory equivalent of the edge agent's SQLite outbox, as
long as this process lives. Payloads are written as the canonical JSON of ``edge.wire.Batch`` without
building pydantic models (the generator must not be the bottleneck it measures).

Every reading is a pure function of (site, meter, round), so the expected table contents can be
recomputed exactly: ``expected()`` lists every (meter_id, ts, value) published.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.wire import Quantity, readings_topic
from ingest.writer import Row
from ops.settings import Settings

QUANTITY = Quantity.ENERGY_IMPORT_KWH.value


@dataclass(frozen=True)
class Fleet:
    """``sites`` sites of ``meters`` meters; ids start with ``prefix`` so runs never collide."""

    prefix: str
    sites: int
    meters: int
    supplier: str = "loadgen"

    @classmethod
    def fresh(cls, sites: int, meters: int, label: str = "lg") -> Fleet:
        return cls(f"{label}{uuid.uuid4().hex[:10]}", sites, meters)

    def site(self, s: int) -> str:
        return f"{self.prefix}-s{s}"

    def gateway(self, s: int) -> str:
        return f"{self.prefix}-g{s}"

    def meter(self, s: int, m: int) -> str:
        return f"{self.prefix}-s{s}-m{m}"

    def topic(self, s: int) -> str:
        return readings_topic(self.supplier, self.site(s), self.gateway(s))

    @property
    def client_ids(self) -> list[str]:
        return [f"{self.prefix}-edge{s}" for s in range(self.sites)]

    def register(self, dsn: str) -> None:
        """Put the fleet in the registry: the bridge refuses readings of unregistered meters."""
        import psycopg

        from ingest.registry import register_gateway

        with psycopg.connect(dsn, autocommit=True) as conn:
            for s in range(self.sites):
                meters = [self.meter(s, m) for m in range(self.meters)]
                register_gateway(conn, self.supplier, self.site(s), self.gateway(s), meters)


def forget_session(settings: Settings, client_id: str) -> None:
    """A clean-session connect drops a persistent session, so no broker queue is left growing."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port)
        client.disconnect()
    except OSError:
        pass


def value_of(s: int, m: int, step: int) -> float:
    """A cumulative counter: strictly increasing per meter, distinct per meter and site."""
    return 1000.0 * s + m + 0.25 * step


def iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


@dataclass
class LoadGenerator:
    """Publishes rounds: one batch per site holding ``steps`` timestamps of all its meters."""

    settings: Settings
    fleet: Fleet
    steps: int = 1
    spacing: timedelta = timedelta(seconds=1)
    clients: list[mqtt.Client] = field(default_factory=list)
    # Per round: the timestamp of its first step.
    rounds: list[datetime] = field(default_factory=list)
    published_at: list[float] = field(default_factory=list)
    # (client index, mid) published and not yet seen PUBACKed; PUBACKs seen, not yet matched.
    _pending: set[tuple[int, int]] = field(default_factory=set)
    _acked: set[tuple[int, int]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _encoded: int = 0  # rounds encoded and not yet published

    def connect(self, timeout: float = 30.0) -> None:
        from ops.mqtt_auth import auth_files

        connected = [threading.Event() for _ in range(self.fleet.sites)]
        creds = auth_files(self.settings.stack.state_dir).credentials()  # the stack's closed broker
        for s, client_id in enumerate(self.fleet.client_ids):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
            if (gateway := self.fleet.gateway(s)) in creds:
                client.username_pw_set(gateway, creds[gateway])
            client.max_inflight_messages_set(100)
            client.max_queued_messages_set(0)  # never drop: everything waits for its PUBACK
            client.reconnect_delay_set(min_delay=1, max_delay=2)
            client.on_connect = lambda *_a, ev=connected[s]: ev.set()
            client.on_publish = lambda _c, _u, mid, *_a, s=s: self._on_puback(s, mid)
            client.connect_async(self.settings.mqtt.host, self.settings.mqtt.port, keepalive=10)
            client.loop_start()
            self.clients.append(client)
        for ev in connected:
            if not ev.wait(timeout):
                raise TimeoutError("a load generator client got no CONNACK")

    def close(self, *, forget_sessions: bool = True) -> None:
        """Disconnect; ``forget_sessions`` also removes the persistent sessions from the broker."""
        for client in self.clients:
            client.disconnect()
            client.loop_stop()
        self.clients.clear()
        if forget_sessions:
            for client_id in self.fleet.client_ids:
                forget_session(self.settings, client_id)

    def encode_round(self, start: datetime) -> list[bytes]:
        """The payloads of the next round (one per site), for ``publish_round``: a benchmark encodes
        before its clock starts, since real gateways spend their own CPU on it."""
        r = len(self.rounds) + self._encoded
        self._encoded += 1
        sent_at = iso(datetime.now(UTC))
        payloads = []
        for s in range(self.fleet.sites):
            readings = [
                {"meter_id": self.fleet.meter(s, m), "quantity": QUANTITY,
                 "ts": iso(start + k * self.spacing), "value": value_of(s, m, r * self.steps + k),
                 "quality": 0}
                for k in range(self.steps)
                for m in range(self.fleet.meters)
            ]  # fmt: skip
            payload = {
                "v": 1, "supplier": self.fleet.supplier, "site": self.fleet.site(s),
                "gateway": self.fleet.gateway(s), "seq": r, "sent_at": sent_at, "readings": readings,
            }  # fmt: skip
            payloads.append(json.dumps(payload).encode())
        return payloads

    def publish_round(self, start: datetime, payloads: list[bytes] | None = None) -> int:
        """Publish one batch per site starting at ``start`` (``payloads`` from ``encode_round`` of
        the same ``start``, in order); returns the readings published."""
        if payloads is None:
            payloads = self.encode_round(start)
        self._encoded -= 1
        self.rounds.append(start)
        self.published_at.append(time.time())
        for s, client in enumerate(self.clients):
            # Queued even while disconnected (rc NO_CONN): paho sends it after the reconnect.
            info = client.publish(self.fleet.topic(s), payloads[s], qos=1)
            with self._lock:
                self._pending.add((s, info.mid))
        return self.readings_per_round

    def _on_puback(self, s: int, mid: int) -> None:
        with self._lock:
            self._acked.add((s, mid))

    @property
    def readings_per_round(self) -> int:
        return self.fleet.sites * self.fleet.meters * self.steps

    @property
    def total(self) -> int:
        return len(self.rounds) * self.readings_per_round

    def unacked(self) -> int:
        """Messages still waiting for their PUBACK (paho re-sends them after a reconnect)."""
        with self._lock:  # a PUBACK may be seen before its publish() returned: match both ways
            matched = self._pending & self._acked
            self._pending -= matched
            self._acked -= matched
            return len(self._pending)

    def wait_acked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.unacked():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def expected(self) -> Iterator[tuple[str, datetime, float]]:
        """Every (meter_id, ts, value) published so far."""
        for r, start in enumerate(self.rounds):
            for s in range(self.fleet.sites):
                for k in range(self.steps):
                    ts = start + k * self.spacing
                    for m in range(self.fleet.meters):
                        yield self.fleet.meter(s, m), ts, value_of(s, m, r * self.steps + k)

    def rows(self, round_index: int, start: datetime) -> list[Row]:
        """The DB rows round ``round_index`` published at ``start`` becomes (as the writer stores
        them): the raw COPY baseline writes exactly these."""
        return [
            (self.fleet.meter(s, m), QUANTITY, start + k * self.spacing,
             value_of(s, m, round_index * self.steps + k), 0, self.fleet.site(s), self.fleet.gateway(s),
             round_index)
            for s in range(self.fleet.sites)
            for k in range(self.steps)
            for m in range(self.fleet.meters)
        ]  # fmt: skip
