"""Verify a statement: signature, file hashes, and a recompute of its figures from the raw readings.

The recompute re-runs the compute engine (``compute.recompute.recompute``) over the month for every
counter of the supplier's meters inside a transaction that is rolled back, so it reads the rollups
the readings imply *now* without changing the database. That recompute also rebuilds market-based
Scope 2 (``site_market_1h``) from the contractual instruments, so market figures and the renewable
share are checked like the location-based ones. Outcomes:

- ``valid``: signature good, files intact, inputs unchanged and the figures reproduce;
- ``outdated``: signature good, but the inputs changed since issue (late data, new factor): the
  figures now differ as listed, and a newer version supersedes it (or should be issued);
- ``invalid``: bad signature, altered files, or the same inputs no longer give the same figures.
"""

from __future__ import annotations

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
    build_inputs,
    canonical,
    check_signature,
    differences,
    sha256_hex,
)
from compute.statements.figures import month_figures
from ingest.events import DirtyRange


@dataclass
class Verification:
    status: str  # valid | outdated | invalid
    problems: list[str] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)
    superseded_by: int | None = None


def _ranges(conn: psycopg.Connection[Any], doc: dict[str, Any]) -> list[DirtyRange]:
    """One dirty range per (meter, quantity) of the supplier's sites spanning each site's month."""
    out = []
    for site in doc["figures"]["boundary"]:
        t0, t1 = (datetime.fromisoformat(x) for x in site["window_utc"])
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
    """(figures, inputs) as the current readings imply them; the database is left unchanged."""
    supplier, month = doc["supplier"]["id"], doc["month"]
    params = Params(**doc["inputs"]["compute"])
    result: tuple[dict[str, Any], dict[str, Any]] | None = None
    with conn.transaction(force_rollback=True):
        for dirty in _ranges(conn, doc):
            recompute(conn, dirty, params)
        figures = month_figures(conn, supplier, month)
        result = figures, build_inputs(conn, figures, cfg, params)
    return result


def verify_statement(
    conn: psycopg.Connection[Any], path: Path, trusted: Ed25519PublicKey, cfg: StatementsConfig
) -> Verification:
    doc = outbox.read_statement(path)
    v = Verification("valid")
    if (why := check_signature(doc, trusted)) is not None:
        v.problems.append(why)
    for name, digest in doc.get("files", {}).items():
        f = path.parent / name
        if not f.exists():
            v.problems.append(f"{name} is missing beside {path.name}")
        elif sha256_hex(f.read_bytes()) != digest:
            v.problems.append(f"{name} was altered (SHA-256 differs from the signed one)")
    if v.problems:
        v.status = "invalid"
        return v
    figures, inputs = recomputed(conn, doc, cfg)
    v.differences = differences(doc["figures"], figures)
    if sha256_hex(canonical(inputs)) != doc["inputs_digest"]:
        v.status = "outdated"
        changed = sorted(k for k in inputs if canonical(inputs[k]) != canonical(doc["inputs"].get(k)))
        v.problems.append(f"inputs changed since issue: {', '.join(changed)}")
    elif v.differences:
        v.status = "invalid"
        v.problems.append("the signed figures do not reproduce from the same readings")
    # A statement inside its outbox (OUTBOX/<supplier>/<month>/v<N>/statement.json): newer versions?
    newer: list[int] = []
    if path.parent.name == f"v{doc['version']}" and len(path.resolve().parents) > 3:
        root = path.resolve().parents[3]
        newer = [n for n in outbox.versions(root, doc["supplier"]["id"], doc["month"]) if n > doc["version"]]
    v.superseded_by = newer[-1] if newer else None
    return v
