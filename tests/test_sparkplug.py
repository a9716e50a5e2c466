"""The Sparkplug B host application against an independent Sparkplug B implementation.

The edge node is pysparkplug 0.6.1 (PyPI; its own protobuf bindings and paho-mqtt 1.x, so it runs
in its own venv under ~/.cache/scopemeter/), driven by tests/sparkplug_edge_node.py through the
real Mosquitto; our host runs in this process with the real Kafka and PostgreSQL. pysparkplug
decodes what the host sends (STATE, NCMD), so both directions are checked by the other side.

Host-application assertions of the Sparkplug 3.0 specification (eclipse-sparkplug/sparkplug,
specification/src/main/asciidoc/chapters/, commit e45b610) that these tests exercise, by id:

- tck-id-operational-behavior-host-application-connect-will, -connect-will-topic,
  -connect-will-payload, -connect-will-qos, -connect-will-retained; tck-id-payloads-state-will-message,
  -will-message-qos, -will-message-retain, -will-message-payload; tck-id-host-topic-phid-death-required
  (the Will is checked by killing the host's TCP session: test_will_marks_the_host_offline)
- tck-id-host-topic-phid-birth-sub-required, tck-id-payloads-state-subscribe
- tck-id-operational-behavior-host-application-connect-birth, -connect-birth-topic,
  -connect-birth-payload, -connect-birth-qos, -connect-birth-retained; tck-id-host-topic-phid-birth-qos,
  -birth-retain, -birth-topic, -birth-payload, -birth-payload-timestamp; tck-id-payloads-state-birth,
  -state-birth-payload
- tck-id-operational-behavior-host-application-termination, -death-topic, -death-payload, -death-qos,
  -death-retained; tck-id-host-topic-phid-death-payload-timestamp-disconnect-clean
- tck-id-payloads-nbirth-seq, tck-id-payloads-nbirth-bdseq, tck-id-payloads-alias-birth-requirement,
  tck-id-payloads-alias-data-cmd-requirement, tck-id-payloads-ndata-seq-inc, tck-id-payloads-ddata-seq-inc
- tck-id-operational-behavior-data-commands-ncmd-rebirth-verb, -ncmd-rebirth-name, -ncmd-rebirth-value
  (a seq gap and an unknown alias each bring one Rebirth Request; the node's rebirth is accepted)
- tck-id-payloads-ndeath-bdseq; tck-id-operational-behavior-edge-node-termination-host-action-ndeath-
  node-offline, -ndeath-node-tags-stale, -ndeath-devices-offline, -ndeath-devices-tags-stale
- tck-id-operational-behavior-edge-node-termination-host-action-ddeath-devices-offline,
  -ddeath-devices-tags-stale

Not applicable: the reorder timeout (tck-id-operational-behavior-host-reordering-*: a SHOULD; this
host requests a rebirth at once), multiple MQTT servers (-multi-server-timestamp).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from compute.fleet import SparkplugMap
from edge.wire import Batch
from ingest.dlq_tools import read_letters, read_records, replay
from ingest.sparkplug.host import HostState, load_map, run_host
from ingest.writer import run_writer
from ops.settings import Settings

PYSPARKPLUG = "pysparkplug==0.6.1"
EDGE_NODE = Path(__file__).parent / "sparkplug_edge_node.py"


@pytest.fixture(scope="session")
def pysparkplug_python() -> Path:
    """The Python of a venv with pysparkplug (created once, from PyPI, like Kafka's jars)."""
    venv = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scopemeter" / "pysparkplug-0.6.1"
    python = venv / "bin" / "python"
    if subprocess.run([str(python), "-c", "import pysparkplug"], capture_output=True).returncode != 0 \
            if python.exists() else True:  # fmt: skip
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PYSPARKPLUG], check=True)
    return python


def _lane(settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    kafka = settings.kafka.model_copy(update={
        "dlq_topic": f"dlq-{tag}", "readings_topic": f"readings-{tag}", "writer_group": f"w-{tag}",
        "committed_topic": f"committed-{tag}",
    })  # fmt: skip
    return settings.model_copy(update={"kafka": kafka})


def _register(dsn: str, tag: str, meters: list[str]) -> tuple[str, str, str]:
    supplier, site, gateway = f"sup-{tag}", f"site-{tag}", f"gw-{tag}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO suppliers VALUES (%s, %s)", (supplier, supplier))
        conn.execute("INSERT INTO sites (site_id, supplier_id, name, grid_region) VALUES (%s, %s, %s, 'CN')",
                     (site, supplier, site))  # fmt: skip
        conn.execute("INSERT INTO gateways VALUES (%s, %s)", (gateway, site))
        for m in meters:
            _add_meter(dsn, m, site, gateway)
    return supplier, site, gateway


def _add_meter(dsn: str, meter: str, site: str, gateway: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO meters (meter_id, site_id, gateway_id, carrier, model)"
            " VALUES (%s, %s, %s, 'electricity', 'sparkplug')",
            (meter, site, gateway),
        )


class _Watcher:
    """A plain paho subscriber that records every message on a topic filter (retain flag, QoS)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}")
        self.client.on_message = lambda _c, _u, m: self._add(m)
        self.client.connect(settings.mqtt.host, settings.mqtt.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _add(self, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(m)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def _host(settings: Settings, group: str, host_id: str, mapping: SparkplugMap) -> Iterator[dict[str, Any]]:
    """Run the host in a thread with its own event loop; yields {'host': Host} once subscribed."""
    box: dict[str, Any] = {}
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def on_ready(h: Any) -> None:
        box["host"] = h
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["result"] = loop.run_until_complete(
                run_host(settings, stop, groups=[group], host_id=host_id, mapping=mapping, on_ready=on_ready)
            )
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(60), "host not ready"
    if "error" in box:
        raise box["error"]
    try:
        yield box
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        if "error" in box:
            raise box["error"]


def _stored(dsn: str, meter: str) -> list[float]:
    with psycopg.connect(dsn) as conn:
        return [
            v for (v,) in conn.execute("SELECT value FROM readings WHERE meter_id = %s ORDER BY ts", (meter,))
        ]


async def _write_until(settings: Settings, stored: Callable[[], bool]) -> None:
    """Run the writer until ``stored()`` (or it ends by itself, or a minute passes)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_writer(settings, stop, linger_s=0.1))
    try:
        for _ in range(600):
            if stored() or task.done():
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


def test_pysparkplug_edge_node_through_mosquitto_kafka_and_the_dlq(
    settings: Settings, pysparkplug_python: Path, tmp_path: Path
) -> None:
    lane = _lane(settings)
    tag = uuid.uuid4().hex[:8]
    group, node, host_id = f"plant-{tag}", f"edge-{tag}", f"scopemeter-{tag}"
    node_meter, device_meter = f"spn-{tag}", f"spd-{tag}"
    _supplier, site, gateway = _register(lane.db.dsn, tag, [node_meter])  # device meter: not yet
    # The mapping lives in the fleet registry file (fleet.toml's [sparkplug]), beside the gateway and
    # meters it names; the DB registry is what the host checks batches against (the device meter is
    # in the file but not applied yet).
    mapping_file = tmp_path / "fleet.toml"
    mapping_file.write_text(f"""
[[suppliers]]
id = "{_supplier}"
name = "Supplier {tag}"

[[sites]]
id = "{site}"
supplier = "{_supplier}"
name = "Site {tag}"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[gateways]]
id = "{gateway}"
site = "{site}"

[[meters]]
id = "{node_meter}"
site = "{site}"
gateway = "{gateway}"
carrier = "electricity"
model = "sparkplug"

[[meters]]
id = "{device_meter}"
site = "{site}"
gateway = "{gateway}"
carrier = "electricity"
model = "sparkplug"

[[sparkplug.nodes]]
group = "{group}"
node = "{node}"
gateway = "{gateway}"

[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
metric = "Energy/Import kWh"
meter = "{node_meter}"

[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
device = "pm1"
metric = "Energy Import"
meter = "{device_meter}"
""")
    mapping = load_map(mapping_file)
    state_watch = _Watcher(lane, f"spBv1.0/STATE/{host_id}")
    try:
        with _host(lane, group, host_id, mapping) as box:
            run = subprocess.run(
                [str(pysparkplug_python), str(EDGE_NODE), lane.mqtt.host, str(lane.mqtt.port), group, node,
                 host_id, "7"],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            assert run.returncode == 0 and events[-1] == {"event": "done"}, (run.stdout, run.stderr)
            # Garbage on a Sparkplug topic: a sparkplug_decode letter, and the host keeps going.
            garbage = mqtt.Client(CallbackAPIVersion.VERSION2)
            garbage.connect(lane.mqtt.host, lane.mqtt.port)
            garbage.loop_start()
            garbage.publish(
                f"spBv1.0/{group}/NDATA/{node}", b"\xff\xff not protobuf", qos=1
            ).wait_for_publish(10)
            garbage.disconnect()
            garbage.loop_stop()
            state: HostState = box["host"].state
            for _ in range(100):  # the decode letter is the last thing the host handles
                if box["host"].refused >= 5:
                    break
                threading.Event().wait(0.1)
        host = box["result"]
    finally:
        state_watch.close()

    # STATE, as pysparkplug decoded it: online, retained, QoS 1, timestamp of the CONNECT's Will.
    (online,) = [e for e in events if e["event"] == "state"]
    assert online["online"] is True and online["retain"] is True and online["qos"] == 1
    # ...as a live subscriber saw it: online, then offline on the clean stop (later timestamp)...
    seen = [json.loads(m.payload) for m in state_watch.messages]
    assert [s["online"] for s in seen] == [True, False] and all(m.qos == 1 for m in state_watch.messages)
    assert seen[0]["timestamp"] == online["timestamp"] and seen[1]["timestamp"] >= online["timestamp"]
    # ...and the offline STATE is what the broker retains.
    late = _Watcher(lane, f"spBv1.0/STATE/{host_id}")
    try:
        for _ in range(100):
            if late.messages:
                break
            threading.Event().wait(0.1)
    finally:
        late.close()
    assert late.messages[0].retain and json.loads(late.messages[0].payload)["online"] is False

    # Two Rebirth Requests, decoded by pysparkplug: NCMD, metric Node Control/Rebirth = true.
    ncmds = [e for e in events if e["event"] == "ncmd"]
    assert len(ncmds) == 2
    for e in ncmds:
        assert e["topic"] == f"spBv1.0/{group}/NCMD/{node}"
        assert e["metrics"] == [{"name": "Node Control/Rebirth", "value": True, "datatype": "BOOLEAN"}]
    assert [why for _g, _n, why in state.rebirths] == ["NDATA seq 5 after 3", "NDATA with unknown alias 99"]

    # NDEATH with the NBIRTH's bdSeq: node and device offline and stale; DDEATH before it did the device.
    n = state.nodes[(group, node)]
    assert n.bd_seq == 7 and not n.online and n.stale_at is not None
    assert not n.devices["pm1"].online and n.devices["pm1"].stale_at is not None

    # The node's counter reached readings.v1 as wire batches; the gap message's value did not.
    batches = [Batch.decode(r.value) for r in read_records(lane, lane.kafka.readings_topic)]
    values = [r.value for b in batches for r in b.readings if r.meter_id == node_meter]
    assert values == [1000.0, 1001.5, 1004.5, 1006.0, 1007.5]
    assert all(b.gateway == gateway and b.site == site for b in batches)
    assert host.produced == len(batches) == 5

    # The device's meter is not registered: its 4 batches (3 DBIRTH, 1 DDATA) went to the DLQ.
    letters = read_letters(lane)
    by_reason = sorted(x.reason for x in letters)
    assert by_reason == ["sparkplug_decode"] + ["unregistered_meter"] * 4
    _add_meter(lane.db.dsn, device_meter, site, gateway)
    replayed = asyncio.run(replay(lane, read_letters(lane, reasons=["unregistered_meter"])))
    assert len(replayed.replayed) == 4 and not replayed.refused
    asyncio.run(_write_until(lane, lambda: len(_stored(lane.db.dsn, node_meter)) >= 5))
    assert _stored(lane.db.dsn, node_meter) == [1000.0, 1001.5, 1004.5, 1006.0, 1007.5]
    # Births repeat the device's unchanged counter at new times: 4 readings, not 4 values.
    asyncio.run(_write_until(lane, lambda: len(_stored(lane.db.dsn, device_meter)) >= 4))
    assert _stored(lane.db.dsn, device_meter) == [500.0, 500.25, 500.25, 500.25]


def test_will_marks_the_host_offline(settings: Settings) -> None:
    """The broker publishes the host's Will — offline STATE with the CONNECT's timestamp, QoS 1 —
    when the host's session ends without DISCONNECT. The session is ended by a second client taking
    over the host's client id (MQTT 3.1.1 §3.1.4-2: the server disconnects the existing client),
    which is what a network loss looks like to the broker, without killing this test's process."""
    lane = _lane(settings)
    tag = uuid.uuid4().hex[:8]
    host_id = f"scopemeter-{tag}"
    watch = _Watcher(lane, f"spBv1.0/STATE/{host_id}")
    try:
        with _host(lane, f"g-{tag}", host_id, SparkplugMap()):
            for _ in range(100):
                if watch.messages:
                    break
                threading.Event().wait(0.1)
            thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"scopemeter-sparkplug-{host_id}")
            thief.connect(lane.mqtt.host, lane.mqtt.port)
            thief.loop_start()
            for _ in range(100):
                if len(watch.messages) >= 2:
                    break
                threading.Event().wait(0.1)
            thief.disconnect()
            thief.loop_stop()
    finally:
        watch.close()
    payloads = [json.loads(m.payload) for m in watch.messages]
    assert payloads[0]["online"] is True
    assert payloads[1]["online"] is False and payloads[1]["timestamp"] == payloads[0]["timestamp"]
    assert watch.messages[1].qos == 1


def test_no_payload_can_raise_out_of_the_host_state_machine() -> None:
    """Fuzz: random bytes and hostile but well-formed payloads (NaN bdSeq, huge timestamps, seq past
    255, aliases without births) on every Sparkplug topic kind give an Outcome, never an exception."""
    import math

    from hypothesis import example, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    from ingest.admit import Registry
    from ingest.sparkplug.host import pb

    state = HostState(SparkplugMap.model_validate({
        "nodes": [{"group": "g", "node": "n", "gateway": "gw"}],
        "metrics": [{"group": "g", "node": "n", "metric": "E", "meter": "m"}],
    }), Registry(), Settings())  # fmt: skip
    kinds = st.sampled_from(["NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH", "NCMD", "STATE"])
    numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 2**64 - 1))

    def payload(seq: int | None, ts: int, metrics: list[tuple[str | None, int | None, Any]]) -> bytes:
        p = pb.Payload(timestamp=ts)
        if seq is not None:
            p.seq = seq
        for name, alias, value in metrics:
            m = p.metrics.add()
            if name is not None:
                m.name = name
            if alias is not None:
                m.alias = alias
            if isinstance(value, float):
                m.double_value = value
            else:
                m.long_value = value
        return bytes(p.SerializeToString())

    wellformed = st.builds(
        payload,
        st.one_of(st.none(), st.integers(0, 2**64 - 1)),
        st.integers(0, 2**64 - 1),
        st.lists(
            st.tuples(
                st.sampled_from([None, "bdSeq", "E", "x"]),
                st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                numbers,
            ),
            max_size=4,
        ),
    )

    birth = payload(0, 1_700_000_000_000, [("bdSeq", None, 3), ("E", 1, 5.0)])

    def templated(kind_seq: int, definition: bool, ref: str | None, member_alias: int | None) -> bytes:
        """A Template metric (datatype 19) "E", whose one member is itself a Template (cases for
        tests/test_sparkplug_templates.py's rules reached through this test's scalar mapping)."""
        p = pb.Payload.FromString(payload(kind_seq, 1_700_000_000_000, [("bdSeq", None, 3)]))
        m = p.metrics.add(name="E", alias=1, datatype=19)
        m.template_value.is_definition = definition
        if ref is not None:
            m.template_value.template_ref = ref
        inner = m.template_value.metrics.add(datatype=19)
        if member_alias is not None:
            inner.alias = member_alias
        inner.template_value.template_ref = "E"
        return bytes(p.SerializeToString())

    @hsettings(max_examples=400, deadline=None)
    @given(kinds, st.sampled_from(["pm1", None]), st.one_of(st.binary(max_size=64), wellformed))
    @example("NBIRTH", None, payload(0, 1, [("bdSeq", None, math.nan)]))
    @example("NBIRTH", None, payload(0, 1, [("bdSeq", None, math.inf)]))
    @example("NDEATH", None, payload(None, 1, [("bdSeq", None, math.nan)]))
    @example("NBIRTH", None, payload(0, 2**64 - 1, [("bdSeq", None, 1), ("E", 1, 5.0)]))
    @example("DDEATH", "pm1", payload(1, 2**64 - 1, []))
    @example("NBIRTH", None, templated(0, True, None, None))  # a definition containing itself
    @example("DBIRTH", "pm1", templated(1, False, "E", 2**64 - 1))  # the mapped scalar as an instance
    @example("DDATA", "pm1", templated(2, False, None, 1))  # a member alias naming the instance itself
    def check(kind: str, device: str | None, raw: bytes) -> None:
        topic = f"spBv1.0/g/{kind}/n" + (f"/{device}" if device else "")
        state._handle("spBv1.0/g/NBIRTH/n", birth)  # often a node is alive, so data paths run too
        state._handle("spBv1.0/g/DBIRTH/n/pm1", payload(1, 1_700_000_000_000, [("E", 2, 5.0)]))
        out = state._handle(topic, raw)  # the rules themselves, not handle()'s catch-all, must hold
        assert out is not None

    check()


def test_mapping_errors_name_the_file_and_entry(tmp_path: Path) -> None:
    """The mapping is part of the fleet registry file: its mistakes are refused like the registry's,
    naming the file and the entry, and it may name only gateways and meters of that registry."""
    from compute.config import ConfigError

    fleet = ('[[suppliers]]\nid = "sup"\nname = "S"\n\n[[sites]]\nid = "s"\nsupplier = "sup"\nname = "S"\n'
             'grid_region = "CN"\ntimezone = "Asia/Shanghai"\n\n[[gateways]]\nid = "gw"\nsite = "s"\n\n'
             '[[meters]]\nid = "m"\nsite = "s"\ngateway = "gw"\ncarrier = "electricity"\n'
             'model = "x"\n\n')  # fmt: skip
    node = '[[sparkplug.nodes]]\ngroup = "g"\nnode = "n"\ngateway = "gw"\n'
    path = tmp_path / "fleet.toml"
    metric = '\n[[sparkplug.metrics]]\ngroup = "g"\nnode = "{node}"\nmetric = "E"\nmeter = "{meter}"\n'
    path.write_text(fleet + node + metric.format(node="other", meter="m"))
    with pytest.raises(ConfigError, match=r"fleet.toml.*edge node g/other is not in \[\[nodes\]\]"):
        load_map(path)
    path.write_text(fleet + node + "port = 1\n")
    with pytest.raises(ConfigError, match=r"fleet.toml.*port"):
        load_map(path)
    path.write_text(fleet + node.replace('"gw"', '"gw-elsewhere"'))
    with pytest.raises(ConfigError, match=r"fleet.toml: \[sparkplug\] node g/n: unknown gateway 'gw-else"):
        load_map(path)
    path.write_text(fleet + node + metric.format(node="n", meter="x"))
    with pytest.raises(ConfigError, match=r"fleet.toml: \[sparkplug\] metric 'E': unknown meter 'x'"):
        load_map(path)


def test_host_listens_for_the_mapped_groups_unless_told(tmp_path: Path) -> None:
    """The systemd unit starts the host without --group: it listens for every group fleet.toml maps,
    and a registry that maps none is refused, naming the file."""
    from ingest.sparkplug.host import listen_groups
    from ops.errors import UserError

    nodes = SparkplugMap.model_validate({"nodes": [
        {"group": "plant-b", "node": "n1", "gateway": "gw1"},
        {"group": "plant-a", "node": "n2", "gateway": "gw2"},
        {"group": "plant-b", "node": "n3", "gateway": "gw3"},
    ]})  # fmt: skip
    source = tmp_path / "fleet.toml"
    assert listen_groups(nodes, None, source) == ["plant-a", "plant-b"]
    assert listen_groups(nodes, ["plant-c"], source) == ["plant-c"]
    with pytest.raises(UserError, match=r"fleet.toml: no \[\[sparkplug.nodes\]\]"):
        listen_groups(SparkplugMap(), None, source)
