"""The statement document: its inputs and their digest, derived figures, versions, Ed25519 signature.

The JSON file IS the statement of record; the PDF and CSV are renderings whose SHA-256 the JSON
lists, so one signature covers all three. The signature is over the canonical JSON (sorted keys,
no whitespace, exact float repr) of the document without its ``signature`` member.

The inputs digest is a SHA-256 over everything the figures derive from: every reading of the
supplier's meters in the month (plus each counter's last reading before and first after it, which
bound the energy of the month's edge buckets), the boundary (sites, meters with their ratios), the
emission factors and contractual instruments used, and the allocation and production data. Same
inputs → same digest; late data changes it, and ``issue`` then writes a new version that
supersedes the old one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compute.recompute import Params
from compute.statements.config import StatementsConfig
from compute.statements.figures import month_bounds
from ops.errors import UserError

# 2: audience (one statement per customer), signing_key with the fingerprint inside the signed
# content, provisional with incomplete_reasons, instruments with claimed_mwh, market_residual_basis.
SCHEMA: Final = "scopemeter.statement/2"
# Figures compared between versions and on verify (dotted paths into the document).
KEY_FIGURES: Final = (
    "totals.scope1",
    "totals.scope2_location",
    "totals.scope2_market",
    "totals.total_location",
    "totals.total_market",
    "totals.energy_kwh",
    "renewable_share",
    "coverage.measured_share",
    "coverage.bucket_share",
)
REL_TOL: Final = 1e-9


def canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- inputs --------------------------------------------------------------------------------------

_READINGS_DIGEST = """
WITH w AS (
    SELECT m.meter_id,
           (%(first)s::date::timestamp AT TIME ZONE s.timezone) AS t0,
           (%(next)s::date::timestamp AT TIME ZONE s.timezone) AS t1
    FROM meters m JOIN sites s USING (site_id) WHERE s.supplier_id = %(supplier)s
), q AS (
    SELECT DISTINCT w.meter_id, r.quantity, w.t0, w.t1
    FROM w JOIN readings r ON r.meter_id = w.meter_id AND r.ts >= w.t0 AND r.ts < w.t1
), x AS (
    SELECT r.meter_id, r.quantity, r.ts, r.value, r.quality
    FROM w JOIN readings r ON r.meter_id = w.meter_id AND r.ts >= w.t0 AND r.ts < w.t1
    UNION ALL
    SELECT b.* FROM q, LATERAL (
        SELECT meter_id, quantity, ts, value, quality FROM readings r
        WHERE r.meter_id = q.meter_id AND r.quantity = q.quantity AND r.ts < q.t0
        ORDER BY ts DESC LIMIT 1) b
    UNION ALL
    SELECT a.* FROM q, LATERAL (
        SELECT meter_id, quantity, ts, value, quality FROM readings r
        WHERE r.meter_id = q.meter_id AND r.quantity = q.quantity AND r.ts >= q.t1
        ORDER BY ts LIMIT 1) a
)
SELECT count(*), encode(sha256(convert_to(coalesce(string_agg(
    meter_id || '|' || quantity || '|' || (extract(epoch FROM ts) * 1000000)::bigint::text
    || '|' || value::text || '|' || quality::text, E'\\n' ORDER BY meter_id, quantity, ts), ''),
    'UTF8')), 'hex')
FROM x
"""


def readings_digest(conn: psycopg.Connection[Any], supplier: str, month: str) -> dict[str, Any]:
    """Count and SHA-256 of the readings the month's figures derive from (computed in PostgreSQL)."""
    first, nxt = month_bounds(month)
    with conn.transaction():
        conn.execute("SET LOCAL extra_float_digits = 1")  # shortest exact float text
        row = conn.execute(_READINGS_DIGEST, {"supplier": supplier, "first": first, "next": nxt}).fetchone()
    assert row is not None
    return {"count": row[0], "sha256": row[1]}


def meters_of(conn: psycopg.Connection[Any], supplier: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT m.meter_id, m.site_id, m.carrier, m.model, m.ct_ratio, m.pt_ratio FROM meters m"
        " JOIN sites s USING (site_id) WHERE s.supplier_id = %s ORDER BY m.meter_id",
        (supplier,),
    ).fetchall()
    return [
        {
            "meter_id": r[0],
            "site_id": r[1],
            "carrier": r[2],
            "model": r[3],
            "ct_ratio": r[4],
            "pt_ratio": r[5],
        }
        for r in rows
    ]


def build_inputs(
    conn: psycopg.Connection[Any], figures: dict[str, Any], cfg: StatementsConfig, params: Params
) -> dict[str, Any]:
    supplier, month = figures["supplier"]["id"], figures["month"]
    production = cfg.production_for(supplier, month)
    return {
        # The recompute parameters (factor series, gap threshold): verify re-runs with exactly these.
        "compute": dataclasses.asdict(params),
        "readings": readings_digest(conn, supplier, month),
        "sites": figures["boundary"],
        "meters": meters_of(conn, supplier),
        "factors": figures["factors"],
        "instruments": figures["instruments"],
        "allocations": [a.model_dump() for a in cfg.allocations_for(supplier)],
        "production": production.model_dump() if production else None,
    }


# --- derived content -----------------------------------------------------------------------------


def _pct(old: float, new: float) -> float | None:
    return (new - old) / old * 100 if old else None


def derive(figures: dict[str, Any], previous: dict[str, Any] | None, cfg: StatementsConfig) -> dict[str, Any]:
    """Month-on-month change, intensity and customer allocation from the figures."""
    t = figures["totals"]
    supplier = figures["supplier"]["id"]
    mom = None
    if previous is not None:
        p = previous["totals"]
        mom = {
            "previous_month": previous["month"],
            **{k: {"previous": p[k], "current": t[k], "change_pct": _pct(p[k], t[k])} for k in sorted(t)},
        }
    production = cfg.production_for(supplier, figures["month"])
    intensity = None
    if production is not None:
        intensity = {
            "production": production.quantity,
            "unit": production.unit,
            "kg_co2e_per_unit_location": t["total_location"] / production.quantity,
            "kg_co2e_per_unit_market": t["total_market"] / production.quantity,
            "kwh_per_unit": t["energy_kwh"] / production.quantity,
        }
    allocation = [
        {
            "customer": a.customer,
            "customer_name": a.customer_name,
            "share": a.share,
            "basis": a.basis,
            "scope3_category": "1 purchased goods and services",
            "scope1_kg": t["scope1"] * a.share,
            "scope2_location_kg": t["scope2_location"] * a.share,
            "scope2_market_kg": t["scope2_market"] * a.share,
            "total_location_kg": t["total_location"] * a.share,
            "total_market_kg": t["total_market"] * a.share,
        }
        for a in cfg.allocations_for(supplier)
    ]
    return {
        "month_on_month": mom,
        "intensity": intensity,
        "allocation": allocation,
        "unallocated_share": max(0.0, 1.0 - sum(a["share"] for a in allocation)),
    }


def figure(doc: dict[str, Any], path: str) -> float:
    node: Any = doc
    for part in path.split("."):
        node = node[part]
    return float(node)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9)


# Fields that name a list element, so that a figure's path survives reordering and new elements.
_IDENTITY = ("customer", "site_id", "carrier", "scope", "method", "date", "instrument_id", "factor_id")


def flatten(node: Any, prefix: str = "") -> dict[str, float]:
    """Every number in ``node`` by its dotted path (list elements by their identity fields)."""
    out: dict[str, float] = {}
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return out
    if isinstance(node, int | float):
        return {prefix: float(node)}
    items: list[tuple[str, Any]]
    if isinstance(node, dict):
        items = [(str(k), v) for k, v in node.items()]
    else:
        items = []
        for n, v in enumerate(node):
            ident = [str(v[k]) for k in _IDENTITY if isinstance(v, dict) and k in v]
            items.append(("|".join(ident) if ident else str(n), v))
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


# What a statement states: compared between versions and recomputed by verify.
STATED: Final = ("figures", "allocation", "intensity", "month_on_month", "unallocated_share")


def stated(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in STATED if k in doc}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Every number that differs between two statements' stated content (figures, daily values,
    lines, allocations…), the headline figures first; a number present on one side only counts
    against 0."""
    a, b = flatten(stated(old)), flatten(stated(new))
    head = [f"figures.{k}" for k in KEY_FIGURES]
    paths = [p for p in head if p in a or p in b] + sorted((set(a) | set(b)) - set(head))
    out = []
    for path in paths:
        x, y = a.get(path, 0.0), b.get(path, 0.0)
        if not close(x, y):
            out.append({"figure": path, "old": x, "new": y, "delta": y - x})
    return out


def new_document(
    figures: dict[str, Any],
    inputs: dict[str, Any],
    derived: dict[str, Any],
    version: int,
    superseded: dict[str, Any] | None,
    now: datetime,
    reasons: list[str],
) -> dict[str, Any]:
    """The supplier's full statement. ``reasons`` why the month is incomplete make it provisional."""
    supplier, month = figures["supplier"]["id"], figures["month"]
    doc = {
        "schema": SCHEMA,
        "statement_id": f"{supplier}/{month}/v{version}",
        "audience": SUPPLIER_AUDIENCE,
        "supplier": figures["supplier"],
        "month": month,
        "version": version,
        "issued_at": now.astimezone(UTC).isoformat(),
        # Not Final: the month lacks data (completeness), and a later version will supersede it.
        "provisional": bool(reasons),
        "incomplete_reasons": list(reasons),
        "inputs": inputs,
        "inputs_digest": sha256_hex(canonical(inputs)),
        "figures": figures,
        **derived,
        "supersedes": None,
        "files": {},
    }
    if superseded is not None:
        doc["supersedes"] = {
            "version": superseded["version"],
            "inputs_digest": superseded["inputs_digest"],
            "issued_at": superseded["issued_at"],
            "changes": differences(superseded, doc),
        }
    return doc


SUPPLIER_AUDIENCE: Final = "supplier"


def for_customer(doc: dict[str, Any], customer: str) -> dict[str, Any]:
    """The statement one customer receives: the supplier's figures and only this customer's
    allocation (other customers' shares, and the unallocated rest that would reveal their sum,
    are left out — also from the inputs)."""
    own = f"allocation.{customer}."
    inputs = {
        **doc["inputs"],
        "allocations": [a for a in doc["inputs"]["allocations"] if a["customer"] == customer],
    }
    out = {k: v for k, v in doc.items() if k != "unallocated_share"}
    out.update(
        statement_id=f"{doc['statement_id']}/{customer}",
        audience=customer,
        inputs=inputs,
        inputs_digest=sha256_hex(canonical(inputs)),
        allocation=[a for a in doc["allocation"] if a["customer"] == customer],
    )
    if doc["supersedes"] is not None:
        changes = [
            c
            for c in doc["supersedes"]["changes"]
            if (not c["figure"].startswith("allocation.") or c["figure"].startswith(own))
            and c["figure"] != "unallocated_share"
        ]
        out["supersedes"] = {**doc["supersedes"], "changes": changes}
    return out


# --- keys and signatures -------------------------------------------------------------------------


def keygen(path: Path, *, overwrite: bool = False) -> Path:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key beside it (``.pub``)."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; refusing to replace a signing key (--force to do so)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_key_path(path)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub


def public_key_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise UserError(f"no signing key at {path}; create one with `scopemeter statements keygen`") from None
    except ValueError as exc:
        raise UserError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A ``.pub`` PEM, or the public half of a private key file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no public key at {path}") from None
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{path}: not an Ed25519 public key")
    return key


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    return sha256_hex(_raw(pub))[:16]


def fingerprint(pub: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, as customers compare it with the published key."""
    return "SHA256:" + sha256_hex(_raw(pub))


def _payload(doc: dict[str, Any]) -> bytes:
    return canonical({k: v for k, v in doc.items() if k != "signature"})


def signing_key(pub: Ed25519PublicKey) -> dict[str, str]:
    """What a statement says about the key that signs it (inside the signed content)."""
    return {
        "alg": "Ed25519",
        "fingerprint": fingerprint(pub),
        "public_key": base64.b64encode(_raw(pub)).decode(),
    }


def content_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of a signed document's canonical JSON: the same however the file is formatted."""
    return sha256_hex(canonical(doc))


def sign(doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Sign ``doc``; the key's fingerprint goes into the signed content (``signing_key``)."""
    pub = key.public_key()
    body = {**{k: v for k, v in doc.items() if k != "signature"}, "signing_key": signing_key(pub)}
    return {
        **body,
        "signature": {
            "alg": "Ed25519",
            "key_id": key_id(pub),
            "value": base64.b64encode(key.sign(_payload(body))).decode(),
        },
    }


def check_signature(doc: dict[str, Any], trusted: Ed25519PublicKey) -> str | None:
    """None when ``doc`` is signed by ``trusted``; otherwise why not."""
    sig = doc.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "Ed25519":
        return "no Ed25519 signature"
    block = doc.get("signing_key")
    if isinstance(block, dict):
        signer = block.get("fingerprint")
        if signer != fingerprint(trusted):
            return f"signed by key {signer}, not by the trusted key {fingerprint(trusted)}"
    elif sig.get("key_id") != key_id(trusted):  # schema 1 statements: a short key id only
        return f"signed by key {sig.get('key_id')}, not by the trusted key {key_id(trusted)}"
    try:
        trusted.verify(base64.b64decode(sig["value"]), _payload(doc))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return "signature does not match the content (the statement was altered)"
    return None
