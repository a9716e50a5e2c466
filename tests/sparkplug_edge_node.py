"""A Sparkplug B edge node driven by pysparkplug (an independent implementation), for
tests/test_sparkplug.py. It runs in its own venv (pysparkplug needs paho-mqtt < 2), speaks to the
real Mosquitto, and prints one JSON line per event it sees (the host's STATE, each NCMD), decoded
by pysparkplug, then ``{"event": "done"}``.

Usage: python sparkplug_edge_node.py MQTT_HOST MQTT_PORT GROUP NODE HOST_ID BDSEQ

Script: NBIRTH (bdSeq, Node Control/Rebirth, "Energy/Import kWh" alias 1, "Power/Total W" alias 2),
DBIRTH of device pm1 ("Energy Import" alias 10); NDATA and DDATA by alias; then an NDATA whose seq
skips one (the host must ask for a rebirth; the node rebirths with the same bdSeq); then an NDATA
with an alias no birth defined (rebirth again); then DDEATH of pm1 and NDEATH.
"""

from __future__ import annotations

import json
import queue
import sys
import time

import pysparkplug as sp

HOST, PORT, GROUP, NODE, HOST_ID, BDSEQ = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6], int(sys.argv[6])
events: queue.Queue[dict[str, object]] = queue.Queue()


def emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def now_ms() -> int:
    return int(time.time() * 1000)


def on_ncmd(_c: sp.Client, message: sp.Message) -> None:
    metrics = [
        {"name": m.name, "value": m.value, "datatype": m.datatype.name} for m in message.payload.metrics
    ]
    event = {"event": "ncmd", "topic": str(message.topic), "qos": int(message.qos), "metrics": metrics}
    events.put(event)
    emit(event)


def on_state(_c: sp.Client, message: sp.Message) -> None:
    p = message.payload
    emit({"event": "state", "topic": str(message.topic), "online": p.online, "timestamp": p.timestamp,
          "retain": bool(message.retain), "qos": int(message.qos)})  # fmt: skip
    if p.online:
        events.put({"event": "host_online"})


def wait(kind: str, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.2)
        except queue.Empty:
            continue
        if event["event"] == kind:
            return event
    emit({"event": "timeout", "waiting_for": kind})
    sys.exit(3)


client = sp.Client(client_id=f"edge-{NODE}")
ndeath_topic = sp.Topic(message_type=sp.MessageType.NDEATH, group_id=GROUP, edge_node_id=NODE)
bd = sp.Metric(timestamp=now_ms(), name="bdSeq", datatype=sp.DataType.INT64, value=BDSEQ)
client.set_will(sp.Message(ndeath_topic, sp.NDeath(now_ms(), bd), sp.QoS.AT_LEAST_ONCE, retain=False))
client.subscribe(sp.Topic(message_type=sp.MessageType.NCMD, group_id=GROUP, edge_node_id=NODE),
                 sp.QoS.AT_LEAST_ONCE, on_ncmd)  # fmt: skip
client.subscribe(sp.Topic(message_type=sp.MessageType.STATE, sparkplug_host_id=HOST_ID), sp.QoS.AT_LEAST_ONCE,
                 on_state)  # fmt: skip
client.connect(HOST, port=PORT, blocking=False)
wait("host_online")

seq = 0
energy = 1000.0
device_energy = 500.0


def publish(kind: sp.MessageType, payload: object, device: str | None = None) -> None:
    topic = sp.Topic(message_type=kind, group_id=GROUP, edge_node_id=NODE, device_id=device)
    client.publish(sp.Message(topic, payload, sp.QoS.AT_MOST_ONCE, retain=False), include_dtypes=True)
    time.sleep(0.05)


def next_seq() -> int:
    global seq
    seq = (seq + 1) % 256
    return seq


def birth() -> None:
    """NBIRTH (seq 0, same bdSeq: no new MQTT session) and DBIRTH with current values."""
    global seq
    seq = 0
    t = now_ms()
    publish(sp.MessageType.NBIRTH, sp.NBirth(t, 0, (
        sp.Metric(t, "bdSeq", sp.DataType.INT64, value=BDSEQ),
        sp.Metric(t, "Node Control/Rebirth", sp.DataType.BOOLEAN, value=False),
        sp.Metric(t, "Energy/Import kWh", sp.DataType.DOUBLE, value=energy, alias=1),
        sp.Metric(t, "Power/Total W", sp.DataType.FLOAT, value=1234.5, alias=2),
    )))  # fmt: skip
    publish(sp.MessageType.DBIRTH, sp.DBirth(t, next_seq(), (
        sp.Metric(t, "Energy Import", sp.DataType.DOUBLE, value=device_energy, alias=10),
    )), device="pm1")  # fmt: skip


def ndata(value: float, *, alias: int = 1, seq_no: int | None = None) -> None:
    t = now_ms()
    s = next_seq() if seq_no is None else seq_no
    publish(
        sp.MessageType.NDATA,
        sp.NData(t, s, (sp.Metric(t, None, sp.DataType.DOUBLE, value=value, alias=alias),)),
    )


birth()  # e0 = 1000, d0 = 500
time.sleep(0.01)
energy += 1.5
ndata(energy)  # seq 2: e1 = 1001.5
device_energy += 0.25
t = now_ms()
publish(sp.MessageType.DDATA, sp.DData(t, next_seq(), (
    sp.Metric(t, None, sp.DataType.DOUBLE, value=device_energy, alias=10),
)), device="pm1")  # fmt: skip  # seq 3: d1 = 500.25

energy += 1.5
ndata(energy, seq_no=5)  # seq 4 never sent: a gap
wait("ncmd")
energy += 1.5
birth()  # e3 = 1004.5, d3 = 500.25

energy += 1.5
t = now_ms()
publish(sp.MessageType.NDATA, sp.NData(t, next_seq(), (
    sp.Metric(t, None, sp.DataType.DOUBLE, value=energy, alias=1),  # e4 = 1006
    sp.Metric(t, None, sp.DataType.DOUBLE, value=7.0, alias=99),  # no birth defined alias 99
)))  # fmt: skip
wait("ncmd")
energy += 1.5
birth()  # e5 = 1007.5, d5 = 500.25

publish(sp.MessageType.DDEATH, sp.DDeath(now_ms(), next_seq()), device="pm1")
t = now_ms()
publish(sp.MessageType.NDEATH, sp.NDeath(t, sp.Metric(t, "bdSeq", sp.DataType.INT64, value=BDSEQ)))
time.sleep(0.5)
client.disconnect()
emit({"event": "done"})
