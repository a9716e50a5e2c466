"""Sparkplug B host application: ``spBv1.0/<group>/#`` → the bridge's checks → Kafka or the DLQ.

What it does, by the Sparkplug 3.0 specification (normative ids in brackets):

* Session: connects with a Will ``spBv1.0/STATE/<host_id>`` = ``{"online": false, "timestamp":
  T}``, QoS 1, retained [tck-id-operational-behavior-host-application-connect-will(-topic,
  -payload, -qos, -retained)], subscribes to its own STATE topic and to ``spBv1.0/<group>/#`` for
  each group [tck-id-host-topic-phid-birth-sub-required], then publishes ``{"online": true,
  "timestamp": T}`` (same T) QoS 1 retained [tck-id-operational-behavior-host-application-connect-
  birth(-topic, -payload, -qos, -retained)]. An offline STATE for itself while it is connected
  (the broker's stale Will) is answered with a new online STATE. On a clean stop it publishes the
  offline STATE before DISCONNECT [tck-id-operational-behavior-host-application-termination,
  tck-id-host-topic-phid-death-payload-timestamp-disconnect-clean].
* Edge nodes: NBIRTH must carry ``bdSeq`` and seq 0 [tck-id-payloads-nbirth-bdseq,
  tck-id-payloads-nbirth-seq]; it and the DBIRTHs define the aliases of the node [tck-id-payloads-
  alias-birth-requirement]. Every later message's seq must be the previous + 1 (mod 256)
  [tck-id-payloads-ndata-seq-inc, -ddata-seq-inc, -dbirth-seq-inc, -ddeath-seq-inc]. On a gap, on
  data from a node without a birth, or on an alias its births did not define, the host sends a
  Rebirth Request: NCMD with metric ``Node Control/Rebirth`` = true [tck-id-operational-behavior-
  data-commands-ncmd-rebirth-verb, -name, -value]. No reorder timeout is configured, so the
  request goes out at once ([tck-id-operational-behavior-host-reordering-param] is a SHOULD).
* NDEATH whose ``bdSeq`` equals the current NBIRTH's marks the node and its devices offline and
  their metrics stale at the host's time [tck-id-payloads-ndeath-bdseq, tck-id-operational-
  behavior-edge-node-termination-host-action-ndeath-node-offline, -node-tags-stale,
  -devices-offline, -devices-tags-stale]; an NDEATH with another bdSeq is a late Will of an older
  session and ignored. DDEATH marks its device offline and stale at the payload's timestamp
  [tck-id-operational-behavior-edge-node-termination-host-action-ddeath-devices-offline,
  -devices-tags-stale].

Mapping (the fleet registry's ``[sparkplug]`` table, ``fleet.toml``): each edge node is a fleet-registry
gateway (its site and supplier come from the registry), and named metrics of the node or one of
its devices are a meter's quantity, with a scale (e.g. 0.001 for Wh). Numeric values of mapped
metrics in births and data become one wire batch per message (``edge.wire``), checked exactly as
the bridge checks an MQTT batch plus the registry (``ingest.admit``), then produced to
``readings.v1`` (key = site) — or, refused, to the DLQ as a wire batch, so ``scopemeter dlq
replay`` can send it again after the fix. A payload that is not a Sparkplug B protobuf goes to the
DLQ as ``sparkplug_decode`` with its bytes.

Templates (UDTs; spec §6.4 "Template"): the NBIRTH's definitions (``is_definition``) give each
member's datatype; an instance (``template_ref``) in a birth is checked against its definition and
teaches the host its aliases, members' included, so data may name instance and members by alias
and carry a subset of the members [tck-id-payloads-template-instance-members-data]. A member is
mapped as ``metric`` (the instance) + ``member`` (a name, or a list down nested instances). What
the spec forbids — an instance of a template the NBIRTH does not define [tck-id-payloads-template-
definition-nbirth], a member not in the definition or of another datatype [tck-id-payloads-
template-instance-members], a definition outside the NBIRTH [tck-id-payloads-template-definition-
nbirth-only], a birth without every member [tck-id-payloads-template-instance-members-birth] — is
one ``sparkplug_metric`` letter per message (a rebirth would repeat the gateway's mistake), as is a
mapped metric that is no number: DataSets are not read, since a row has no timestamp of its own.

Loss: Sparkplug publishes NDATA/DDATA at QoS 0, so a message the broker drops is gone; the seq gap
then triggers a rebirth, whose births carry the current values (counters lose nothing but
resolution). A Kafka send that fails ends the process, as in the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from google.protobuf.message import DecodeError
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from compute.fleet import SparkplugMap, load_fleet
from edge.mqtt_client import new_client
from edge.wire import Batch, Reading, readings_topic
from ingest.admit import Refused, Registry, admit, dead_letter, load_registry
from ingest.dlq import Reason
from ingest.sparkplug import sparkplug_b_pb2
from ops import metrics
from ops.errors import UserError
from ops.kafka_client import client_kwargs
from ops.settings import Settings

log = logging.getLogger("scopemeter.sparkplug")
pb: Any = sparkplug_b_pb2  # protoc's output builds its classes at import: untyped for mypy

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BD_SEQ = "bdSeq"
DECODE_REASON = Reason.SPARKPLUG_DECODE.value
METRIC_REASON = Reason.SPARKPLUG_METRIC.value
# Sparkplug DataType values (sparkplug_b.proto, enum DataType; spec §6.4.16 "Datatypes").
SIGNED_32 = frozenset({1, 2, 3})  # Int8, Int16, Int32: carried in uint32 int_value
INT64 = 4  # carried in uint64 long_value
BOOLEAN = 11
DATASET = 16
TEMPLATE = 19
NUMERIC_FIELDS = ("int_value", "long_value", "float_value", "double_value")
REGISTRY_REFRESH_S = 10.0
REBIRTH_EVERY_S = 5.0


def load_map(path: Path) -> SparkplugMap:
    """The ``[sparkplug]`` table of a fleet registry file (``fleet.toml``): the mapping lives with
    the gateways and meters it names, and ``scopemeter fleet apply`` checks it the same way."""
    return load_fleet(path).sparkplug


def listen_groups(mapping: SparkplugMap, given: list[str] | None, source: Path) -> list[str]:
    """The Sparkplug groups to subscribe: those given, else every group the mapping's nodes name
    (so a supervised host needs no arguments and follows ``fleet.toml``)."""
    groups = given or sorted({n.group for n in mapping.nodes})
    if not groups:
        raise UserError(f"{source}: no [[sparkplug.nodes]] to listen for, and no --group given")
    return groups


@dataclass
class Device:
    online: bool = True
    stale_at: datetime | None = None


MetricPath = tuple[str, ...]  # a metric's name, then member names down into Template instances
Where = tuple[str | None, MetricPath]  # (device or None for the node, path)


@dataclass(frozen=True)
class Member:
    """A member of a Template definition: its datatype, and for a nested instance its template."""

    datatype: int
    template_ref: str | None = None


@dataclass
class Node:
    """What the host knows of one edge node since its last NBIRTH."""

    bd_seq: int
    seq: int
    aliases: dict[int, Where] = field(default_factory=dict)  # alias → where it points, births only
    types: dict[Where, int] = field(default_factory=dict)  # datatype declared at birth
    instances: dict[Where, str] = field(default_factory=dict)  # Template instance → its definition
    templates: dict[str, dict[str, Member]] = field(default_factory=dict)  # NBIRTH's definitions
    devices: dict[str, Device] = field(default_factory=dict)
    online: bool = True
    stale_at: datetime | None = None  # when NDEATH made its metrics stale
    needs_rebirth: bool = False


@dataclass(frozen=True)
class Topic:
    group: str
    kind: str
    node: str
    device: str | None


def parse_topic(topic: str) -> Topic | None:
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[1] == "STATE":
        return None
    return Topic(parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None)


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


def rebirth_request() -> bytes:
    p = pb.Payload(timestamp=int(time.time() * 1000))
    m = p.metrics.add()
    m.name, m.datatype, m.boolean_value = REBIRTH, BOOLEAN, True
    m.timestamp = p.timestamp
    return bytes(p.SerializeToString())


def _bd_seq(metrics: Iterable[Any]) -> int | None:
    """The bdSeq metric's value when it is an integer 0..255 (the spec's range), else None."""
    m = next((m for m in metrics if m.name == BD_SEQ), None)
    v = None if m is None else _number(m)
    return int(v) if v is not None and v.is_integer() and 0 <= v <= 255 else None


def _instant(ms: int) -> datetime | None:
    """A Sparkplug timestamp (ms since the epoch, UTC), or None when no datetime can hold it."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return None


def _number(m: Any) -> float | None:
    which = m.WhichOneof("value")
    if m.is_null or which not in NUMERIC_FIELDS:
        return None
    return float(getattr(m, which))


def _type_name(datatype: int | None) -> str:
    if datatype is None:
        return "of no declared datatype"
    try:
        return str(pb.DataType.Name(datatype))
    except ValueError:
        return f"datatype {datatype}"


def _value(m: Any, datatype: int | None) -> tuple[float | None, str | None]:
    """(the metric's number, None), (None, None) for a null value, or (None, why it is no number).

    Signed types travel in unsigned protobuf fields (spec §6.4.16: Int8..Int32 as uint32, Int64 as
    uint64); Eclipse Tahu writes them in two's complement, so they are sign-extended here."""
    which = m.WhichOneof("value")
    if datatype == DATASET or which == "dataset_value":
        return None, "is a DataSet: DataSets are not read (a row has no timestamp of its own)"
    if m.is_null:
        return None, None
    if which not in NUMERIC_FIELDS:
        return None, f"is {_type_name(datatype)} ({which or 'no value'}), not a number"
    v = getattr(m, which)
    if datatype in SIGNED_32 and which == "int_value" and v >= 2**31:
        v -= 2**32
    elif datatype == INT64 and which == "long_value" and v >= 2**63:
        v -= 2**64
    return float(v), None


@dataclass(frozen=True)
class Leaf:
    """A value-carrying metric of a payload: a plain metric or a member of a Template instance."""

    path: MetricPath
    datatype: int | None
    metric: Any
    ts_ms: int


@dataclass
class Walk:
    """A payload's metrics flattened through Template instances, with what was wrong on the way."""

    leaves: list[Leaf] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    instances: list[MetricPath] = field(default_factory=list)
    unknown_alias: int | None = None


def _show(path: MetricPath) -> str:
    return " / ".join(repr(n) for n in path)


def _definitions(metrics: Iterable[Any], problems: list[str]) -> dict[str, dict[str, Member]]:
    """The Template definitions of an NBIRTH: metric name → member name → Member."""
    found: dict[str, dict[str, Member]] = {}
    for m in metrics:
        if m.WhichOneof("value") != "template_value" or not m.template_value.is_definition:
            continue
        t = m.template_value
        if t.HasField("template_ref"):
            problems.append(f"template definition {m.name!r} has a template_ref "
                            "[tck-id-payloads-template-definition-ref]")  # fmt: skip
            continue
        members: dict[str, Member] = {}
        for mm in t.metrics:
            if not mm.name:
                problems.append(f"template definition {m.name!r} has a member without a name "
                                "[tck-id-payloads-name-requirement]")  # fmt: skip
                continue
            nested = mm.template_value.template_ref if mm.WhichOneof("value") == "template_value" else None
            members[mm.name] = Member(mm.datatype, nested or None)
        found[m.name] = members
    return found


@dataclass
class Outcome:
    """What handling one message led to (for the caller to publish and for tests to read)."""

    batches: list[tuple[str, bytes]] = field(default_factory=list)  # (scopemeter topic, wire batch)
    letters: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # reason, detail, topic, payload
    rebirth: tuple[str, str] | None = None  # (group, node) to send a Rebirth Request to


class HostState:
    """The Sparkplug state machine; pure (no I/O), so every rule is testable on its own."""

    def __init__(self, mapping: SparkplugMap, registry: Registry, settings: Settings) -> None:
        self.mapping = mapping
        self.registry = registry
        self.settings = settings
        self.nodes: dict[tuple[str, str], Node] = {}
        self.gateways = {(n.group, n.node): n.gateway for n in mapping.nodes}
        self.meters = {(m.group, m.node, m.device, m.path): m for m in mapping.metrics}
        # Every proper prefix of a mapped member path: such a metric must be a Template instance.
        self.instance_prefixes = {
            (m.group, m.node, m.device, m.path[:k]) for m in mapping.metrics for k in range(1, len(m.path))
        }
        self.rebirths: list[tuple[str, str, str]] = []  # (group, node, why), in order
        self._wire_seq = 0
        self._asked: dict[tuple[str, str], float] = {}  # node → when a rebirth was last requested

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Total: whatever a gateway sends, the result is an Outcome (at worst a dead letter)."""
        try:
            return self._handle(topic, payload)
        except Exception as exc:  # a value no rule foresaw (a NaN bdSeq, a year-30000 timestamp)
            out = Outcome()
            out.letters.append((DECODE_REASON, f"{type(exc).__name__}: {exc}"[:2000], topic, payload))
            return out

    def _handle(self, topic: str, payload: bytes) -> Outcome:
        out = Outcome()
        t = parse_topic(topic)
        if t is None:
            return out
        try:
            p = pb.Payload.FromString(payload)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            out.letters.append((DECODE_REASON, f"not a Sparkplug B payload: {exc}", topic, payload))
            return out
        key = (t.group, t.node)
        node = self.nodes.get(key)
        if t.kind == "NBIRTH":
            bd_seq = _bd_seq(p.metrics)
            if bd_seq is None or not p.HasField("seq") or p.seq != 0:
                self._rebirth(out, key, "NBIRTH without a bdSeq 0..255 or with seq != 0")
                return out
            node = Node(bd_seq=bd_seq, seq=0)
            self.nodes[key] = node
            self._asked.pop(key, None)
            problems: list[str] = []
            node.templates = _definitions(p.metrics, problems)
            walk = self._walk(node, None, p, t.kind)
            walk.problems[:0] = problems
            self._readings(out, topic, t, None, p, payload, walk)
            return out
        if t.kind == "NDEATH":
            if node is not None and _bd_seq(p.metrics) == node.bd_seq:
                now = datetime.now(UTC)
                node.online, node.stale_at = False, now
                for dev in node.devices.values():
                    dev.online, dev.stale_at = False, now
            return out
        if node is None or not node.online or node.needs_rebirth:
            self._rebirth(out, key, f"{t.kind} from a node without a current NBIRTH")
            return out
        if not p.HasField("seq") or p.seq != (node.seq + 1) % 256:
            got = p.seq if p.HasField("seq") else None
            self._rebirth(out, key, f"{t.kind} seq {got} after {node.seq}")
            return out
        node.seq = p.seq
        if t.kind == "DBIRTH" and t.device is not None:
            node.devices[t.device] = Device()
            self._readings(out, topic, t, t.device, p, payload, self._walk(node, t.device, p, t.kind))
        elif t.kind == "DDEATH" and t.device is not None:
            dev = node.devices.setdefault(t.device, Device())
            stamp = _instant(p.timestamp) if p.HasField("timestamp") else None
            dev.online, dev.stale_at = False, stamp or datetime.now(UTC)
        elif t.kind in ("NDATA", "DDATA"):
            if t.kind == "DDATA" and (t.device is None or t.device not in node.devices):
                self._rebirth(out, key, f"DDATA from device {t.device} without a DBIRTH")
                return out
            walk = self._walk(node, t.device, p, t.kind)
            if walk.unknown_alias is not None:
                self._rebirth(out, key, f"{t.kind} with unknown alias {walk.unknown_alias}")
            self._readings(out, topic, t, t.device, p, payload, walk)
        return out

    def _rebirth(self, out: Outcome, key: tuple[str, str], why: str) -> None:
        """Ask for a rebirth, at most once per ``REBIRTH_EVERY_S`` per node: data that keeps coming
        before the NBIRTH must not flood the node with requests (an NCMD is QoS 0, so one is
        repeated after that time in case it was lost)."""
        node = self.nodes.get(key)
        if node is not None:
            node.needs_rebirth = True
        now = time.monotonic()
        if now - self._asked.get(key, -REBIRTH_EVERY_S) < REBIRTH_EVERY_S:
            return
        self._asked[key] = now
        self.rebirths.append((key[0], key[1], why))
        out.rebirth = key
        log.warning("rebirth requested from %s/%s: %s", key[0], key[1], why)

    def _walk(self, node: Node, device: str | None, p: Any, kind: str) -> Walk:
        """Flatten ``p``'s metrics through Template instances; births also teach the node's aliases,
        datatypes and instances, which later data messages (by alias, often without datatype or
        template_ref) are read with."""
        walk = Walk()
        for m in p.metrics:
            if m.name:
                path: MetricPath = (m.name,)
            elif m.HasField("alias") and m.alias in node.aliases:
                path = node.aliases[m.alias][1]
                if len(path) != 1:
                    walk.problems.append(f"alias {m.alias} names member {_show(path)}, outside its instance")
                    continue
            else:
                if m.HasField("alias"):
                    walk.unknown_alias = m.alias if walk.unknown_alias is None else walk.unknown_alias
                continue
            self._metric(node, device, m, path, kind, walk, p.timestamp, None)
        return walk

    def _metric(
        self, node: Node, device: str | None, m: Any, path: MetricPath, kind: str, walk: Walk, ts_ms: int,
        member: Member | None,
    ) -> None:  # fmt: skip
        """One metric (``member``: its definition when it is a member of an instance), recursively."""
        birth = kind in ("NBIRTH", "DBIRTH")
        ts_ms = m.timestamp if m.HasField("timestamp") else ts_ms
        declared = m.datatype if m.HasField("datatype") and m.datatype else None
        where = (device, path)
        if member is not None:
            if declared is not None and declared != member.datatype:
                walk.problems.append(
                    f"member {_show(path)} is {_type_name(declared)}, its template definition says "
                    f"{_type_name(member.datatype)} [tck-id-payloads-template-definition-members]"
                )
                return
            datatype: int | None = member.datatype
        else:
            datatype = declared or node.types.get(where)
        if birth:
            if datatype is not None:
                node.types[where] = datatype
            if m.HasField("alias"):
                node.aliases[m.alias] = where
        if datatype != TEMPLATE and m.WhichOneof("value") != "template_value":
            walk.leaves.append(Leaf(path, datatype, m, ts_ms))
            return
        if m.is_null:
            return
        t = m.template_value
        if t.is_definition:
            if kind != "NBIRTH" or member is not None:
                walk.problems.append(f"template definition {_show(path)} in {kind}, not at the top of an "
                                     "NBIRTH [tck-id-payloads-template-definition-nbirth-only]")  # fmt: skip
            return
        walk.instances.append(path)
        if member is not None:
            ref = member.template_ref
        elif birth:
            ref = t.template_ref if t.HasField("template_ref") else None
            if not ref:
                walk.problems.append(f"template instance {_show(path)} has no template_ref "
                                     "[tck-id-payloads-template-instance-ref]")  # fmt: skip
                return
        else:
            ref = node.instances.get(where)
            if ref is None:
                walk.problems.append(f"{_show(path)} is no Template instance of a birth")
                return
        if t.HasField("template_ref") and t.template_ref != ref:
            walk.problems.append(f"template instance {_show(path)} refers to {t.template_ref!r}, "
                                 f"its birth or definition to {ref!r}")  # fmt: skip
            return
        definition = node.templates.get(ref) if ref else None
        if definition is None:
            walk.problems.append(
                f"template instance {_show(path)} refers to template {ref!r}, which the NBIRTH does not "
                "define [tck-id-payloads-template-definition-nbirth]"
            )
            return
        if birth and ref:
            node.instances[where] = ref
        seen: set[str] = set()
        for mm in t.metrics:
            name = mm.name
            if not name and birth:
                walk.problems.append(f"a member of {_show(path)} has no name in a birth "
                                     "[tck-id-payloads-alias-birth-requirement]")  # fmt: skip
                continue
            if not name:
                target = node.aliases.get(mm.alias) if mm.HasField("alias") else None
                if target is None:
                    if mm.HasField("alias"):
                        walk.unknown_alias = mm.alias if walk.unknown_alias is None else walk.unknown_alias
                    else:
                        walk.problems.append(f"a member of {_show(path)} has neither name nor alias "
                                             "[tck-id-payloads-name-requirement]")  # fmt: skip
                    continue
                if target[0] != device or target[1][:-1] != path:
                    walk.problems.append(f"alias {mm.alias} in {_show(path)} names {_show(target[1])}")
                    continue
                name = target[1][-1]
            if name not in definition:
                walk.problems.append(f"member {name!r} of {_show(path)} is not in template {ref!r} "
                                     "[tck-id-payloads-template-instance-members]")  # fmt: skip
                continue
            seen.add(name)
            self._metric(node, device, mm, (*path, name), kind, walk, ts_ms, definition[name])
        if birth and seen != set(definition):
            missing = sorted(set(definition) - seen)
            walk.problems.append(f"the birth of template instance {_show(path)} lacks members {missing} of "
                                 f"{ref!r} [tck-id-payloads-template-instance-members-birth]")  # fmt: skip

    def _readings(
        self, out: Outcome, topic: str, t: Topic, device: str | None, p: Any, payload: bytes, walk: Walk
    ) -> None:
        """The mapped numeric metrics and members of ``p`` as one wire batch of the node's gateway;
        what is wrong with the payload's templates or mapped values as one ``sparkplug_metric`` letter
        (the rest of the message is still read)."""
        gateway = self.gateways.get((t.group, t.node))
        if gateway is None:
            return  # a node the mapping does not name: not ours to ingest
        site = self.registry.gateways.get(gateway, "")
        supplier = self.registry.sites.get(site, "")
        problems = list(walk.problems)
        for path in walk.instances:
            if (t.group, t.node, device, path) in self.meters:
                problems.append(f"mapped metric {_show(path)} is a Template instance: map its members "
                                "(member = ...)")  # fmt: skip
        readings = []
        for leaf in walk.leaves:
            key = (t.group, t.node, device, leaf.path)
            target = self.meters.get(key)
            if target is None:
                if key in self.instance_prefixes:
                    problems.append(f"mapped {_show(leaf.path)} is {_type_name(leaf.datatype)}, "
                                    "not a Template instance")  # fmt: skip
                continue
            value, why = _value(leaf.metric, leaf.datatype)
            if why is not None:
                problems.append(f"mapped metric {_show(leaf.path)} {why}")
            if value is None:
                continue
            stamp = _instant(leaf.ts_ms)
            try:
                if stamp is None:
                    raise ValueError("timestamp beyond any date")
                readings.append(
                    Reading(
                        meter_id=target.meter, quantity=target.quantity, ts=stamp, value=value * target.scale
                    )
                )
            except (ValidationError, ValueError) as exc:
                out.letters.append(("schema", f"metric {_show(leaf.path)}: {exc}"[:2000], topic, payload))
        if problems:
            log.warning("sparkplug %s: %s", topic, "; ".join(problems)[:500])
            out.letters.append((METRIC_REASON, "; ".join(problems)[:2000], topic, payload))
        if not readings:
            return
        self._wire_seq = max(self._wire_seq + 1, time.time_ns() // 1000)
        try:
            batch = Batch(
                supplier=supplier or "unknown", site=site or "unknown", gateway=gateway,
                seq=self._wire_seq, sent_at=datetime.now(UTC), readings=readings,
            )  # fmt: skip
        except ValidationError as exc:  # an unregistered gateway id the mapping got wrong
            out.letters.append(("schema", str(exc)[:2000], topic, payload))
            return
        out.batches.append((readings_topic(batch.supplier, batch.site, batch.gateway), batch.encode()))


@dataclass
class Host:
    """The running host: MQTT session, STATE, and Kafka. ``state`` is readable from tests."""

    settings: Settings
    mapping: SparkplugMap
    groups: list[str]
    host_id: str
    state: HostState | None = None
    produced: int = 0
    refused: int = 0


async def run_host(
    settings: Settings,
    stop: asyncio.Event,
    *,
    groups: list[str],
    host_id: str,
    mapping: SparkplugMap,
    on_ready: Callable[[Host], None] | None = None,
) -> Host:
    """Run until ``stop``; returns the host (its final state) for inspection."""
    import psycopg

    if not groups:
        raise UserError("name at least one Sparkplug group (--group)")
    with psycopg.connect(settings.db.dsn) as conn:
        registry = load_registry(conn)
    for n in mapping.nodes:  # not fatal: their batches go to the DLQ, replayable once registered
        if n.gateway not in registry.gateways:
            log.warning(
                "sparkplug node %s/%s: gateway %r is not in the fleet registry", n.group, n.node, n.gateway
            )
    for m in mapping.metrics:
        if m.meter not in registry.meters:
            log.warning("sparkplug metric %r: meter %r is not in the fleet registry", m.metric, m.meter)
    host = Host(settings, mapping, groups, host_id, HostState(mapping, registry, settings))
    assert host.state is not None
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    state_topic = f"{NAMESPACE}/STATE/{host_id}"
    connect_ts = [0]
    ready = asyncio.Event()

    # A persistent session (new_client's) costs nothing here: Sparkplug data is QoS 0, which
    # Mosquitto does not queue for an absent client, and a rebirth refreshes everything anyway.
    client = new_client(settings.mqtt, f"scopemeter-sparkplug-{host_id}")

    def set_will() -> None:
        connect_ts[0] = int(time.time() * 1000)
        client.will_set(state_topic, state_payload(False, connect_ts[0]), qos=1, retain=True)

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.error("MQTT connect refused: %s", rc)
            return
        c.subscribe([(state_topic, 1)] + [(f"{NAMESPACE}/{g}/#", 1) for g in groups])

    def on_subscribe(c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object) -> None:
        if any(code.is_failure for code in codes):
            log.error("MQTT subscription refused: %s", codes)
            return
        c.publish(state_topic, state_payload(True, connect_ts[0]), qos=1, retain=True)
        loop.call_soon_threadsafe(ready.set)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, (msg.topic, bytes(msg.payload)))

    def on_disconnect(c: mqtt.Client, *_a: object) -> None:
        set_will()  # the next CONNECT carries a fresh timestamp

    set_will()
    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_message, client.on_disconnect = on_message, on_disconnect
    producer = AIOKafkaProducer(
        **client_kwargs(settings.kafka), acks="all", enable_idempotence=True,
        max_request_size=settings.kafka.max_message_bytes,
    )  # fmt: skip
    await producer.start()
    client.connect_async(settings.mqtt.host, settings.mqtt.port, keepalive=settings.mqtt.keepalive)
    client.loop_start()
    refreshed = time.monotonic()
    try:
        await asyncio.wait_for(ready.wait(), timeout=30)
        if on_ready is not None:
            on_ready(host)
        while not stop.is_set():
            try:
                topic, payload = await asyncio.wait_for(inbox.get(), timeout=0.2)
            except TimeoutError:
                continue
            if topic == state_topic:
                own = _json(payload)
                if own.get("online") is False:  # the broker published our stale Will: we are alive
                    client.publish(state_topic, state_payload(True, connect_ts[0]), qos=1, retain=True)
                continue
            if time.monotonic() - refreshed > REGISTRY_REFRESH_S:
                refreshed = time.monotonic()
                try:
                    with psycopg.connect(settings.db.dsn, connect_timeout=5) as conn:
                        host.state.registry = load_registry(conn)
                except psycopg.Error as exc:  # keep checking against the last registry
                    log.warning("fleet registry not refreshed: %s", str(exc).strip()[:200])
            out = host.state.handle(topic, payload)
            if out.rebirth is not None:
                group, edge_node = out.rebirth
                client.publish(f"{NAMESPACE}/{group}/NCMD/{edge_node}", rebirth_request(), qos=0)
            await _publish(host, producer, out)
        # A clean stop: the offline STATE first (the Will is not sent on DISCONNECT).
        if client.is_connected():  # if not, the broker has published our Will already
            info = client.publish(
                state_topic, state_payload(False, int(time.time() * 1000)), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):  # lost the connection meanwhile
                await asyncio.to_thread(info.wait_for_publish, 5)
    finally:
        client.disconnect()
        client.loop_stop()
        await producer.stop()
    return host


def _json(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _publish(host: Host, producer: AIOKafkaProducer, out: Outcome) -> None:
    s = host.settings
    assert host.state is not None
    for topic, payload in out.batches:
        decided = admit(topic, payload, host.state.registry, now=s.clock.now(), limits=s.ingest)
        if isinstance(decided, Refused):
            out.letters.append((decided.reason, decided.detail, topic, payload))
            continue
        metrics.BRIDGE_MESSAGES.labels(outcome="accepted").inc()
        metrics.BRIDGE_READINGS.inc(decided.readings)
        metrics.GATEWAY_LAST_SEEN.labels(site=decided.site, gateway=decided.gateway).set_to_current_time()
        await producer.send_and_wait(
            s.kafka.readings_topic, payload, key=decided.site.encode(),
            headers=[("gateway", decided.gateway.encode()), ("seq", str(decided.seq).encode()),
                     ("source", b"sparkplug")],
        )  # fmt: skip
        host.produced += 1
    for reason, detail, topic, payload in out.letters:
        metrics.BRIDGE_MESSAGES.labels(outcome="dlq").inc()
        metrics.BRIDGE_DLQ.labels(reason=reason).inc()
        log.warning("DLQ %s: %s (%s)", reason, detail[:200], topic)
        await producer.send_and_wait(
            s.kafka.dlq_topic, dead_letter(reason, detail, topic, payload), key=topic.encode()
        )
        host.refused += 1
