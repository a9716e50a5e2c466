"""``statements verify`` outcome by outcome, fast: the mutation tests of ``compute/statements/verify.py``
(issue 17: "verify detects any figure that does not reproduce, and any allocation field").

Offline checks run on small signed documents written to a temp folder (no services). The recompute
runs against a real PostgreSQL with one supplier, one site and one meter drawing a constant 10 kW
(expected values: kW x hours x factor, by hand); the statement is built and signed with the
document functions directly (no PDF), so each test takes well under a second.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.rebuild import recompute_all
from compute.recompute import Params
from compute.statements import outbox
from compute.statements.config import Allocation, Production, StatementsConfig
from compute.statements.document import (
    build_inputs,
    canonical,
    content_digest,
    derive,
    fingerprint,
    for_customer,
    new_document,
    sha256_hex,
    sign,
)
from compute.statements.figures import month_figures, previous_month
from compute.statements.verify import (
    Verification,
    _found_index,
    receive,
    verify_offline,
    verify_statement,
)
from ops.errors import UserError
from tests.test_compute_support import cn_grid_factor_toml, compute_dsn, insert_rows

__all__ = ["compute_dsn"]

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
TRUSTED = KEY.public_key()
CSV, PDF = b"scope,kg\n2,1\n", b"%PDF-1.7 not really\n"


def statement(version: int = 1, audience: str | None = None, key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "statement_id": f"acme/2026-11/v{version}",
        "supplier": {"id": "acme"},
        "month": "2026-11",
        "version": version,
        "files": {"statement.csv": sha256_hex(CSV), "statement.pdf": sha256_hex(PDF)},
    }
    if audience is not None:
        doc["audience"] = audience
    return sign(doc, key)


def index(entries: list[tuple[str, int, str]], key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    """A signed index listing (audience, version, content digest) for acme's 2026-11."""
    latest = [
        {"supplier": "acme", "month": "2026-11", "audience": a, "version": v, "content_sha256": d}
        for a, v, d in entries
    ]
    return sign(
        {"schema": outbox.INDEX_SCHEMA, "generated_at": "2026-12-05T00:00:00+00:00", "latest": latest}, key
    )


def write(
    folder: Path, doc: dict[str, Any] | None = None, *, csv: bytes = CSV, pdf: bytes | None = PDF
) -> Path:
    """The statement and its renditions as an outbox keeps them (one folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "statement.json").write_text(json.dumps(doc if doc is not None else statement()))
    (folder / "statement.csv").write_bytes(csv)
    if pdf is not None:
        (folder / "statement.pdf").write_bytes(pdf)
    return folder / "statement.json"


def one(paths: list[Path]) -> Verification:
    [v] = verify_offline(paths, TRUSTED)
    return v


# --- offline --------------------------------------------------------------------------------------


def test_files_are_sorted_by_content_whatever_their_names(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(statement()))
    (tmp_path / "b.json").write_text(json.dumps(index([])))
    (tmp_path / "c.bin").write_bytes(CSV)
    (tmp_path / "d.json").write_text("[1, 2]")  # JSON, but not an object
    (tmp_path / "e.json").write_bytes(b"\xff\xfe{")  # not UTF-8
    (tmp_path / "f.json").write_text('{"schema": "something else"}')
    (tmp_path / "sub").mkdir()  # a folder's folders are not read
    got = receive([tmp_path])
    assert [p.name for p, _ in got.statements] == ["a.json"]
    assert [p.name for p, _ in got.indexes] == ["b.json"]
    assert sorted(p.name for p in got.others.values()) == ["c.bin", "d.json", "e.json", "f.json"]
    assert got.others[sha256_hex(CSV)] == tmp_path / "c.bin"
    single = receive([tmp_path / "a.json", tmp_path / "c.bin"])
    assert [p.name for p, _ in single.statements] == ["a.json"] and list(single.others.values()) == [
        tmp_path / "c.bin"
    ]


def test_missing_files_and_no_statement_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        receive([tmp_path / "nope.json"])
    assert str(e.value) == f"{tmp_path / 'nope.json'}: no such file"
    (tmp_path / "x.csv").write_bytes(CSV)
    with pytest.raises(UserError) as e:
        receive([tmp_path / "x.csv", tmp_path])
    assert str(e.value) == f"no signed statement JSON among {tmp_path / 'x.csv'}, {tmp_path}"


def test_a_good_statement_with_its_renditions_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path / "v1")
    v = one([path])  # the renditions beside it are found although not given
    assert (v.status, v.problems, v.statement_id) == ("valid", [], "acme/2026-11/v1")
    assert v.fingerprint == fingerprint(TRUSTED)
    assert v.notes == [
        f"statement.csv: matches {tmp_path / 'v1' / 'statement.csv'}",
        f"statement.pdf: matches {tmp_path / 'v1' / 'statement.pdf'}",
        "no index given: whether a newer version exists was not checked (add index.json)",
    ]
    assert (v.differences, v.superseded_by) == ([], None)


def test_renditions_given_under_other_names_match(tmp_path: Path) -> None:
    (tmp_path / "Nov.json").write_text(json.dumps(statement()))
    (tmp_path / "x").write_bytes(CSV)
    v = one([tmp_path / "Nov.json", tmp_path / "x"])
    assert v.status == "valid"
    assert v.notes[:2] == [
        f"statement.csv: matches {tmp_path / 'x'}",
        "statement.pdf: not among the files given (not checked)",
    ]


def test_an_altered_rendition_beside_the_statement_is_invalid(tmp_path: Path) -> None:
    path = write(tmp_path / "v1", pdf=PDF + b" ")
    v = one([path])
    assert v.status == "invalid"
    assert v.problems == [
        f"{tmp_path / 'v1' / 'statement.pdf'} was altered (SHA-256 differs from the signed one)",
        f"{tmp_path / 'v1' / 'statement.pdf'} is not a rendition of this statement (altered, or another's)",
    ]


def test_an_altered_rendition_given_by_its_own_path_is_named_once(tmp_path: Path) -> None:
    path = write(tmp_path / "v1", csv=CSV + b"x")
    v = one([path, tmp_path / "v1" / "statement.csv"])
    assert v.problems == [
        f"{tmp_path / 'v1' / 'statement.csv'} was altered (SHA-256 differs from the signed one)",
        f"{tmp_path / 'v1' / 'statement.csv'} is not a rendition of this statement (altered, or another's)",
    ]


def test_a_foreign_file_and_a_foreign_or_broken_signature_are_invalid(tmp_path: Path) -> None:
    path = write(tmp_path / "v1")
    (tmp_path / "other.csv").write_bytes(b"another statement's csv")
    v = one([path, tmp_path / "other.csv"])
    assert v.status == "invalid"
    assert v.problems == [
        f"{tmp_path / 'other.csv'} is not a rendition of this statement (altered, or another's)"
    ]

    foreign = write(tmp_path / "foreign", statement(key=OTHER))
    v = one([foreign])
    assert v.status == "invalid"
    assert v.problems == [
        f"signed by key {fingerprint(OTHER.public_key())}, not by the trusted key {fingerprint(TRUSTED)}"
    ]
    assert v.fingerprint == fingerprint(OTHER.public_key())

    doc = statement()
    doc["version"] = 7  # altered after signing
    v = one([write(tmp_path / "altered", doc)])
    assert (v.status, v.problems) == (
        "invalid",
        ["signature does not match the content (the statement was altered)"],
    )

    unsigned = {k: v for k, v in statement().items() if k not in ("signature", "signing_key")}
    v = one([write(tmp_path / "unsigned", unsigned)])
    assert (v.status, v.problems, v.fingerprint) == ("invalid", ["no Ed25519 signature"], "")


def test_the_index_tells_latest_superseded_and_differing_versions(tmp_path: Path) -> None:
    doc = statement(version=2)
    path = write(tmp_path / "v2", doc)
    ipath = tmp_path / "latest.json"

    ipath.write_text(json.dumps(index([("supplier", 2, content_digest(doc))])))
    v = one([path, ipath])
    assert (v.status, v.problems, v.superseded_by) == ("valid", [], None)
    assert [n.split(":")[0] for n in v.notes] == ["statement.csv", "statement.pdf"]  # nothing on the index

    ipath.write_text(json.dumps(index([("customer-x", 9, "0" * 64), ("supplier", 3, "0" * 64)])))
    v = one([path, ipath])
    assert (v.status, v.superseded_by) == ("superseded", 3)
    assert v.problems == [f"superseded by version 3 (index {ipath})"]

    ipath.write_text(json.dumps(index([("supplier", 1, "0" * 64)])))  # an older index: nothing to say
    v = one([path, ipath])
    assert (v.status, v.problems, v.superseded_by) == ("valid", [], None)

    ipath.write_text(json.dumps(index([("supplier", 2, "0" * 64)])))
    v = one([path, ipath])
    assert (v.status, v.problems) == ("invalid", [f"differs from version 2 as issued (index {ipath})"])

    ipath.write_text(json.dumps(index([("lenovo", 2, content_digest(doc))])))
    v = one([path, ipath])
    assert v.status == "valid"
    assert v.notes[-1] == f"{ipath} (generated 2026-12-05T00:00:00+00:00) does not list this statement"


def test_a_customers_statement_is_matched_by_its_audience(tmp_path: Path) -> None:
    doc = statement(version=1, audience="lenovo")
    path = write(tmp_path / "c", doc)
    ipath = tmp_path / "latest.json"
    ipath.write_text(json.dumps(index([("supplier", 2, "0" * 64), ("lenovo", 1, content_digest(doc))])))
    v = one([path, ipath])
    assert (v.status, v.problems) == ("valid", [])


def test_an_invalid_statement_stays_invalid_when_also_superseded(tmp_path: Path) -> None:
    path = write(tmp_path / "v1", statement(key=OTHER))
    ipath = tmp_path / "latest.json"
    ipath.write_text(json.dumps(index([("supplier", 2, "0" * 64)])))
    v = one([path, ipath])
    assert (v.status, v.superseded_by) == ("invalid", 2)
    assert v.problems[-1] == f"superseded by version 2 (index {ipath})"


def test_an_index_not_signed_by_the_trusted_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "v1")
    ipath = tmp_path / "latest.json"
    ipath.write_text(json.dumps(index([("supplier", 1, "0" * 64)], key=OTHER)))
    with pytest.raises(UserError) as e:
        verify_offline([path, ipath], TRUSTED)
    assert str(e.value).startswith(f"{ipath}: the index is not to be trusted: signed by key ")


def test_the_outbox_index_above_a_statement_is_found_and_used(tmp_path: Path) -> None:
    """outbox/supplier/month/vN/customers/customer/statement.json: the index is 6 folders up."""
    box = tmp_path / "outbox"
    folder = box / "acme" / "2026-11" / "v1" / "customers" / "lenovo"
    doc = statement(version=1, audience="lenovo")
    path = write(folder, doc)
    (box / outbox.INDEX).write_text(json.dumps(index([("lenovo", 2, "0" * 64)])))
    assert _found_index(path) == box / outbox.INDEX
    v = one([path])
    assert (v.status, v.superseded_by) == ("superseded", 2)
    assert v.problems == [f"superseded by version 2 (index {box / outbox.INDEX})"]
    # One folder deeper, the index is no longer "above" the statement.
    deeper = write(folder / "copy", doc)
    assert _found_index(deeper) is None
    # A found index signed by another key is not used, and that is said.
    (box / outbox.INDEX).write_text(json.dumps(index([("lenovo", 2, "0" * 64)], key=OTHER)))
    v = one([path])
    assert (v.status, v.superseded_by, v.problems) == ("valid", None, [])
    assert v.notes[-1].startswith(f"{box / outbox.INDEX}: not signed by the trusted key (signed by key ")
    assert v.notes[-1].endswith("); not used")
    assert not any(n.startswith("no index given") for n in v.notes)


def test_every_statement_given_is_verified(tmp_path: Path) -> None:
    good, bad = write(tmp_path / "good"), write(tmp_path / "bad", statement(key=OTHER))
    results = verify_offline([good, bad], TRUSTED)
    assert [(r.path, r.status) for r in results] == [(good, "valid"), (bad, "invalid")]


# --- with the database: every figure recomputed ------------------------------------------------------

FACTOR = 0.5  # kg CO2/kWh
MONTH = "2026-11"
STEP = timedelta(minutes=15)
# meter → (site, kW, first reading, last reading): vm1 runs through October and November; vm2 only
# reads in the first six hours of October, vm3 only in the last six of November (each at a site of
# its own): the recompute must find meters that read only at the edges of the two months. ym
# (supplier "yr") reads six hours in June 2025 and six in March 2026: an annual statement.
METERS = {
    "vm1": ("s1", 10.0, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 1, 1, tzinfo=UTC)),
    "vm2": ("s2", 4.0, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 10, 1, 6, tzinfo=UTC)),
    "vm3": ("s3", 6.0, datetime(2026, 11, 30, 18, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    "ym-2025": ("sy", 8.0, datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 6, 1, 6, tzinfo=UTC)),
    "ym-2026": ("sy", 2.0, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 1, 6, tzinfo=UTC)),
}
KW = METERS["vm1"][1]
FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"
[[suppliers]]
id = "yr"
name = "Year Ltd"
[[sites]]
id = "s1"
supplier = "acme"
name = "Plant"
grid_region = "CN"
timezone = "UTC"
[[sites]]
id = "s2"
supplier = "acme"
name = "Annex"
grid_region = "CN"
timezone = "UTC"
[[sites]]
id = "s3"
supplier = "acme"
name = "Store"
grid_region = "CN"
timezone = "UTC"
[[sites]]
id = "sy"
supplier = "yr"
name = "Year Plant"
grid_region = "CN"
timezone = "UTC"
""" + "".join(
    f'[[meters]]\nid = "{m}"\nsite = "{site}"\ncarrier = "electricity"\nmodel = "eastron_sdm630"\n'
    for m, (site, *_) in METERS.items()
)
CFG = StatementsConfig(
    allocations=[
        Allocation(supplier="acme", customer="lenovo", customer_name="Lenovo Group", share=0.3),
        Allocation(supplier="acme", customer="zte", customer_name="ZTE", share=0.2, basis="mass"),
    ],
    production=[Production(supplier="acme", month=MONTH, quantity=1000, unit="PCBA")],
)


@pytest.fixture(scope="module")
def db(compute_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One meter drawing KW from before October to after November, computed."""
    tmp = tmp_path_factory.mktemp("verify-db")
    (tmp / "fleet.toml").write_text(FLEET)
    (tmp / "factors.toml").write_text(cn_grid_factor_toml(FACTOR))
    rows = [
        (m, "energy_import_kwh", first + k * STEP, 500.0 + kw * 0.25 * k, 0, site, "gw", 1)
        for m, (site, kw, first, last) in METERS.items()
        for k in range(int((last - first) / STEP) + 1)
    ]
    with psycopg.connect(compute_dsn, autocommit=True) as conn:
        apply_fleet(conn, tmp / "fleet.toml")
        apply_factors(conn, tmp / "factors.toml")
        insert_rows(conn, rows)
        recompute_all(conn)
    yield compute_dsn


def issued(
    conn: psycopg.Connection[Any], supplier: str = "acme", period: str = MONTH, params: Params | None = None
) -> dict[str, Any]:
    """The statement as ``issue`` builds it (figures, period before, inputs, derived), signed."""
    with conn.transaction():
        figures = month_figures(conn, supplier, period)
        previous = month_figures(conn, supplier, previous_month(period))
        inputs = build_inputs(conn, figures, CFG, params or Params())
    derived = derive(figures, previous if previous["lines"] else None, CFG)  # as issue does
    doc = new_document(figures, inputs, derived, 1, None, datetime(2026, 12, 5, tzinfo=UTC), [])
    return sign(doc, KEY)


def check(conn: psycopg.Connection[Any], tmp_path: Path, *docs: dict[str, Any]) -> list[Verification]:
    paths = []
    for n, doc in enumerate(docs):
        paths.append(tmp_path / f"s{n}.json")
        paths[-1].write_text(json.dumps(doc))
    return verify_statement(conn, paths, TRUSTED, CFG)


def resigned(doc: dict[str, Any]) -> dict[str, Any]:
    return sign(copy.deepcopy(doc), KEY)


def test_the_issued_statement_reproduces(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn)
        # The fixture by hand at 0.5 kg/kWh: 10 kW over November's 720 h and 6 kW for its last 6 h;
        # 10 kW over October's 744 h and 4 kW for its first 6 h.
        assert doc["figures"]["totals"]["scope2_location"] == pytest.approx(
            (KW * 720 + 6.0 * 6) * FACTOR, rel=1e-9
        )
        assert doc["month_on_month"]["scope2_location"]["previous"] == pytest.approx(
            (KW * 744 + 4.0 * 6) * FACTOR, rel=1e-9
        )
        [v] = check(conn, tmp_path, doc)
        assert (v.status, v.problems, v.differences) == ("valid", [], [])
        n_rollups = conn.execute("SELECT count(*), sum(kg_co2e) FROM site_rollups_15m").fetchone()
        # The database is left as it was (the recompute is rolled back).
        [v] = check(conn, tmp_path, doc)
        assert conn.execute("SELECT count(*), sum(kg_co2e) FROM site_rollups_15m").fetchone() == n_rollups


@pytest.mark.parametrize(
    "path",
    [
        "figures.totals.scope2_location",
        "allocation.1.total_location_kg",
        "month_on_month.scope2_location.previous",
    ],
)
def test_a_figure_that_does_not_reproduce_is_found(db: str, tmp_path: Path, path: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn)
        forged = copy.deepcopy(doc)
        *parents, leaf = path.split(".")
        node: Any = forged
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        old = node[leaf]
        node[leaf] = old * (1 + 1e-6)
        [v] = check(conn, tmp_path, resigned(forged))
        assert v.status == "invalid"
        assert v.problems == ["the signed figures do not reproduce from the same readings"]
        named = path.replace("allocation.1.", "allocation.zte.")
        assert [(d["figure"], d["old"], d["new"]) for d in v.differences] == [(named, old * (1 + 1e-6), old)]
        # Within the tolerance (1e-9 relative): the same figure.
        node[leaf] = old * (1 + 1e-12)
        [v] = check(conn, tmp_path, resigned(forged))
        assert (v.status, v.differences, v.problems) == ("valid", [], [])


def test_an_allocation_field_that_does_not_reproduce_is_found(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn)
        forged = copy.deepcopy(doc)
        forged["allocation"][0]["basis"] = "mass"
        [v] = check(conn, tmp_path, resigned(forged))
        assert (v.status, v.differences) == ("invalid", [])
        assert v.problems == ["stated fields do not reproduce: allocation.lenovo.basis"]
        # Many at once: the first eight paths are named.
        forged = copy.deepcopy(doc)
        for a in forged["allocation"]:
            a["basis"], a["customer_name"], a["scope3_category"] = "x", "y", "z"
        forged["intensity"]["unit"] = "kg"
        forged["disclosure"]["standards"] = ["none"]
        [v] = check(conn, tmp_path, resigned(forged))
        assert v.status == "invalid"
        named = [
            "allocation.lenovo.basis",
            "allocation.lenovo.customer_name",
            "allocation.lenovo.scope3_category",
            "allocation.zte.basis",
            "allocation.zte.customer_name",
            "allocation.zte.scope3_category",
            "disclosure.standards.0",
            "disclosure.standards.1",
        ]
        assert v.problems == [f"stated fields do not reproduce: {', '.join(named)}"]
        # A number AND a text: both said.
        forged = copy.deepcopy(doc)
        forged["allocation"][0]["basis"] = "mass"
        forged["allocation"][0]["share"] = 0.31
        [v] = check(conn, tmp_path, resigned(forged))
        assert v.problems == [
            "the signed figures do not reproduce from the same readings",
            "stated fields do not reproduce: allocation.lenovo.basis",
        ]


def test_changed_inputs_make_it_outdated_not_invalid(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn)
        forged = copy.deepcopy(doc)
        forged["inputs"]["readings"]["count"] += 1
        forged["inputs"]["production"]["quantity"] = 999.0
        forged["inputs_digest"] = sha256_hex(canonical(forged["inputs"]))
        forged["figures"]["totals"]["scope1"] = 5.0  # not reported: the inputs explain it
        [v] = check(conn, tmp_path, resigned(forged))
        assert v.status == "outdated"
        assert v.problems == ["inputs changed since issue: production, readings"]
        # An invalid (foreign) statement is not recomputed; the next one still is.
        foreign = copy.deepcopy(doc)
        foreign["figures"]["totals"]["scope1"] = 5.0  # would not reproduce either
        [bad, out] = check(conn, tmp_path, sign(foreign, OTHER), resigned(forged))
        assert (bad.status, bad.differences) == ("invalid", [])
        assert len(bad.problems) == 1 and bad.problems[0].startswith("signed by key ")
        assert out.status == "outdated"


def test_a_superseded_statement_stays_superseded_when_outdated(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        forged = issued(conn)
        forged["inputs"]["readings"]["count"] += 1
        forged["inputs_digest"] = sha256_hex(canonical(forged["inputs"]))
        forged["figures"]["totals"]["scope1"] = 5.0
        forged = resigned(forged)
        (tmp_path / "s0.json").write_text(json.dumps(forged))
        (tmp_path / "index.json").write_text(json.dumps(index([("supplier", 2, "0" * 64)])))
        [v] = verify_statement(conn, [tmp_path / "s0.json", tmp_path / "index.json"], TRUSTED, CFG)
        assert (v.status, v.superseded_by) == ("superseded", 2)
        assert v.problems[-1] == "inputs changed since issue: readings"
        # Superseded and figures not reproducing (same inputs): invalid.
        forged = issued(conn)
        forged["figures"]["totals"]["scope1"] = 5.0
        (tmp_path / "s0.json").write_text(json.dumps(resigned(forged)))
        [v] = verify_statement(conn, [tmp_path / "s0.json", tmp_path / "index.json"], TRUSTED, CFG)
        assert (v.status, v.superseded_by) == ("invalid", 2)


def rollups(conn: psycopg.Connection[Any], site: str) -> float:
    row = conn.execute("SELECT sum(kg_co2e) FROM site_rollups_15m WHERE site_id = %s", (site,)).fetchone()
    assert row is not None
    return float(row[0])


def test_the_whole_month_before_and_meters_at_the_edges_are_recomputed(db: str, tmp_path: Path) -> None:
    """Rollups that disagree with the readings (October 1st's first hour at s1; all of s2, whose
    meter reads only then; all of s3, whose meter reads only in November's last hours): verify
    recomputes them all, so a statement issued from the readings reproduces; and the stored rows are
    left as they were (the recompute is rolled back)."""
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn)
        before = {s: rollups(conn, s) for s in ("s1", "s2", "s3")}
        try:
            conn.execute(
                "UPDATE site_rollups_15m SET kg_co2e = kg_co2e * 2 WHERE site_id IN ('s2', 's3')"
                " OR (site_id = 's1' AND bucket >= '2026-10-01T00:00Z' AND bucket < '2026-10-01T01:00Z')"
            )
            [v] = check(conn, tmp_path, doc)
            assert (v.status, v.differences) == ("valid", [])
            assert rollups(conn, "s2") == pytest.approx(2 * before["s2"], rel=1e-12)
            assert rollups(conn, "s3") == pytest.approx(2 * before["s3"], rel=1e-12)
        finally:
            recompute_all(conn)
        assert rollups(conn, "s2") == pytest.approx(before["s2"], rel=1e-12)


def test_an_annual_statement_recomputes_the_whole_year_before(db: str, tmp_path: Path) -> None:
    """Year-on-year figures: the rollups of June 2025 (far more than a month before 2026) are
    recomputed too."""
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn, "yr", "2026")
        # 2 kW for 6 h in 2026, 8 kW for 6 h in 2025, at 0.5 kg/kWh.
        assert doc["figures"]["totals"]["scope2_location"] == pytest.approx(2.0 * 6 * FACTOR, rel=1e-9)
        assert doc["month_on_month"]["scope2_location"]["previous"] == pytest.approx(
            8.0 * 6 * FACTOR, rel=1e-9
        )
        try:
            conn.execute(
                "UPDATE site_rollups_15m SET kg_co2e = kg_co2e * 2"
                " WHERE site_id = 'sy' AND bucket < '2026-01-01Z'"
            )
            [v] = check(conn, tmp_path, doc)
            assert (v.status, v.differences) == ("valid", [])
        finally:
            recompute_all(conn)


def test_an_index_without_a_list_lists_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "v1")
    ipath = tmp_path / "latest.json"
    ipath.write_text(json.dumps(sign({"schema": outbox.INDEX_SCHEMA, "generated_at": "then"}, KEY)))
    v = one([path, ipath])
    assert (v.status, v.problems) == ("valid", [])
    assert v.notes[-1] == f"{ipath} (generated then) does not list this statement"


def test_a_statement_without_renditions_and_several_foreign_files(tmp_path: Path) -> None:
    doc = {k: v for k, v in statement().items() if k not in ("files", "signature", "signing_key")}
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(sign(doc, KEY)))
    v = one([path])
    assert (v.status, v.problems) == ("valid", [])
    assert v.notes == ["no index given: whether a newer version exists was not checked (add index.json)"]
    # Foreign files are named in the order of their paths.
    first, second = sorted([b"foreign 1", b"foreign 2"], key=lambda b: sha256_hex(b), reverse=True)
    (tmp_path / "1.bin").write_bytes(first)
    (tmp_path / "2.bin").write_bytes(second)
    v = one([path, tmp_path / "2.bin", tmp_path / "1.bin"])
    assert v.problems == [
        f"{tmp_path / n} is not a rendition of this statement (altered, or another's)"
        for n in ("1.bin", "2.bin")
    ]


def test_a_customers_statement_is_recomputed_for_that_customer(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        full = issued(conn)
        lenovo = sign(for_customer(full, "lenovo"), KEY)
        [v] = check(conn, tmp_path, lenovo)
        assert (v.status, v.problems, v.differences) == ("valid", [], [])
        forged = copy.deepcopy(lenovo)
        forged["allocation"][0]["total_market_kg"] += 1.0
        [v] = check(conn, tmp_path, resigned(forged))
        assert v.status == "invalid"
        assert [d["figure"] for d in v.differences] == ["allocation.lenovo.total_market_kg"]


def test_the_recompute_uses_the_statements_own_parameters(db: str, tmp_path: Path) -> None:
    """A statement that says its figures were computed with a 10-minute gap threshold, while the
    stored rows used the default (readings every 15 minutes count as measured): recomputed with the
    stated threshold every interval is a gap, so the measured share does not reproduce."""
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn, params=Params(max_gap_s=600.0))
        assert doc["figures"]["coverage"]["measured_share"] == pytest.approx(1.0)
        [v] = check(conn, tmp_path, doc)
        assert v.status == "invalid"
        assert "figures.coverage.measured_share" in [d["figure"] for d in v.differences]


def test_a_month_without_a_month_before_states_no_change(db: str, tmp_path: Path) -> None:
    """October 2026 has no September readings: no month-on-month figures, and verify agrees."""
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn, period="2026-10")
        assert doc["month_on_month"] is None
        [v] = check(conn, tmp_path, doc)
        assert (v.status, v.differences, v.problems) == ("valid", [], [])


def test_files_and_folders_given_together_are_all_read(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "s.json").write_text(json.dumps(statement()))
    (tmp_path / "in" / "x.csv").write_bytes(CSV)
    got = receive([tmp_path / "s.json", tmp_path / "in"])
    assert [p for p, _ in got.statements] == [tmp_path / "s.json"]
    assert list(got.others.values()) == [tmp_path / "in" / "x.csv"]


def test_a_statement_without_an_audience_is_the_suppliers(db: str, tmp_path: Path) -> None:
    """Schema 1 statements have no ``audience``: they are the supplier's, with every allocation."""
    with psycopg.connect(db, autocommit=True) as conn:
        doc = issued(conn)
        del doc["audience"]
        [v] = check(conn, tmp_path, resigned(doc))
        assert (v.status, v.problems, v.differences) == ("valid", [], [])
