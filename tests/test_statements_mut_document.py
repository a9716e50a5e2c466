"""The statement document, function by function: the mutation tests of ``compute/statements/document.py``.

Derived content (month-on-month, intensity, allocation, disclosure, CDP SC1.1, PACT, uncertainty),
comparison paths, versions, customer views and Ed25519 signatures run on small in-memory figures
whose expected values are worked out by hand here. The inputs digest runs once against a real
PostgreSQL: its SHA-256 is recomputed in this test from the readings the test wrote.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compute.fleet import apply_fleet
from compute.recompute import Params
from compute.statements import keys
from compute.statements.config import (
    Allocation,
    Exclusion,
    Production,
    Reporting,
    StatementsConfig,
)
from compute.statements.document import (
    SCHEMA,
    SUPPLIER_AUDIENCE,
    UNCERTAINTY_METHOD,
    _items,
    build_inputs,
    canonical,
    cdp_sc1_1,
    check_signature,
    content_digest,
    derive,
    differences,
    disclosure,
    fingerprint,
    flatten,
    for_customer,
    key_id,
    keygen,
    load_private_key,
    load_public_key,
    meters_of,
    new_document,
    pact,
    public_key_path,
    readings_digest,
    sha256_hex,
    sign,
    signing_key,
    stated,
    text_differences,
    texts,
    uncertainty_pct,
)
from ops.errors import UserError
from tests.test_compute_support import compute_dsn, insert_rows

__all__ = ["compute_dsn"]

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
RAW = PUB.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON as the module doc defines it: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- canonical JSON and digests -------------------------------------------------------------------


def test_canonical_json_and_digest() -> None:
    assert canonical({"b": 1, "a": [1.5, "é"], "c": None, "d": {"y": True, "x": 0.1}}) == (
        '{"a":[1.5,"é"],"b":1,"c":null,"d":{"x":0.1,"y":true}}'.encode()
    )
    with pytest.raises(ValueError):
        canonical({"x": math.nan})
    assert (
        sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )  # FIPS 180-2
    assert content_digest({"b": 2, "a": "é"}) == hashlib.sha256('{"a":"é","b":2}'.encode()).hexdigest()


# --- derived content ------------------------------------------------------------------------------


def line(
    site: str, carrier: str, scope: int, method: str, kg: float, kwh: float = 100.0, est: float = 0.0
) -> dict[str, Any]:
    return {
        "site_id": site,
        "carrier": carrier,
        "unit": "kWh",
        "scope": scope,
        "method": method,
        "kg_co2e": kg,
        "kwh": kwh,
        "kwh_estimated": est,
    }


def figures() -> dict[str, Any]:
    return {
        "supplier": {"id": "acme", "name": "Acme"},
        "month": "2026-11",
        "totals": {
            "scope1": 10.0,
            "scope2_location": 20.0,
            "scope2_market": 15.0,
            "total_location": 30.0,
            "total_market": 25.0,
            "energy_kwh": 100.0,
        },
        "lines": [
            line("a", "natural_gas", 1, "direct", 8.0, kwh=100.0, est=25.0),
            line("a", "electricity", 2, "location", 20.0),
            line("a", "electricity", 2, "market", 100.0),  # neither in the uncertainty nor a source
            line("a", "diesel", 1, "direct", 0.0),  # no emissions: no class needed
            line("b", "steam", 2, "location", 1.0),
            line("b", "electricity", 2, "location", 10.0),
            line("b", "coal", 1, "direct", 3.0),
            line("b", "lpg", 1, "direct", 5.0),
        ],
        "meter_accuracy": [
            {
                "site_id": "a",
                "carrier": "natural_gas",
                "unit": "kWh",
                "worst_class_pct": 2.0,
                "meters_without_class": 0,
            },
            {
                "site_id": "a",
                "carrier": "electricity",
                "unit": "kWh",
                "worst_class_pct": 1.0,
                "meters_without_class": 0,
            },
            {
                "site_id": "b",
                "carrier": "steam",
                "unit": "kWh",
                "worst_class_pct": 4.0,
                "meters_without_class": 0,
            },
            {
                "site_id": "b",
                "carrier": "electricity",
                "unit": "kWh",
                "worst_class_pct": 0.5,
                "meters_without_class": 0,
            },
            {
                "site_id": "b",
                "carrier": "coal",
                "unit": "kWh",
                "worst_class_pct": 3.0,
                "meters_without_class": 0,
            },
            {
                "site_id": "b",
                "carrier": "lpg",
                "unit": "kWh",
                "worst_class_pct": 2.5,
                "meters_without_class": 0,
            },
        ],
        "not_metered": [{"kg_co2e": 2.0}, {"kg_co2e": None}, {"kg_co2e": 0.0}],
        "not_metered_kg": 2.0,
        "by_gas": {
            "scope1": {"co2": 9.0},
            "scope2_location": {"co2": 19.0},
            "gwp_sets": ["AR5"],
            "co2_only_factor_ids": ["cn"],
        },
        "boundary": [
            {
                "site_id": "a",
                "grid_region": "CN-South",
                "window_utc": ["2026-10-31T16:00:00+00:00", "2026-11-30T16:00:00+00:00"],
            },
            {
                "site_id": "b",
                "grid_region": "GB",
                "window_utc": ["2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00"],
            },
        ],
        "coverage": {"measured_share": 0.9, "bucket_share": 0.8},
    }


# Each line's measured part at its class, its estimated part at 20 %, in quadrature (GUM, independent
# inputs): gas 8 kg with 25 % estimated at class 2; electricity 20 kg at class 1 and 10 kg at 0.5;
# steam 1 kg at 4; coal 3 kg at 3; LPG 5 kg at 2.5; non-metered 2 kg at 20 %.
VARIANCE = (
    (8 * math.sqrt((0.75 * 2) ** 2 + (0.25 * 20) ** 2) / 100) ** 2
    + (20 * 0.01) ** 2
    + (10 * 0.005) ** 2
    + (1 * 0.04) ** 2
    + (3 * 0.03) ** 2
    + (5 * 0.025) ** 2
    + (2 * 0.20) ** 2
)
UNCERTAINTY = math.sqrt(VARIANCE) / (8 + 20 + 10 + 1 + 3 + 5 + 2) * 100
REPORTING = Reporting(
    supplier="acme",
    consolidation_approach="operational_control",
    base_year=2020,
    verification="limited",
    verifier="V Ltd",
    verification_standard="ISO 14064-3:2019",
    allocation_level="product",
    estimated_uncertainty_pct=20.0,
    exclusions=[Exclusion(what="canteen", reason="de minimis")],
)
CFG = StatementsConfig(
    allocations=[
        Allocation(supplier="acme", customer="lenovo", customer_name="Lenovo Group", share=0.25),
        Allocation(supplier="acme", customer="zte", customer_name="ZTE", share=0.5, basis="mass"),
        Allocation(supplier="other", customer="x", customer_name="X", share=0.5),
    ],
    production=[
        Production(supplier="acme", month="2026-11", quantity=50.0, unit="PCBA"),
        Production(supplier="acme", month="2026-10", quantity=10.0, unit="PCBA"),
    ],
    reporting=[REPORTING],
)


def test_month_on_month_intensity_and_allocation() -> None:
    previous = {
        "month": "2026-10",
        "totals": {
            "scope1": 8.0,
            "scope2_location": 0.0,
            "scope2_market": 12.0,
            "total_location": 8.0,
            "total_market": 20.0,
            "energy_kwh": 80.0,
        },
    }
    d = derive(figures(), previous, CFG)
    assert d["month_on_month"] == {
        "previous_month": "2026-10",
        "energy_kwh": {"previous": 80.0, "current": 100.0, "change_pct": 25.0},
        "scope1": {"previous": 8.0, "current": 10.0, "change_pct": 25.0},
        "scope2_location": {"previous": 0.0, "current": 20.0, "change_pct": None},  # from zero: no percentage
        "scope2_market": {"previous": 12.0, "current": 15.0, "change_pct": 25.0},
        "total_location": {"previous": 8.0, "current": 30.0, "change_pct": 275.0},
        "total_market": {"previous": 20.0, "current": 25.0, "change_pct": 25.0},
    }
    assert list(d["month_on_month"]) == [
        "previous_month",
        "energy_kwh",
        "scope1",
        "scope2_location",
        "scope2_market",
        "total_location",
        "total_market",
    ]
    assert d["intensity"] == {
        "production": 50.0,
        "unit": "PCBA",
        "kg_co2e_per_unit_location": 0.6,
        "kg_co2e_per_unit_market": 0.5,
        "kwh_per_unit": 2.0,
    }
    assert d["allocation"] == [
        {
            "customer": "lenovo",
            "customer_name": "Lenovo Group",
            "share": 0.25,
            "basis": "revenue",
            "scope3_category": "1 purchased goods and services",
            "scope1_kg": 2.5,
            "scope2_location_kg": 5.0,
            "scope2_market_kg": 3.75,
            "total_location_kg": 7.5,
            "total_market_kg": 6.25,
        },
        {
            "customer": "zte",
            "customer_name": "ZTE",
            "share": 0.5,
            "basis": "mass",
            "scope3_category": "1 purchased goods and services",
            "scope1_kg": 5.0,
            "scope2_location_kg": 10.0,
            "scope2_market_kg": 7.5,
            "total_location_kg": 15.0,
            "total_market_kg": 12.5,
        },
    ]
    assert d["unallocated_share"] == 0.25
    assert d["disclosure"]["uncertainty_pct"] == pytest.approx(UNCERTAINTY, rel=1e-12)
    assert [r["customer"] for r in d["cdp_sc1_1"]] == ["lenovo", "zte"]
    # The supplier's reporting, production and uncertainty reach the disclosure and CDP rows.
    disc = d["disclosure"]
    assert (disc["consolidation_approach"], disc["base_year"]) == ("operational_control", 2020)
    row = d["cdp_sc1_1"][0]
    assert (row["allocation_level"], row["quantity_supplied"], row["unit_for_quantity_supplied"]) == (
        "product",
        12.5,
        "PCBA",
    )
    assert row["uncertainty_pct"] == pytest.approx(UNCERTAINTY, rel=1e-12) and row["verified"] is True
    assert d["pact"]["primaryDataShare"] == pytest.approx(90.0)
    assert list(d) == [
        "month_on_month",
        "intensity",
        "allocation",
        "unallocated_share",
        "disclosure",
        "cdp_sc1_1",
        "pact",
    ]


def test_without_previous_month_production_or_reporting() -> None:
    bare = StatementsConfig(
        allocations=[
            Allocation(supplier="acme", customer="a", customer_name="A", share=0.75),
            Allocation(supplier="acme", customer="b", customer_name="B", share=0.5),
        ],
    )
    d = derive(figures(), None, bare)
    assert (d["month_on_month"], d["intensity"]) == (None, None)
    assert d["unallocated_share"] == 0.0  # over-allocated: nothing is left, never less than nothing
    assert d["disclosure"]["uncertainty_pct"] is None  # no estimated-uncertainty assumption stated
    assert [r["verified"] for r in d["cdp_sc1_1"]] == [False, False]
    none = derive(figures(), None, StatementsConfig())
    assert (none["allocation"], none["unallocated_share"], none["cdp_sc1_1"]) == ([], 1.0, [])


def test_uncertainty_is_not_assessed_without_every_class() -> None:
    assert uncertainty_pct(figures(), 20.0) == pytest.approx(UNCERTAINTY, rel=1e-12)
    assert uncertainty_pct(figures(), None) is None
    for change in ({"meters_without_class": 1}, {"worst_class_pct": None}):
        f = figures()
        f["meter_accuracy"][1] = {**f["meter_accuracy"][1], **change}
        assert uncertainty_pct(f, 20.0) is None
    f = figures()
    del f["meter_accuracy"][5]
    assert uncertainty_pct(f, 20.0) is None
    f = figures()
    f["meter_accuracy"][5] = {**f["meter_accuracy"][5], "unit": "l"}  # another unit's class does not count
    assert uncertainty_pct(f, 20.0) is None
    assert uncertainty_pct({"lines": []}, 20.0) is None  # nothing emitted: no percentage
    # Without non-metered records and accuracy list the lines alone count.
    f = figures()
    f["not_metered"] = []
    assert uncertainty_pct(f, 20.0) == pytest.approx(math.sqrt(VARIANCE - 0.4**2) / 47 * 100, rel=1e-12)


def test_uncertainty_of_an_all_estimated_and_an_empty_line() -> None:
    f = {
        "lines": [
            line("a", "gas", 1, "direct", 10.0, kwh=50.0, est=50.0),
            line("a", "gas", 1, "direct", 4.0, kwh=0.0),
        ],
        "meter_accuracy": [
            {
                "site_id": "a",
                "carrier": "gas",
                "unit": "kWh",
                "worst_class_pct": 2.0,
                "meters_without_class": 0,
            }
        ],
    }
    # 10 kg all estimated at 10 %; 4 kg with no activity: treated as measured, at class 2.
    expected = math.sqrt((10 * 0.10) ** 2 + (4 * 0.02) ** 2) / 14 * 100
    assert uncertainty_pct(f, 10.0) == pytest.approx(expected, rel=1e-12)
    f["lines"][1]["kwh"] = None
    f["lines"][1]["kwh_estimated"] = None
    assert uncertainty_pct(f, 10.0) == pytest.approx(expected, rel=1e-12)


def test_disclosure() -> None:
    d = disclosure(figures(), REPORTING, 3.5)
    assert d == {
        "standards": ["GHG Protocol Corporate Standard", "GHG Protocol Scope 2 Guidance", "ISO 14064-1:2018"],
        "consolidation_approach": "operational_control",
        "base_year": 2020,
        "recalculation_policy": REPORTING.recalculation_policy,
        "exclusions": [{"what": "canteen", "reason": "de minimis"}],
        "verification": {"status": "limited", "verifier": "V Ltd", "standard": "ISO 14064-3:2019"},
        "iso14064_categories": {
            "category_1_direct": {"kg_co2e": 10.0, "kg_by_gas": {"co2": 9.0}},
            "category_2_imported_energy": {
                "kg_co2e_location": 20.0,
                "kg_co2e_market": 15.0,
                "kg_by_gas_location": {"co2": 19.0},
            },
        },
        "gwp_sets": ["AR5"],
        "co2_only_factor_ids": ["cn"],
        "uncertainty_pct": 3.5,
        "uncertainty_method": UNCERTAINTY_METHOD,
        "not_metered_kg_co2e": 2.0,
    }
    assert REPORTING.recalculation_policy.startswith("The base year is recalculated")
    f = figures()
    del f["by_gas"], f["not_metered_kg"]
    bare = disclosure(f, None, None)
    assert {
        k: bare[k]
        for k in (
            "consolidation_approach",
            "base_year",
            "recalculation_policy",
            "exclusions",
            "verification",
            "gwp_sets",
            "co2_only_factor_ids",
            "not_metered_kg_co2e",
        )
    } == {
        "consolidation_approach": None,
        "base_year": None,
        "recalculation_policy": None,
        "exclusions": [],
        "verification": {"status": "none", "verifier": None, "standard": None},
        "gwp_sets": [],
        "co2_only_factor_ids": [],
        "not_metered_kg_co2e": 0.0,
    }
    assert bare["iso14064_categories"]["category_1_direct"]["kg_by_gas"] is None
    assert bare["iso14064_categories"]["category_2_imported_energy"]["kg_by_gas_location"] is None


def test_cdp_sc1_1_rows() -> None:
    alloc = derive(figures(), None, CFG)["allocation"]
    intensity = {"production": 50.0, "unit": "PCBA"}
    rows = cdp_sc1_1(figures(), alloc, intensity, REPORTING, 3.5)
    # Sources by kg, direct and location only: electricity 20, gas 8, LPG 5, coal 3, steam 1.
    assert rows[0] == {
        "requesting_member": "Lenovo Group",
        "customer": "lenovo",
        "scope_or_category": "Scope 1 and Scope 2 (supplier); customer's Scope 3 category 1",
        "allocation_level": "product",
        "allocation_method": "revenue share 0.25",
        "quantity_supplied": 12.5,
        "unit_for_quantity_supplied": "PCBA",
        "emissions_t_co2e_location": 0.0075,
        "emissions_t_co2e_market": 0.00625,
        "uncertainty_pct": 3.5,
        "major_sources": ["electricity", "natural_gas", "lpg"],
        "verified": True,
    }
    assert rows[1]["allocation_method"] == "mass share 0.5" and rows[1]["quantity_supplied"] == 25.0
    bare = cdp_sc1_1(figures(), alloc, None, None, None)
    assert [
        (r["allocation_level"], r["quantity_supplied"], r["unit_for_quantity_supplied"], r["verified"])
        for r in bare
    ] == [(None, None, None, False)] * 2
    unverified = REPORTING.model_copy(update={"verification": "none"})
    assert cdp_sc1_1(figures(), alloc, None, unverified, None)[0]["verified"] is False


def test_pact_fields() -> None:
    p = pact(figures())
    assert p == {
        "referencePeriodStart": "2026-10-31T16:00:00+00:00",
        "referencePeriodEnd": "2026-12-01T00:00:00+00:00",
        "geography": {"geographyCountry": ["CN", "GB"], "geographyRegionOrSubregion": ["CN-South", "GB"]},
        "primaryDataShare": pytest.approx(90.0),
        "dqi": {"coveragePercent": pytest.approx(80.0)},
    }
    empty = pact({"boundary": [], "coverage": {"measured_share": 0.0, "bucket_share": 0.0}})
    assert (empty["referencePeriodStart"], empty["referencePeriodEnd"]) == (None, None)


# --- comparison paths -------------------------------------------------------------------------------


def test_list_elements_are_named_by_their_identity() -> None:
    every = {
        "customer": "c",
        "site_id": "s",
        "carrier": "e",
        "scope": 2,
        "method": "m",
        "date": "d",
        "instrument_id": "i",
        "factor_id": "f",
        "record_id": "r",
        "unit": "u",
        "kg": 1,
    }
    items = _items([every, {"site_id": "a", "x": 1}, {"site_id": "a", "x": 2}, {"y": 3}, 5, {"site_id": "a"}])
    assert [k for k, _ in items] == ["c|s|e|2|m|d|i|f|r|u", "a", "a#2", "3", "4", "a#5"]
    keyed: dict[Any, Any] = {"b": 1, 2: "x"}
    assert _items(keyed) == [("b", 1), ("2", "x")]
    assert flatten({"l": [every, {"y": True, "z": None, "w": "t", "v": 7}]}) == {
        "l.c|s|e|2|m|d|i|f|r|u.scope": 2.0,
        "l.c|s|e|2|m|d|i|f|r|u.kg": 1.0,
        "l.1.v": 7.0,
    }
    assert flatten(3) == {"": 3.0} and flatten(True) == {} and flatten("x") == {}
    assert texts({"l": [{"site_id": "a", "ok": False, "n": 1, "none": None}], "s": "x"}) == {
        "l.a.site_id": "a",
        "l.a.ok": False,
        "s": "x",
    }
    assert texts("x") == {"": "x"} and texts(1.5) == {}


SECTIONS = [
    "figures",
    "allocation",
    "intensity",
    "month_on_month",
    "unallocated_share",
    "disclosure",
    "cdp_sc1_1",
    "pact",
]


@pytest.mark.parametrize("section", SECTIONS)
def test_every_stated_section_is_compared(section: str) -> None:
    doc: dict[str, Any] = {s: {"n": 1.0, "t": "a"} for s in SECTIONS} | {"inputs": {"n": 1.0, "t": "a"}}
    doc["unallocated_share"] = 0.5
    assert set(stated(doc)) == set(SECTIONS)
    new = copy.deepcopy(doc)
    new["inputs"] = {"n": 2.0, "t": "b"}  # not stated content: never compared
    assert differences(doc, new) == [] and text_differences(doc, new) == []
    if section == "unallocated_share":
        new[section] = 0.75
        assert differences(doc, new) == [{"figure": section, "old": 0.5, "new": 0.75, "delta": 0.25}]
        return
    new[section] = {"n": 3.0, "t": "b", "more": "c"}
    assert differences(doc, new) == [{"figure": f"{section}.n", "old": 1.0, "new": 3.0, "delta": 2.0}]
    assert text_differences(doc, new) == [f"{section}.more", f"{section}.t"]
    assert text_differences(new, doc) == [f"{section}.more", f"{section}.t"]


def test_headline_figures_come_first_and_the_rest_sorted() -> None:
    old = {
        "figures": {"totals": {"scope1": 1.0, "energy_kwh": 1.0}, "a": 1.0, "z": 1.0, "renewable_share": 0.5}
    }
    new = {
        "figures": {"totals": {"scope1": 2.0, "energy_kwh": 2.0}, "a": 2.0, "z": 2.0, "renewable_share": 0.0}
    }
    assert [d["figure"] for d in differences(old, new)] == [
        "figures.totals.scope1",
        "figures.totals.energy_kwh",
        "figures.renewable_share",
        "figures.a",
        "figures.z",
    ]


# --- versions and customers ----------------------------------------------------------------------


def derived() -> dict[str, Any]:
    return {
        "allocation": [{"customer": "lenovo", "x": 1.0}, {"customer": "zte", "x": 2.0}],
        "cdp_sc1_1": [{"customer": "lenovo", "y": 3.0}, {"customer": "zte", "y": 4.0}],
        "unallocated_share": 0.25,
    }


def test_a_new_document_and_the_version_it_supersedes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issued in UTC whatever the machine's time zone.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        _new_document_and_supersedes()
    finally:
        monkeypatch.undo()
        time.tzset()


def _new_document_and_supersedes() -> None:
    figs = {"supplier": {"id": "acme", "name": "Acme"}, "month": "2026-11", "totals": {"scope1": 10.0}}
    inputs = {"readings": {"count": 3}}
    now = datetime(2026, 12, 5, 9, 0, tzinfo=timezone(timedelta(hours=8)))
    doc = new_document(figs, inputs, derived(), 2, None, now, ["late meter"])
    assert doc == {
        "schema": "scopemeter.statement/2",
        "statement_id": "acme/2026-11/v2",
        "audience": "supplier",
        "supplier": {"id": "acme", "name": "Acme"},
        "month": "2026-11",
        "version": 2,
        "issued_at": "2026-12-05T01:00:00+00:00",
        "provisional": True,
        "incomplete_reasons": ["late meter"],
        "inputs": inputs,
        "inputs_digest": hashlib.sha256(b'{"readings":{"count":3}}').hexdigest(),
        "figures": figs,
        **derived(),
        "supersedes": None,
        "files": {},
    }
    assert (SCHEMA, SUPPLIER_AUDIENCE) == ("scopemeter.statement/2", "supplier")
    final = new_document(figs, inputs, derived(), 2, None, now, [])
    assert (final["provisional"], final["incomplete_reasons"]) == (False, [])
    old = {**copy.deepcopy(doc), "version": 1, "inputs_digest": "d1", "issued_at": "t1"}
    old["figures"] = {**figs, "totals": {"scope1": 9.0}}
    v3 = new_document(figs, inputs, derived(), 3, old, now, [])
    assert v3["supersedes"] == {
        "version": 1,
        "inputs_digest": "d1",
        "issued_at": "t1",
        "changes": [{"figure": "figures.totals.scope1", "old": 9.0, "new": 10.0, "delta": 1.0}],
    }


def test_a_customer_sees_only_its_own_allocation() -> None:
    figs = {"supplier": {"id": "acme", "name": "Acme"}, "month": "2026-11"}
    inputs = {
        "allocations": [{"customer": "lenovo", "share": 0.25}, {"customer": "zte", "share": 0.5}],
        "n": 1,
    }
    doc = new_document(figs, inputs, derived(), 2, None, datetime(2026, 12, 5, tzinfo=UTC), [])
    doc["supersedes"] = {
        "version": 1,
        "changes": [
            {"figure": "allocation.lenovo.x"},
            {"figure": "allocation.zte.x"},
            {"figure": "unallocated_share"},
            {"figure": "figures.totals.scope1"},
            {"figure": "cdp_sc1_1.zte.y"},
            {"figure": "cdp_sc1_1.lenovo.y"},
            {"figure": "allocation.lenovoX.x"},
        ],
    }
    before = copy.deepcopy(doc)
    view = for_customer(doc, "lenovo")
    own_inputs = {"allocations": [{"customer": "lenovo", "share": 0.25}], "n": 1}
    assert view == {
        **{k: v for k, v in doc.items() if k != "unallocated_share"},
        "statement_id": "acme/2026-11/v2/lenovo",
        "audience": "lenovo",
        "inputs": own_inputs,
        "inputs_digest": hashlib.sha256(json_bytes(own_inputs)).hexdigest(),
        "allocation": [{"customer": "lenovo", "x": 1.0}],
        "cdp_sc1_1": [{"customer": "lenovo", "y": 3.0}],
        "supersedes": {
            "version": 1,
            "changes": [
                {"figure": "allocation.lenovo.x"},
                {"figure": "figures.totals.scope1"},
                {"figure": "cdp_sc1_1.lenovo.y"},
            ],
        },
    }
    assert doc == before  # the supplier's statement is left as it was
    doc["supersedes"] = None
    del doc["cdp_sc1_1"]
    view = for_customer(doc, "zte")
    assert (
        view["supersedes"] is None
        and "cdp_sc1_1" not in view
        and view["allocation"] == [{"customer": "zte", "x": 2.0}]
    )


# --- keys and signatures -------------------------------------------------------------------------


def test_keys_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keys.ENV_PASSPHRASE, raising=False)
    path = keygen(tmp_path / "sign.pem")
    assert public_key_path(tmp_path / "sign.pem") == keys.public_key_path(tmp_path / "sign.pem")
    private = load_private_key(tmp_path / "sign.pem")
    public = load_public_key(public_key_path(tmp_path / "sign.pem"))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert (
        private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw
    )
    assert (
        load_public_key(path).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw
    )
    with pytest.raises(UserError) as e:
        load_public_key(tmp_path / "none.pub")
    assert str(e.value) == f"no public key at {tmp_path / 'none.pub'}"
    (tmp_path / "ec.pub").write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(UserError) as e:
        load_public_key(tmp_path / "ec.pub")
    assert str(e.value) == f"{tmp_path / 'ec.pub'}: not an Ed25519 public key"


def test_keys_are_encrypted_with_the_passphrase_and_rotate_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(keys.ENV_PASSPHRASE, "correct horse battery staple")
    path = tmp_path / "sign.pem"
    keygen(path)
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    first = load_private_key(path).public_key()
    with pytest.raises(UserError):  # no passphrase: the key cannot be read
        keys.load_private_key(path, None)
    assert load_public_key(path).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == (
        first.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    with pytest.raises(UserError):  # an existing key is kept unless rotation is asked for
        keygen(path)
    keygen(path, overwrite=True)
    assert fingerprint(load_private_key(path).public_key()) != fingerprint(first)


def test_sign_states_the_key_and_signs_the_canonical_content() -> None:
    digest = hashlib.sha256(RAW).hexdigest()
    assert fingerprint(PUB) == "SHA256:" + digest and key_id(PUB) == digest[:16]
    block = {
        "alg": "Ed25519",
        "fingerprint": "SHA256:" + digest,
        "public_key": base64.b64encode(RAW).decode(),
    }
    assert signing_key(PUB) == block
    doc = sign({"a": 1, "é": [0.5], "signature": "old", "signing_key": signing_key(OTHER.public_key())}, KEY)
    assert list(doc) == ["a", "é", "signing_key", "signature"]
    assert doc["signing_key"] == block
    sig = doc["signature"]
    assert (sig["alg"], sig["key_id"]) == ("Ed25519", digest[:16])
    PUB.verify(base64.b64decode(sig["value"]), json_bytes({"a": 1, "é": [0.5], "signing_key": block}))
    assert check_signature(doc, PUB) is None


def test_every_bad_signature_is_refused_with_its_reason() -> None:
    doc = sign({"a": 1}, KEY)
    fp, other_fp = fingerprint(PUB), fingerprint(OTHER.public_key())
    altered = "signature does not match the content (the statement was altered)"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"a": 1}, "no Ed25519 signature"),
        ({**doc, "signature": "x"}, "no Ed25519 signature"),
        ({**doc, "signature": {**doc["signature"], "alg": "RSA"}}, "no Ed25519 signature"),
        (
            {**doc, "signature": {k: v for k, v in doc["signature"].items() if k != "alg"}},
            "no Ed25519 signature",
        ),
        (sign({"a": 1}, OTHER), f"signed by key {other_fp}, not by the trusted key {fp}"),
        ({**doc, "signing_key": {}}, f"signed by key None, not by the trusted key {fp}"),
        ({**doc, "a": 2}, altered),
        ({**doc, "signature": {**doc["signature"], "value": "!!not base64!!"}}, altered),
        ({**doc, "signature": {**doc["signature"], "value": 5}}, altered),
        ({**doc, "signature": {k: v for k, v in doc["signature"].items() if k != "value"}}, altered),
    ]
    for bad, why in cases:
        assert check_signature(bad, PUB) == why


def test_a_schema_1_statement_names_its_key_by_id_only() -> None:
    body = {"a": 1}
    old: dict[str, Any] = {
        **body,
        "signature": {
            "alg": "Ed25519",
            "key_id": key_id(PUB),
            "value": base64.b64encode(KEY.sign(json_bytes(body))).decode(),
        },
    }
    assert check_signature(old, PUB) is None
    foreign = {**old, "signature": {**old["signature"], "key_id": key_id(OTHER.public_key())}}
    assert (
        check_signature(foreign, PUB)
        == f"signed by key {key_id(OTHER.public_key())}, not by the trusted key {key_id(PUB)}"
    )
    forged = {**old, "a": 2}
    assert check_signature(forged, PUB) == "signature does not match the content (the statement was altered)"


# --- inputs, with the database ----------------------------------------------------------------------

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"
[[suppliers]]
id = "zeta"
name = "Zeta"
[[sites]]
id = "sa"
supplier = "acme"
name = "Plant"
grid_region = "CN"
timezone = "Asia/Shanghai"
[[sites]]
id = "sz"
supplier = "zeta"
name = "Other"
grid_region = "CN"
[[meters]]
id = "ma"
site = "sa"
carrier = "electricity"
model = "eastron_sdm630"
ct_ratio = 40.0
pt_ratio = 2.0
accuracy_class = 0.5
max_kw = 300.0
[[meters]]
id = "mb"
site = "sa"
carrier = "natural_gas"
unit = "m3"
reference_conditions = "15C-101.325kPa"
model = "gas_m3"
[[meters]]
id = "mc"
site = "sa"
carrier = "natural_gas"
unit = "kWh"
cv_basis = "gross"
fuel_type = "pipeline_gas"
model = "gas_kwh"
[[meters]]
id = "mz"
site = "sz"
carrier = "electricity"
model = "eastron_sdm630"
"""
# Shanghai's November 2026 in UTC: 2026-10-31T16:00 to 2026-11-30T16:00.
T0, T1 = datetime(2026, 10, 31, 16, tzinfo=UTC), datetime(2026, 11, 30, 16, tzinfo=UTC)
HOUR = timedelta(hours=1)
READINGS = [
    ("ma", "energy_import_kwh", T0 - 3 * HOUR, 10.0),  # before the last one before the month: not in
    ("ma", "energy_import_kwh", T0 - HOUR, 12.5),  # the last before the month
    ("ma", "energy_import_kwh", T0, 15.0),
    ("ma", "energy_import_kwh", T0 + HOUR, 17.25),
    ("ma", "energy_import_kwh", T1 - HOUR, 20.0),
    ("ma", "energy_import_kwh", T1, 22.0),  # the first after the month
    ("ma", "energy_import_kwh", T1 + HOUR, 24.0),
    ("mb", "gas_m3", T0 + 2 * HOUR, 1.5),  # no reading before or after: only its own
    ("mz", "energy_import_kwh", T0 + HOUR, 99.0),  # another supplier's
]


@pytest.fixture(scope="module")
def inputs_db(compute_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "fleet.toml").write_text(FLEET)
    with psycopg.connect(compute_dsn, autocommit=True) as conn:
        apply_fleet(conn, tmp / "fleet.toml")
        site = {"ma": "sa", "mb": "sa", "mz": "sz"}
        insert_rows(
            conn, [(m, q, ts, v, 1 if m == "mb" else 0, site[m], "gw", 1) for m, q, ts, v in READINGS]
        )
    yield compute_dsn


def pg_float(v: float) -> str:
    """PostgreSQL's shortest exact float8 text: no '.0' on whole numbers."""
    return str(int(v)) if v.is_integer() else repr(v)


def test_the_readings_digest_covers_the_month_and_its_neighbours(inputs_db: str) -> None:
    used = [r for r in READINGS if r[0] != "mz" and r[2] != T0 - 3 * HOUR and r[2] != T1 + HOUR]
    text = "\n".join(
        f"{m}|{q}|{int((ts - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) * 1_000_000}|{pg_float(v)}"
        f"|{1 if m == 'mb' else 0}"
        for m, q, ts, v in sorted(used, key=lambda r: (r[0], r[1], r[2]))
    )
    with psycopg.connect(inputs_db) as conn:
        assert readings_digest(conn, "acme", "2026-11") == {
            "count": 6,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        empty = readings_digest(conn, "acme", "2026-06")
        assert empty == {"count": 0, "sha256": hashlib.sha256(b"").hexdigest()}


def test_meters_and_inputs(inputs_db: str) -> None:
    with psycopg.connect(inputs_db) as conn:
        meters = meters_of(conn, "acme")
        # As the fleet file states them; a basis the file leaves unset is stored as ''.
        base = {
            "site_id": "sa",
            "ct_ratio": 1.0,
            "pt_ratio": 1.0,
            "cv_basis": "",
            "reference_conditions": "",
            "fuel_type": "",
            "accuracy_class": None,
            "max_kw": None,
        }
        assert meters == [
            base
            | {
                "meter_id": "ma",
                "carrier": "electricity",
                "model": "eastron_sdm630",
                "ct_ratio": 40.0,
                "pt_ratio": 2.0,
                "unit": "kWh",
                "accuracy_class": 0.5,
                "max_kw": 300.0,
            },
            base
            | {
                "meter_id": "mb",
                "carrier": "natural_gas",
                "model": "gas_m3",
                "unit": "m3",
                "reference_conditions": "15C-101.325kPa",
            },
            base
            | {
                "meter_id": "mc",
                "carrier": "natural_gas",
                "model": "gas_kwh",
                "unit": "kWh",
                "cv_basis": "gross",
                "fuel_type": "pipeline_gas",
            },
        ]
        assert [list(m) for m in meters] == [list(meters[0])] * 3 and list(meters[0]) == [
            "meter_id",
            "site_id",
            "carrier",
            "model",
            "ct_ratio",
            "pt_ratio",
            "unit",
            "cv_basis",
            "reference_conditions",
            "fuel_type",
            "accuracy_class",
            "max_kw",
        ]
        figs = {
            "supplier": {"id": "acme"},
            "month": "2026-11",
            "boundary": [{"site_id": "sa"}],
            "factors": [{"factor_id": "f"}],
            "instruments": [{"instrument_id": "i"}],
            "not_metered": [{"record_id": "r"}],
        }
        params = Params()
        got = build_inputs(conn, figs, CFG, params)
        assert got == {
            "compute": dataclasses.asdict(params),
            "readings": readings_digest(conn, "acme", "2026-11"),
            "sites": [{"site_id": "sa"}],
            "meters": meters,
            "factors": [{"factor_id": "f"}],
            "instruments": [{"instrument_id": "i"}],
            "not_metered": [{"record_id": "r"}],
            "allocations": [
                {
                    "supplier": "acme",
                    "customer": "lenovo",
                    "customer_name": "Lenovo Group",
                    "share": 0.25,
                    "basis": "revenue",
                },
                {
                    "supplier": "acme",
                    "customer": "zte",
                    "customer_name": "ZTE",
                    "share": 0.5,
                    "basis": "mass",
                },
            ],
            "production": {"supplier": "acme", "month": "2026-11", "quantity": 50.0, "unit": "PCBA"},
        }
        assert got["readings"]["count"] == 6
        del figs["not_metered"]
        bare = build_inputs(conn, figs, StatementsConfig(), params)
        assert (bare["not_metered"], bare["allocations"], bare["production"]) == ([], [], None)


def test_a_headline_figure_on_one_side_only_counts_against_zero() -> None:
    old = {"figures": {"totals": {"scope1": 4.0}}}
    new = {"figures": {"totals": {}, "renewable_share": 0.5}}
    assert differences(old, new) == [
        {"figure": "figures.totals.scope1", "old": 4.0, "new": 0.0, "delta": -4.0},
        {"figure": "figures.renewable_share", "old": 0.0, "new": 0.5, "delta": 0.5},
    ]
