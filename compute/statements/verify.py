"""Verify statements as received: signature, renditions, latest version — and, with the database,
every figure recomputed from the raw readings.

Offline (only the files and the supplier's public key): the files may have any names and sit in
any folder. Each file is recognised by its content: a signed statement JSON, the signed index of
latest versions (``index.json``), or a rendition (PDF, CSV) whose SHA-256 the statement lists. The
statement's signature must be the trusted key's (its fingerprint is inside the signed content);
every rendition given must be one the statement lists; the index, when given or found in a
folder above the statement (an outbox), says whether a newer version superseded it.

With the database, the compute engine re-runs over the month (and the month before, for the
month-on-month figures) for every counter of the supplier's meters inside a transaction that is
rolled back, and every number the statement states — totals, lines, daily values, coverage,
instruments' claims, allocations — is compared with the recomputed one.

Outcomes: ``valid``; ``superseded`` (a newer version exists); ``outdated`` (signature good, but the
inputs changed since issue: late data, new factor); ``invalid`` (bad signature, altered or foreign
files, a copy that differs from the version issued, or the same inputs no longer giving the same
figures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from compute.recompute import Params, recompute
from compute.statements import outbox
from compute.statements.config import StatementsConfig
from compute.statements.document import (
    SUPPLIER_AUDIENCE,
    build_inputs,
    canonical,
    check_signature,
    content_digest,
    derive,
    differences,
    for_customer,
    sha256_hex,
    text_differences,
)
from compute.statements.figures import month_figures, previous_month
from ingest.events import DirtyRange
from ops.errors import UserError


@dataclass
class Verification:
    path: Path
    status: str = "valid"  # valid | superseded | outdated | invalid
    statement_id: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)
    superseded_by: int | None = None
    fingerprint: str = ""


@dataclass
class _Received:
    statements: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    indexes: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    others: dict[str, Path] = field(default_factory=dict)  # sha256 → file


def _json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def receive(paths: list[Path]) -> _Received:
    """Sort the given files (folders: their files) into statements, indexes and other files."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file")
    got = _Received()
    for f in files:
        doc = _json(f)
        if doc is not None and "statement_id" in doc:
            got.statements.append((f, doc))
        elif doc is not None and doc.get("schema") == outbox.INDEX_SCHEMA:
            got.indexes.append((f, doc))
        else:
            got.others[sha256_hex(f.read_bytes())] = f
    if not got.statements:
        raise UserError(f"no signed statement JSON among {', '.join(str(p) for p in paths)}")
    return got


def _found_index(path: Path) -> Path | None:
    """An outbox's index.json in a folder above a statement, if there is one."""
    for parent in list(path.resolve().parents)[:6]:
        if (parent / outbox.INDEX).is_file():
            return parent / outbox.INDEX
    return None


def _check_index(v: Verification, doc: dict[str, Any], index: dict[str, Any], where: Path) -> None:
    audience = doc.get("audience", SUPPLIER_AUDIENCE)
    entry = next(
        (
            e
            for e in index.get("latest", [])
            if (e["supplier"], e["month"], e["audience"]) == (doc["supplier"]["id"], doc["month"], audience)
        ),
        None,
    )
    if entry is None:
        v.notes.append(f"{where} (generated {index.get('generated_at')}) does not list this statement")
    elif entry["version"] > doc["version"]:
        v.superseded_by = entry["version"]
        v.status = "superseded" if v.status == "valid" else v.status
        v.problems.append(f"superseded by version {entry['version']} (index {where})")
    elif entry["version"] == doc["version"] and entry["content_sha256"] != content_digest(doc):
        v.status = "invalid"
        v.problems.append(f"differs from version {doc['version']} as issued (index {where})")


def verify_offline(paths: list[Path], trusted: Ed25519PublicKey) -> list[Verification]:
    """Signature, renditions and latest version of every statement among ``paths``; no database."""
    got = receive(paths)
    for path, doc in got.statements:  # the renditions an outbox keeps beside its statement
        for name, digest in doc.get("files", {}).items():
            beside = path.parent / name
            if (
                digest not in got.others
                and beside.is_file()
                and beside.resolve() not in {p.resolve() for p in got.others.values()}
            ):
                got.others[sha256_hex(beside.read_bytes())] = beside
    indexes = []
    for ipath, index in got.indexes:
        if (why := check_signature(index, trusted)) is not None:
            raise UserError(f"{ipath}: the index is not to be trusted: {why}")
        indexes.append((ipath, index))
    listed = {d for _, doc in got.statements for d in doc.get("files", {}).values()}
    results = []
    for path, doc in got.statements:
        v = Verification(path, statement_id=str(doc.get("statement_id")))
        v.fingerprint = str((doc.get("signing_key") or {}).get("fingerprint", ""))
        if (why := check_signature(doc, trusted)) is not None:
            v.problems.append(why)
        for name, digest in sorted(doc.get("files", {}).items()):
            if digest in got.others:
                v.notes.append(f"{name}: matches {got.others[digest]}")
            elif (path.parent / name).is_file():
                v.problems.append(f"{path.parent / name} was altered (SHA-256 differs from the signed one)")
            else:
                v.notes.append(f"{name}: not among the files given (not checked)")
        for digest, f in sorted(got.others.items(), key=lambda x: str(x[1])):
            if digest not in listed:
                v.problems.append(f"{f} is not a rendition of this statement (altered, or another's)")
        if v.problems:
            v.status = "invalid"
        found = _found_index(path)
        if not indexes and found is None:
            v.notes.append("no index given: whether a newer version exists was not checked (add index.json)")
        for ipath, index in indexes or ([(found, json.loads(found.read_text()))] if found else []):
            if not indexes and (why := check_signature(index, trusted)) is not None:
                v.notes.append(f"{ipath}: not signed by the trusted key ({why}); not used")
                continue
            _check_index(v, doc, index, ipath)
        results.append(v)
    return results


def _ranges(conn: psycopg.Connection[Any], doc: dict[str, Any]) -> list[DirtyRange]:
    """One dirty range per (meter, quantity) of the supplier's sites spanning the period and the one
    before it (month-on-month figures; year-on-year for an annual statement)."""
    before = timedelta(days=366 if doc["figures"].get("period_kind") == "year" else 31)
    out = []
    for site in doc["figures"]["boundary"]:
        t0, t1 = (datetime.fromisoformat(x) for x in site["window_utc"])
        t0 -= before
        rows = conn.execute(
            "SELECT DISTINCT r.meter_id, r.quantity FROM readings r JOIN meters m USING (meter_id)"
            " WHERE m.site_id = %s AND r.ts >= %s AND r.ts < %s ORDER BY 1, 2",
            (site["site_id"], t0 - timedelta(days=1), t1 + timedelta(days=1)),
        ).fetchall()
        out += [
            DirtyRange(site_id=site["site_id"], meter_id=m, quantity=q, t_min=t0, t_max=t1, rows=0)
            for m, q in rows
        ]
    return out


def recomputed(
    conn: psycopg.Connection[Any], doc: dict[str, Any], cfg: StatementsConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stated content, inputs) as the current readings imply them, for the statement's audience;
    the database is left unchanged."""
    supplier, month = doc["supplier"]["id"], doc["month"]
    params = Params(**doc["inputs"]["compute"])
    with conn.transaction(force_rollback=True):
        for dirty in _ranges(conn, doc):
            recompute(conn, dirty, params)
        figures = month_figures(conn, supplier, month)
        previous = month_figures(conn, supplier, previous_month(month))
        inputs = build_inputs(conn, figures, cfg, params)
    full = {
        "figures": figures,
        **derive(figures, previous if previous["lines"] else None, cfg),
        "inputs": inputs,
        "statement_id": doc["statement_id"],
        "supersedes": None,
    }
    audience = doc.get("audience", SUPPLIER_AUDIENCE)
    view = full if audience == SUPPLIER_AUDIENCE else for_customer(full, audience)
    return view, view["inputs"]


def verify_statement(
    conn: psycopg.Connection[Any], paths: list[Path], trusted: Ed25519PublicKey, cfg: StatementsConfig
) -> list[Verification]:
    """The offline checks, then every stated figure recomputed from the readings."""
    results = verify_offline(paths, trusted)
    for v in results:
        if v.status == "invalid":
            continue
        doc = json.loads(v.path.read_bytes())
        content, inputs = recomputed(conn, doc, cfg)
        v.differences = differences(doc, content)
        texts_changed = text_differences(doc, content)
        if sha256_hex(canonical(inputs)) != doc["inputs_digest"]:
            v.status = "outdated" if v.status == "valid" else v.status
            changed = sorted(k for k in inputs if canonical(inputs[k]) != canonical(doc["inputs"].get(k)))
            v.problems.append(f"inputs changed since issue: {', '.join(changed)}")
        elif v.differences or texts_changed:
            v.status = "invalid"
            if v.differences:
                v.problems.append("the signed figures do not reproduce from the same readings")
            if texts_changed:
                v.problems.append(f"stated fields do not reproduce: {', '.join(texts_changed[:8])}")
    return results
