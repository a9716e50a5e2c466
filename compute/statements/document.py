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
# Published as compute/statements/schema/statement-2.schema.json (JSON Schema 2020-12).
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
        "SELECT m.meter_id, m.site_id, m.carrier, m.model, m.ct_ratio, m.pt_ratio, m.activity_unit,"
        " m.cv_basis, m.reference_conditions, m.fuel_type, m.accuracy_class, m.max_kw FROM meters m"
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
            # What the meter's counter means (unit and basis) and how exact it is.
            "unit": r[6],
            "cv_basis": r[7],
            "reference_conditions": r[8],
            "fuel_type": r[9],
            "accuracy_class": r[10],
            # Its plausibility bound: readings beyond it are quarantined (compute.quarantine).
            "max_kw": r[11],
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
        "not_metered": figures.get("not_metered", []),
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
    reporting = cfg.reporting_for(supplier)
    uncertainty = uncertainty_pct(figures, reporting.estimated_uncertainty_pct if reporting else None)
    return {
        "month_on_month": mom,
        "intensity": intensity,
        "allocation": allocation,
        "unallocated_share": max(0.0, 1.0 - sum(a["share"] for a in allocation)),
        "disclosure": disclosure(figures, reporting, uncertainty),
        "cdp_sc1_1": cdp_sc1_1(figures, allocation, intensity, reporting, uncertainty),
        "pact": pact(figures),
    }


UNCERTAINTY_METHOD: Final = (
    "Measurement uncertainty only, combined in quadrature over independent site/carrier lines: "
    "measured activity at the worst accuracy class of the line's meters, estimated activity and "
    "non-metered records at the stated estimated_uncertainty_pct. Emission factor uncertainty is "
    "not included."
)


def uncertainty_pct(figures: dict[str, Any], estimated_pct: float | None) -> float | None:
    """+-% of Scope 1 + location-based Scope 2 (see ``UNCERTAINTY_METHOD``); None when a meter has
    no accuracy class or no estimated-uncertainty assumption is stated."""
    if estimated_pct is None:
        return None
    classes = {(a["site_id"], a["carrier"], a["unit"]): a for a in figures.get("meter_accuracy", [])}
    total = variance = 0.0
    for ln in figures["lines"]:
        if (ln["scope"], ln["method"]) not in ((1, "direct"), (2, "location")) or not ln["kg_co2e"]:
            continue
        acc = classes.get((ln["site_id"], ln["carrier"], ln["unit"]))
        if acc is None or acc["meters_without_class"] or acc["worst_class_pct"] is None:
            return None
        amount = ln["kwh"] or 0.0
        est = ln["kwh_estimated"] or 0.0
        share_est = est / amount if amount else 0.0
        rel = math.hypot((1 - share_est) * acc["worst_class_pct"], share_est * estimated_pct) / 100
        variance += (ln["kg_co2e"] * rel) ** 2
        total += ln["kg_co2e"]
    for rec in figures.get("not_metered", []):
        if rec["kg_co2e"]:
            variance += (rec["kg_co2e"] * estimated_pct / 100) ** 2
            total += rec["kg_co2e"]
    return math.sqrt(variance) / total * 100 if total else None


def disclosure(figures: dict[str, Any], reporting: Any | None, uncertainty: float | None) -> dict[str, Any]:
    """Boundary, base year, exclusions, assurance and the ISO 14064-1:2018 categories."""
    t = figures["totals"]
    by_gas = figures.get("by_gas", {})
    return {
        "standards": ["GHG Protocol Corporate Standard", "GHG Protocol Scope 2 Guidance", "ISO 14064-1:2018"],
        "consolidation_approach": reporting.consolidation_approach if reporting else None,
        "base_year": reporting.base_year if reporting else None,
        "recalculation_policy": reporting.recalculation_policy if reporting else None,
        "exclusions": [e.model_dump() for e in reporting.exclusions] if reporting else [],
        "verification": {
            "status": reporting.verification if reporting else "none",
            "verifier": reporting.verifier if reporting else None,
            "standard": reporting.verification_standard if reporting else None,
        },
        "iso14064_categories": {
            "category_1_direct": {"kg_co2e": t["scope1"], "kg_by_gas": by_gas.get("scope1")},
            "category_2_imported_energy": {
                "kg_co2e_location": t["scope2_location"],
                "kg_co2e_market": t["scope2_market"],
                "kg_by_gas_location": by_gas.get("scope2_location"),
            },
        },
        "gwp_sets": by_gas.get("gwp_sets", []),
        "co2_only_factor_ids": by_gas.get("co2_only_factor_ids", []),
        "uncertainty_pct": uncertainty,
        "uncertainty_method": UNCERTAINTY_METHOD,
        "not_metered_kg_co2e": figures.get("not_metered_kg", 0.0),
    }


def cdp_sc1_1(
    figures: dict[str, Any],
    allocation: list[dict[str, Any]],
    intensity: dict[str, Any] | None,
    reporting: Any | None,
    uncertainty: float | None,
) -> list[dict[str, Any]]:
    """CDP Supply Chain SC1.1 rows: one per requesting customer with its allocated emissions."""
    sources = sorted(
        ((ln["carrier"], ln["kg_co2e"]) for ln in figures["lines"] if ln["method"] in ("direct", "location")),
        key=lambda x: -x[1],
    )
    major: list[str] = []
    for carrier, _kg in sources:
        if carrier not in major:
            major.append(carrier)
    return [
        {
            "requesting_member": a["customer_name"],
            "customer": a["customer"],
            "scope_or_category": "Scope 1 and Scope 2 (supplier); customer's Scope 3 category 1",
            "allocation_level": reporting.allocation_level if reporting else None,
            "allocation_method": f"{a['basis']} share {a['share']}",
            "quantity_supplied": intensity["production"] * a["share"] if intensity else None,
            "unit_for_quantity_supplied": intensity["unit"] if intensity else None,
            "emissions_t_co2e_location": a["total_location_kg"] / 1000,
            "emissions_t_co2e_market": a["total_market_kg"] / 1000,
            "uncertainty_pct": uncertainty,
            "major_sources": major[:3],
            "verified": bool(reporting and reporting.verification != "none"),
        }
        for a in allocation
    ]


def pact(figures: dict[str, Any]) -> dict[str, Any]:
    """PACT (Pathfinder) v3-style data-quality fields for the period."""
    windows = [s["window_utc"] for s in figures["boundary"]]
    coverage = figures["coverage"]
    return {
        "referencePeriodStart": min((w[0] for w in windows), default=None),
        "referencePeriodEnd": max((w[1] for w in windows), default=None),
        "geography": {
            "geographyCountry": sorted({s["grid_region"].split("-")[0] for s in figures["boundary"]}),
            "geographyRegionOrSubregion": sorted({s["grid_region"] for s in figures["boundary"]}),
        },
        # Share of activity measured by this system's meters (not estimated, not entered by hand).
        "primaryDataShare": coverage["measured_share"] * 100,
        "dqi": {"coveragePercent": coverage["bucket_share"] * 100},
    }


def figure(doc: dict[str, Any], path: str) -> float:
    node: Any = doc
    for part in path.split("."):
        node = node[part]
    return float(node)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9)


# Fields that name a list element, so that a figure's path survives reordering and new elements.
_IDENTITY = (
    "customer",
    "site_id",
    "carrier",
    "scope",
    "method",
    "date",
    "instrument_id",
    "factor_id",
    "record_id",
    "unit",
)


def _items(node: dict[str, Any] | list[Any]) -> list[tuple[str, Any]]:
    """A container's children by key: a dict's keys, a list's elements by their identity fields."""
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    items = []
    used: set[str] = set()
    for n, v in enumerate(node):
        ident = [str(v[k]) for k in _IDENTITY if isinstance(v, dict) and k in v]
        key = "|".join(ident) if ident else str(n)
        if key in used:  # identity fields do not tell two elements apart: keep both
            key = f"{key}#{n}"
        used.add(key)
        items.append((key, v))
    return items


def flatten(node: Any, prefix: str = "") -> dict[str, float]:
    """Every number in ``node`` by its dotted path (list elements by their identity fields)."""
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return {}
    if isinstance(node, int | float):
        return {prefix: float(node)}
    out: dict[str, float] = {}
    for k, v in _items(node):
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


# What a statement states: compared between versions and recomputed by verify.
STATED: Final = (
    "figures",
    "allocation",
    "intensity",
    "month_on_month",
    "unallocated_share",
    "disclosure",
    "cdp_sc1_1",
    "pact",
)
# Stated content with one element per customer: a customer's statement keeps only its own.
PER_CUSTOMER: Final = ("allocation", "cdp_sc1_1")


def stated(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in STATED if k in doc}


def texts(node: Any, prefix: str = "") -> dict[str, str | bool]:
    """Every text and flag in ``node`` by its dotted path (list elements by their identity fields):
    what ``flatten`` leaves out, such as an allocation's basis or Scope 3 category."""
    if isinstance(node, bool | str):
        return {prefix: node}
    if not isinstance(node, dict | list):
        return {}
    out: dict[str, str | bool] = {}
    for k, v in _items(node):
        out.update(texts(v, f"{prefix}.{k}" if prefix else k))
    return out


def text_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The paths of stated texts and flags that differ (or exist on one side only)."""
    a, b = texts(stated(old)), texts(stated(new))
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


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
    allocation and CDP SC1.1 row (other customers' shares, and the unallocated rest that would
    reveal their sum, are left out — also from the inputs)."""
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
    )
    for section in PER_CUSTOMER:
        if section in doc:
            out[section] = [a for a in doc[section] if a["customer"] == customer]

    def own(figure: str) -> bool:
        section = figure.split(".", 1)[0]
        return section not in PER_CUSTOMER or figure.startswith(f"{section}.{customer}.")

    if doc["supersedes"] is not None:
        changes = [
            c for c in doc["supersedes"]["changes"] if own(c["figure"]) and c["figure"] != "unallocated_share"
        ]
        out["supersedes"] = {**doc["supersedes"], "changes": changes}
    return out


# --- keys and signatures -------------------------------------------------------------------------


def keygen(path: Path, *, overwrite: bool = False) -> Path:
    """A new Ed25519 key at ``path`` (mode 0600, encrypted with the configured passphrase) and its
    public key beside it (``.pub``); ``overwrite`` rotates (``compute.statements.keys``)."""
    from compute.statements import keys

    return keys.keygen(path, overwrite=overwrite, secret=keys.passphrase())


def public_key_path(private: Path) -> Path:
    from compute.statements import keys

    return keys.public_key_path(private)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key, unlocked with the configured passphrase (``compute.statements.keys``)."""
    from compute.statements import keys

    return keys.load_private_key(path, keys.passphrase())


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
