"""Sparkplug B Template (UDT) instances: the host reads their numeric members.

The independent peer is Eclipse Tahu 1.0.12 (``org.eclipse.tahu:tahu-core``, Maven Central), the
Sparkplug reference implementation: tests/sparkplug_tahu/TahuTemplateNode.java builds NBIRTH with
Template definitions, DBIRTH with an instance and DDATA with changed members through Tahu's own
``TemplateBuilder``/``SparkplugBPayloadBuilder`` and encodes them with ``SparkplugBPayloadEncoder``;
this test publishes those bytes through the real Mosquitto to the host, and the readings go through
the bridge's checks, Kafka and the writer to PostgreSQL. (pysparkplug 0.6.1, the peer of
tests/test_sparkplug.py, has no templates.) The jars are fetched once with Maven into
~/.cache/scopemeter/sparkplug-tahu/ and checked against tests/sparkplug_tahu/jars.lock (sha256).

Assertions of the Sparkplug 3.0 specification (eclipse-sparkplug/sparkplug, commit e45b610,
specification/src/main/asciidoc/chapters/Sparkplug_6_Payloads.adoc §6.4.x "Template") the host
relies on or checks, by id:

- tck-id-payloads-template-definition-nbirth-only ("Template Definitions MUST only be included in
  NBIRTH messages"): a definition elsewhere is a ``sparkplug_metric`` letter.
- tck-id-payloads-template-definition-nbirth ("A Template Definition MUST be included in the NBIRTH
  for all Template Instances that are included in the NBIRTH and DBIRTH messages"), and
  tck-id-topics-nbirth-templates (Sparkplug_4_Topics.adoc, the same rule for the NBIRTH topic): an
  instance of an undefined template is a letter, its members are not read.
- tck-id-payloads-template-definition-is-definition, -instance-is-definition: is_definition tells
  the two apart. tck-id-payloads-template-definition-ref: a definition with a template_ref is a letter.
- tck-id-payloads-template-instance-ref, tck-id-payloads-template-ref-instance ("A Template Instance
  MUST have template_ref set to the type of template definition it is"): a birth's instance without
  one is a letter; in data the birth's template is used (Tahu repeats it, the spec does not ask).
- tck-id-payloads-template-definition-members, tck-id-payloads-template-instance-members ("MUST
  include only members that were included in the corresponding template definition"): an unknown
  member, or a member whose datatype differs from the definition's, is a letter.
- tck-id-payloads-template-instance-members-birth (all members in a birth) is checked and lettered;
  tck-id-payloads-template-instance-members-data (data MAY carry a subset) is what DDATA here does.
- tck-id-payloads-alias-uniqueness, -alias-birth-requirement, -alias-data-cmd-requirement: members
  carry aliases from the birth, and data names instance and members by alias only; an alias no birth
  defined brings a Rebirth Request, as for plain metrics.
- §6.4.16 Datatypes: Int8..Int32 travel in uint32, Int64 in uint64; Tahu writes them in two's
  complement and the host sign-extends (Power W = -350 below).

DataSets (§6.4.x "DataSet") are not read: a row has no timestamp, so no clear reading exists; a
mapped DataSet metric is a ``sparkplug_metric`` letter, an unmapped one is ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from compute.config import ConfigError
from compute.fleet import SparkplugMap
from edge.wire import Batch
from ingest.admit import Registry
from ingest.dlq_tools import read_letters
from ingest.sparkplug.host import HostState, Outcome, load_map, pb
from ops import maven_jars
from ops.settings import Settings
from tests.test_sparkplug import _host, _lane, _register, _write_until

TAHU = Path(__file__).parent / "sparkplug_tahu"
JAVA_SOURCE = TAHU / "TahuTemplateNode.java"


# --- Eclipse Tahu, built once -------------------------------------------------------------------


@pytest.fixture(scope="session")
def tahu_classpath() -> str:
    """Tahu's jars (Maven, checked against jars.lock by ``ops.maven_jars``, as Kafka's are) and
    TahuTemplateNode compiled against them, cached by the hash of the pom, the lock and the source."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scopemeter" / "sparkplug-tahu"
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in (TAHU / "pom.xml", TAHU / "jars.lock", JAVA_SOURCE))
    )
    root = cache / key.hexdigest()[:12]
    libs = maven_jars.verified_jars(TAHU / "pom.xml", TAHU / "jars.lock", root / "libs", "Tahu")
    classes = root / "classes"
    if not (classes / ".built").exists():
        with maven_jars.file_lock(root / ".build.lock"):
            if not (classes / ".built").exists():
                staging = Path(tempfile.mkdtemp(prefix="classes-", dir=root))
                try:
                    subprocess.run(["javac", "-d", str(staging), "-cp", f"{libs}/*", str(JAVA_SOURCE)],
                                   check=True, capture_output=True, timeout=300)  # fmt: skip
                    (staging / ".built").write_text(f"{JAVA_SOURCE.name} compiled against {libs}\n")
                    shutil.rmtree(classes, ignore_errors=True)
                    staging.rename(classes)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    return f"{libs}/*:{classes}"


# --- through Mosquitto, Kafka and PostgreSQL ----------------------------------------------------


def _rows(dsn: str, meters: list[str]) -> dict[str, list[tuple[str, int, float]]]:
    """meter → [(quantity, ts in ms since the epoch, value)] as PostgreSQL stores them."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT meter_id, quantity, ts, value FROM readings WHERE meter_id = ANY(%s)"
            " ORDER BY ts, quantity",
            (meters,),
        ).fetchall()
    out: dict[str, list[tuple[str, int, float]]] = {m: [] for m in meters}
    for meter, quantity, ts, value in rows:
        out[meter].append((quantity, round(ts.timestamp() * 1000), value))
    return out


def test_tahu_template_edge_node_through_mosquitto_kafka_and_postgresql(
    settings: Settings, tahu_classpath: str, tmp_path: Path
) -> None:
    lane = _lane(settings)
    tag = uuid.uuid4().hex[:8]
    group, node, host_id = f"plant-{tag}", f"edge-{tag}", f"scopemeter-{tag}"
    energy, power, phase, serial, incomer = (f"{x}-{tag}" for x in ("spte", "sptp", "spta", "spts", "spti"))
    meters = [energy, power, phase, serial, incomer]
    supplier, site, gateway = _register(lane.db.dsn, tag, meters)
    mapping_file = tmp_path / "fleet.toml"
    meter_entries = "".join(
        f'\n[[meters]]\nid = "{m}"\nsite = "{site}"\ngateway = "{gateway}"\ncarrier = "electricity"\n'
        f'model = "sparkplug"\n'
        for m in meters
    )
    mapping_file.write_text(f"""
[[suppliers]]
id = "{supplier}"
name = "Supplier {tag}"

[[sites]]
id = "{site}"
supplier = "{supplier}"
name = "Site {tag}"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[gateways]]
id = "{gateway}"
site = "{site}"
{meter_entries}
[[sparkplug.nodes]]
group = "{group}"
node = "{node}"
gateway = "{gateway}"

[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
device = "pm1"
metric = "Meter1"
member = "Energy Import kWh"
meter = "{energy}"

[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
device = "pm1"
metric = "Meter1"
member = "Power W"
meter = "{power}"
quantity = "power_w"

[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
device = "pm1"
metric = "Meter1"
member = ["Phase A", "Energy kWh"]
meter = "{phase}"

[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
metric = "Incomer"
member = "Energy kWh"
meter = "{incomer}"

# A string member mapped by mistake: refused as a sparkplug_metric letter, the rest is read.
[[sparkplug.metrics]]
group = "{group}"
node = "{node}"
device = "pm1"
metric = "Meter1"
member = "Serial"
meter = "{serial}"
""")
    mapping = load_map(mapping_file)
    base = (int(time.time()) - 60) * 1000  # whole seconds: PostgreSQL's µs keep them exact
    payloads = tmp_path / "tahu"
    subprocess.run(
        ["java", "-cp", tahu_classpath, "TahuTemplateNode", str(payloads), "7", str(base)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    files = sorted(payloads.glob("*.bin"))
    assert [f.name for f in files] == [
        "00-NBIRTH.bin",
        "01-DBIRTH-pm1.bin",
        "02-DDATA-pm1.bin",
        "03-DDATA-pm1.bin",
        "04-NDATA.bin",
    ]

    with _host(lane, group, host_id, mapping) as box:
        edge = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tahu-{tag}")
        edge.connect(lane.mqtt.host, lane.mqtt.port)
        edge.loop_start()
        try:
            for f in files:  # QoS 1 (Sparkplug data is QoS 0): this test is not about loss
                kind, *device = f.stem.split("-")[1:]
                topic = f"spBv1.0/{group}/{kind}/{node}" + "".join(f"/{d}" for d in device)
                edge.publish(topic, f.read_bytes(), qos=1).wait_for_publish(10)
        finally:
            edge.disconnect()
            edge.loop_stop()
        host = box["host"]
        for _ in range(300):  # NBIRTH, DBIRTH, two DDATA, NDATA: five batches; the Serial letter
            if host.produced >= 5 and host.refused >= 1:
                break
            threading.Event().wait(0.1)
        state: HostState = host.state

    assert state.rebirths == []  # every alias Tahu used in DDATA was defined by the births
    assert set(state.nodes[(group, node)].templates) == {"Phase", "PowerMeter"}
    (letter,) = read_letters(lane)
    assert letter.reason == "sparkplug_metric" and "'Meter1' / 'Serial' is String" in letter.detail

    # The values TahuTemplateNode.java put in, at the times it gave them (base + 0 … 4 s).
    asyncio.run(_write_until(lane, lambda: sum(map(len, _rows(lane.db.dsn, meters).values())) >= 8))
    stored = _rows(lane.db.dsn, meters)
    assert stored == {
        energy: [("energy_import_kwh", base + 1000, 1234.5), ("energy_import_kwh", base + 2000, 1235.75)],
        power: [("power_w", base + 1000, -350.0), ("power_w", base + 2000, -420.0)],
        phase: [("energy_import_kwh", base + 1000, 400.25), ("energy_import_kwh", base + 3000, 401.5)],
        serial: [],
        incomer: [("energy_import_kwh", base, 5000.5), ("energy_import_kwh", base + 4000, 5001.25)],
    }


# --- the state machine on hand-built payloads ---------------------------------------------------

T0 = 1_700_000_000_000
DOUBLE, INT32, INT64, UINT32, STRING, DATASET, TEMPLATE = 10, 3, 4, 7, 12, 16, 19


def _fill(m: Any, name: str | None, alias: int | None, datatype: int | None, value: Any) -> None:
    """One metric: value is a number, a string, a DataSet ("dataset") or a template dict
    {"definition": bool, "ref": str | None, "members": [(name, alias, datatype, value), ...]}."""
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if datatype is not None:
        m.datatype = datatype
    m.timestamp = T0
    if isinstance(value, dict):
        t = m.template_value
        t.is_definition = value.get("definition", False)
        if value.get("ref") is not None:
            t.template_ref = value["ref"]
        for member in value.get("members", []):
            _fill(t.metrics.add(), *member)
    elif value == "dataset":
        m.dataset_value.num_of_columns = 1
        m.dataset_value.columns.append("kWh")
        m.dataset_value.types.append(DOUBLE)
        m.dataset_value.rows.add().elements.add().double_value = 5.0
    elif isinstance(value, str):
        m.string_value = value
    elif isinstance(value, int) and datatype in (INT32, UINT32, None):
        m.int_value = value
    elif isinstance(value, int) and datatype == INT64:
        m.long_value = value
    elif value is not None:
        m.double_value = value


def _payload(seq: int, *metrics: tuple[str | None, int | None, int | None, Any]) -> bytes:
    p = pb.Payload(timestamp=T0, seq=seq)
    for m in metrics:
        _fill(p.metrics.add(), *m)
    return bytes(p.SerializeToString())


METER_DEF = {
    "definition": True,
    "members": [
        ("Energy", None, DOUBLE, 0.0),
        ("Power", None, INT32, 0),
        ("Phase A", None, TEMPLATE, {"ref": "Phase", "members": [("E", None, DOUBLE, 0.0)]}),
    ],
}
NBIRTH = _payload(
    0,
    ("bdSeq", None, INT64, 1),
    ("Phase", None, TEMPLATE, {"definition": True, "members": [("E", None, DOUBLE, 0.0)]}),
    ("Meter", None, TEMPLATE, METER_DEF),
)


def _instance(
    ref: str | None = "Meter",
    energy: Any = ("Energy", 11, DOUBLE, 10.0),
    extra: tuple[Any, ...] = (),
    power: Any = ("Power", 12, INT32, 2**32 - 5),
) -> dict[str, Any]:
    members = [m for m in (energy, power) if m is not None]
    members.append(("Phase A", 13, TEMPLATE, {"ref": "Phase", "members": [("E", 14, DOUBLE, 3.0)]}))
    return {"ref": ref, "members": [*members, *extra]}


def _state(*metrics: dict[str, Any]) -> HostState:
    base = {"group": "g", "node": "n", "device": "pm1", "meter": "m"}
    return HostState(
        SparkplugMap.model_validate(
            {
                "nodes": [{"group": "g", "node": "n", "gateway": "gw"}],
                "metrics": [{**base, **m, "meter": f"m{i}"} for i, m in enumerate(metrics)],
            }
        ),
        Registry(),
        Settings(),
    )


MAPPED = (
    {"metric": "M1", "member": "Energy"},
    {"metric": "M1", "member": "Power", "quantity": "power_w"},
    {"metric": "M1", "member": ["Phase A", "E"]},
)


def _run(state: HostState, *messages: tuple[str, bytes]) -> list[Outcome]:
    return [state.handle(topic, raw) for topic, raw in [("spBv1.0/g/NBIRTH/n", NBIRTH), *messages]]


def _values(outs: list[Outcome]) -> list[tuple[str, float]]:
    return [(r.meter_id, r.value) for o in outs for _, b in o.batches for r in Batch.decode(b).readings]


def _letters(outs: list[Outcome]) -> list[str]:
    assert all(reason == "sparkplug_metric" for o in outs for reason, *_ in o.letters)
    return [detail for o in outs for _, detail, _, _ in o.letters]


DBIRTH = "spBv1.0/g/DBIRTH/n/pm1"
DDATA = "spBv1.0/g/DDATA/n/pm1"


def test_members_are_read_by_name_and_alias_and_signed_types_sign_extended() -> None:
    outs = _run(
        _state(*MAPPED),
        (DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance()))),
        # data by alias only, a subset of the members, no datatype and no template_ref (both optional)
        (DDATA, _payload(2, (None, 10, None, {"members": [(None, 11, None, 12.5)]}))),
        (
            DDATA,
            _payload(
                3, (None, 10, None, {"members": [(None, 13, None, {"members": [(None, 14, None, 4.0)]})]})
            ),
        ),
    )
    assert _values(outs) == [("m0", 10.0), ("m1", -5.0), ("m2", 3.0), ("m0", 12.5), ("m2", 4.0)]
    assert _letters(outs) == []


@pytest.mark.parametrize(
    ("messages", "letter", "values"),
    [
        pytest.param(
            [(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance(ref="Nope"))))],
            "refers to template 'Nope', which the NBIRTH does not define "
            "[tck-id-payloads-template-definition-nbirth]",
            [],
            id="unknown-definition",
        ),
        pytest.param(
            [(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance(ref=None))))],
            "has no template_ref [tck-id-payloads-template-instance-ref]",
            [],
            id="no-template-ref",
        ),
        pytest.param(
            [(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance(power=("Power", 12, DOUBLE, 7.0)))))],
            "member 'M1' / 'Power' is Double, its template definition says Int32",
            [("m0", 10.0), ("m2", 3.0)],
            id="member-type-mismatch",
        ),
        pytest.param(
            [(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance(extra=(("Volts", 15, DOUBLE, 230.0),)))))],
            "member 'Volts' of 'M1' is not in template 'Meter' [tck-id-payloads-template-instance-members]",
            [("m0", 10.0), ("m1", -5.0), ("m2", 3.0)],
            id="member-not-in-definition",
        ),
        pytest.param(
            [(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance(energy=None))))],
            "lacks members ['Energy'] of 'Meter' [tck-id-payloads-template-instance-members-birth]",
            [("m1", -5.0), ("m2", 3.0)],
            id="birth-lacks-a-member",
        ),
        pytest.param(
            [(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance(energy=(None, 11, DOUBLE, 10.0)))))],
            "a member of 'M1' has no name in a birth [tck-id-payloads-alias-birth-requirement]",
            [("m1", -5.0), ("m2", 3.0)],
            id="birth-member-without-name",
        ),
        pytest.param(
            [
                (
                    "spBv1.0/g/NBIRTH/n",
                    _payload(
                        0,
                        ("bdSeq", None, INT64, 2),
                        (
                            "Bad",
                            None,
                            TEMPLATE,
                            {"definition": True, "ref": "Meter", "members": [("E", None, DOUBLE, 0.0)]},
                        ),
                    ),
                )
            ],
            "template definition 'Bad' has a template_ref [tck-id-payloads-template-definition-ref]",
            [],
            id="definition-with-template-ref",
        ),
        pytest.param(
            [(DBIRTH, _payload(1, ("D", None, TEMPLATE, METER_DEF)))],
            "template definition 'D' in DBIRTH, not at the top of an NBIRTH "
            "[tck-id-payloads-template-definition-nbirth-only]",
            [],
            id="definition-in-dbirth",
        ),
        pytest.param(
            [
                (DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance()))),
                (DDATA, _payload(2, (None, 10, None, {"ref": "Phase", "members": [(None, 11, None, 1.0)]}))),
            ],
            "refers to 'Phase', its birth or definition to 'Meter'",
            [("m0", 10.0), ("m1", -5.0), ("m2", 3.0)],
            id="data-with-another-template-ref",
        ),
        pytest.param(
            [
                (DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance()))),
                (DDATA, _payload(2, (None, 10, None, {"members": [(None, 14, None, 1.0)]}))),
            ],
            "alias 14 in 'M1' names 'M1' / 'Phase A' / 'E'",
            [("m0", 10.0), ("m1", -5.0), ("m2", 3.0)],
            id="member-alias-of-another-instance",
        ),
    ],
)
def test_malformed_templates_are_dead_letters_and_the_rest_is_read(
    messages: list[tuple[str, bytes]], letter: str, values: list[tuple[str, float]]
) -> None:
    state = _state(*MAPPED)
    outs = _run(state, *messages)
    (detail,) = _letters(outs)
    assert letter in detail
    assert _values(outs) == values
    assert state.rebirths == []  # the gateway's mistake: a rebirth would repeat it


def test_unknown_member_alias_in_data_asks_for_a_rebirth() -> None:
    state = _state(*MAPPED)
    outs = _run(
        state,
        (DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance()))),
        (DDATA, _payload(2, (None, 10, None, {"members": [(None, 999, None, 1.0), (None, 11, None, 11.0)]}))),
    )
    assert [why for *_, why in state.rebirths] == ["DDATA with unknown alias 999"]
    assert _values(outs)[-1] == ("m0", 11.0) and _letters(outs) == []


def test_mapped_datasets_and_shapes_that_do_not_fit_the_mapping_are_letters() -> None:
    state = _state({"metric": "Table"}, {"metric": "M1"}, {"metric": "Flat", "member": "Energy"})
    outs = _run(
        state,
        (
            DBIRTH,
            _payload(
                1,
                ("Table", 1, DATASET, "dataset"),
                ("Other table", 2, DATASET, "dataset"),
                ("M1", 10, TEMPLATE, _instance()),
                ("Flat", 3, DOUBLE, 1.0),
            ),
        ),
    )
    (detail,) = _letters(outs)
    assert "mapped metric 'M1' is a Template instance: map its members" in detail
    assert "mapped metric 'Table' is a DataSet: DataSets are not read" in detail
    assert "mapped 'Flat' is Double, not a Template instance" in detail
    assert "Other table" not in detail  # unmapped: ignored like any unmapped metric
    assert _values(outs) == []


def test_signed_scalars_are_sign_extended() -> None:
    state = _state(
        {"metric": "P32", "quantity": "power_w"},
        {"metric": "P64", "quantity": "power_w"},
        {"metric": "U32", "quantity": "power_w"},
    )
    outs = _run(
        state,
        (
            DBIRTH,
            _payload(
                1, ("P32", 1, INT32, 2**32 - 350), ("P64", 2, INT64, 2**64 - 7), ("U32", 3, UINT32, 2**32 - 1)
            ),
        ),
        (DDATA, _payload(2, (None, 1, None, 2**32 - 1))),  # no datatype: read as the birth's Int32
    )
    assert _values(outs) == [("m0", -350.0), ("m1", -7.0), ("m2", 4294967295.0), ("m0", -1.0)]


def test_no_template_payload_can_raise_out_of_the_host_state_machine() -> None:
    """Fuzz: nested templates with random names, aliases, refs, datatypes and definition flags, in
    births and data, never raise out of the rules (``_handle``, not ``handle``'s catch-all)."""
    from hypothesis import given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    state = _state(*MAPPED, {"metric": "M1", "device": None}, {"metric": "X", "member": ["Y", "Z"]})
    names = st.sampled_from(
        [None, "", "M1", "Energy", "Power", "Phase A", "E", "Meter", "Phase", "X", "Y", "Z"]
    )
    aliases = st.one_of(st.none(), st.sampled_from([10, 11, 12, 13, 14]), st.integers(0, 2**64 - 1))
    datatypes = st.one_of(
        st.none(),
        st.sampled_from([DOUBLE, INT32, INT64, STRING, DATASET, TEMPLATE]),
        st.integers(0, 2**32 - 1),
    )
    scalars = st.one_of(
        st.floats(), st.integers(0, 2**32 - 1), st.text(max_size=3), st.just("dataset"), st.none()
    )
    metric = st.recursive(
        st.tuples(names, aliases, datatypes, scalars),
        lambda inner: st.tuples(
            names,
            aliases,
            datatypes,
            st.fixed_dictionaries(
                {
                    "definition": st.booleans(),
                    "ref": st.one_of(st.none(), names),
                    "members": st.lists(inner, max_size=4),
                }
            ),
        ),
        max_leaves=12,
    )
    topics = st.sampled_from(["spBv1.0/g/NBIRTH/n", DBIRTH, DDATA, "spBv1.0/g/NDATA/n"])

    @hsettings(max_examples=300, deadline=None)
    @given(topics, st.integers(0, 3), st.lists(metric, max_size=4))
    def check(topic: str, seq: int, metrics: list[tuple[Any, ...]]) -> None:
        state._handle("spBv1.0/g/NBIRTH/n", NBIRTH)
        state._handle(DBIRTH, _payload(1, ("M1", 10, TEMPLATE, _instance())))
        if topic.endswith("NBIRTH/n"):
            metrics = [("bdSeq", None, INT64, 1), *metrics]
            seq = 0
        try:
            raw = _payload(seq, *metrics)
        except (ValueError, TypeError):  # a value the protobuf field cannot hold: not a payload
            return
        assert state._handle(topic, raw) is not None

    check()
    # A definition whose member is an instance of itself, and an instance nested 40 deep in a birth:
    # the host follows the payload, not the definitions, so neither loops. 60 deep is 120 protobuf
    # levels, past the protobuf runtime's limit of 100: a sparkplug_decode letter, not a crash.
    cyclic = {"definition": True, "members": [("Self", None, TEMPLATE, {"ref": "Loop", "members": []})]}
    nbirth = _payload(0, ("bdSeq", None, INT64, 1), ("Loop", None, TEMPLATE, cyclic))
    for depth, letter in ((40, "sparkplug_metric"), (60, "sparkplug_decode")):
        state._handle("spBv1.0/g/NBIRTH/n", nbirth)
        deep: dict[str, Any] = {"ref": "Loop", "members": []}
        for _ in range(depth):
            deep = {"ref": "Loop", "members": [("Self", None, TEMPLATE, deep)]}
        out = state._handle(DBIRTH, _payload(1, ("L", 1, TEMPLATE, deep)))
        assert [reason for reason, *_ in out.letters] == [letter], depth
    assert out.letters[0][1].startswith("not a Sparkplug B payload")


# --- the mapping ---------------------------------------------------------------------------------

FLEET = (
    '[[suppliers]]\nid = "sup"\nname = "S"\n\n[[sites]]\nid = "s"\nsupplier = "sup"\nname = "S"\n'
    'grid_region = "CN"\n\n[[gateways]]\nid = "gw"\nsite = "s"\n\n[[meters]]\nid = "m"\nsite = "s"\n'
    'gateway = "gw"\ncarrier = "electricity"\nmodel = "x"\n\n'
    '[[sparkplug.nodes]]\ngroup = "g"\nnode = "n"\ngateway = "gw"\n'
)


def _metric(**keys: Any) -> str:
    keys = {"group": "g", "node": "n", "metric": "Meter1", "meter": "m", **keys}
    return "\n[[sparkplug.metrics]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())


def _toml(v: Any) -> str:
    return "[" + ", ".join(_toml(x) for x in v) + "]" if isinstance(v, list) else f'"{v}"'


def test_member_mapping_is_validated_naming_the_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET + _metric(member="Energy Import kWh") + _metric(member=["Phase A", "Energy kWh"]))
    assert [m.path for m in load_map(path).metrics] == [
        ("Meter1", "Energy Import kWh"),
        ("Meter1", "Phase A", "Energy kWh"),
    ]
    path.write_text(FLEET + _metric(member=""))
    with pytest.raises(ConfigError, match=r"fleet.toml: \[sparkplug\]: metrics.0.member"):
        load_map(path)
    path.write_text(FLEET + _metric(member=["Phase A", ""]))
    with pytest.raises(ConfigError, match=r"fleet.toml: \[sparkplug\]: metrics.0.member"):
        load_map(path)
    path.write_text(FLEET + _metric() + _metric(member="Energy"))
    with pytest.raises(
        ConfigError,
        match=r"fleet.toml: \[sparkplug\].*\[\[sparkplug.metrics\]\] #2 \(metric "
        r"'Meter1' member 'Energy'\).*mapped both as a number.*and as a Template instance",
    ):
        load_map(path)
    path.write_text(FLEET + _metric(member="Energy") + _metric(member="Energy", meter="m"))
    with pytest.raises(
        ConfigError, match=r"#2 \(metric 'Meter1' member 'Energy'\) of g/n/None is mapped twice"
    ):
        load_map(path)
    path.write_text(FLEET + _metric(member=["Phase A", "E"], meter="nope"))
    with pytest.raises(
        ConfigError,
        match=r"fleet.toml: \[sparkplug\] metric 'Meter1' member 'Phase A' / 'E': "
        r"unknown meter 'nope'",
    ):
        load_map(path)
