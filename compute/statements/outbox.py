"""The outbox: every issued version, kept forever, as ``OUTBOX/<supplier>/<YYYY-MM>/v<N>/``.

A version directory holds the supplier's full statement (``statement.pdf``, ``statement.csv`` and
the signed ``statement.json``, which lists the other two files' SHA-256) and one statement per
customer under ``customers/<customer>/`` showing only that customer's allocation. It is assembled
in a temporary directory and renamed into place, so a reader never sees a half-written version and
two concurrent issuers cannot both create the same version number (the second rename fails).

``OUTBOX/index.json`` is a signed index of the latest version of every statement (per supplier,
month and audience) with its content digest: a customer holding an older version, or a copy that
differs from the one issued, finds out offline with the index and the public key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compute.statements.document import (
    SUPPLIER_AUDIENCE,
    content_digest,
    for_customer,
    sha256_hex,
    sign,
    signing_key,
)
from compute.statements.render import csv_text, write_pdf
from ops.errors import UserError

_VERSION = re.compile(r"^v(\d+)$")
FILES = ("statement.pdf", "statement.csv", "statement.json")
INDEX = "index.json"
INDEX_SCHEMA = "scopemeter.statement-index/1"


def month_dir(outbox: Path, supplier: str, month: str) -> Path:
    return outbox / supplier / month


def versions(outbox: Path, supplier: str, month: str) -> list[int]:
    d = month_dir(outbox, supplier, month)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir())


def read_statement(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a statement JSON file: {exc}") from None
    if not isinstance(doc, dict) or "statement_id" not in doc:
        raise UserError(f"{path}: not a scopemeter statement")
    return doc


def latest(outbox: Path, supplier: str, month: str) -> dict[str, Any] | None:
    vs = versions(outbox, supplier, month)
    if not vs:
        return None
    return read_statement(month_dir(outbox, supplier, month) / f"v{vs[-1]}" / "statement.json")


def _write_one(directory: Path, doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "signing_key": signing_key(key.public_key())}  # the renditions show the fingerprint
    write_pdf(doc, directory / "statement.pdf")
    (directory / "statement.csv").write_text(csv_text(doc))
    files = {name: sha256_hex((directory / name).read_bytes()) for name in FILES[:2]}
    signed = sign({**doc, "files": files}, key)
    _write_json(directory / "statement.json", signed)
    return signed


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")


def customer_dir(version_dir: Path, customer: str) -> Path:
    return version_dir / "customers" / customer


def write_version(
    outbox: Path, doc: dict[str, Any], key: Ed25519PrivateKey
) -> tuple[Path, dict[str, Any], dict[str, dict[str, Any]]]:
    """Render, hash, sign and publish ``doc`` and one statement per customer of its allocation as
    the version directory; returns (dir, signed doc, signed customer docs by customer)."""
    parent = month_dir(outbox, doc["supplier"]["id"], doc["month"])
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"v{doc['version']}"
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=parent))
    try:
        signed = _write_one(tmp, doc, key)
        customers = {
            a["customer"]: _write_one(customer_dir(tmp, a["customer"]), for_customer(doc, a["customer"]), key)
            for a in doc["allocation"]
        }
        for d in [tmp, *tmp.rglob("*")]:
            if d.is_dir():
                os.chmod(d, 0o755)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise UserError(
                f"{final} already exists (another issue run?); run again to issue the next version"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, signed, customers


def index_entries(outbox: Path) -> list[dict[str, Any]]:
    """The latest version of every statement in the outbox, with its content digest."""
    out: list[dict[str, Any]] = []
    if not outbox.is_dir():
        return out
    for sup in sorted(p for p in outbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for month in sorted(p for p in sup.iterdir() if p.is_dir()):
            vs = versions(outbox, sup.name, month.name)
            if not vs:
                continue
            vdir = month / f"v{vs[-1]}"
            docs = [vdir / "statement.json", *sorted((vdir / "customers").glob("*/statement.json"))]
            for path in docs:
                doc = read_statement(path)
                out.append(
                    {
                        "supplier": doc["supplier"]["id"],
                        "month": doc["month"],
                        "audience": doc.get("audience", SUPPLIER_AUDIENCE),
                        "version": doc["version"],
                        "statement_id": doc["statement_id"],
                        "issued_at": doc["issued_at"],
                        "provisional": doc["provisional"],
                        "content_sha256": content_digest(doc),
                    }
                )
    return out


def write_index(outbox: Path, key: Ed25519PrivateKey, now: Any) -> dict[str, Any]:
    """(Re)write the signed index of latest versions, atomically."""
    index = sign(
        {"schema": INDEX_SCHEMA, "generated_at": now.isoformat(), "latest": index_entries(outbox)}, key
    )
    fd, tmp = tempfile.mkstemp(prefix=".index-", dir=outbox)
    os.close(fd)
    _write_json(Path(tmp), index)
    os.chmod(tmp, 0o644)
    os.replace(tmp, outbox / INDEX)
    return index
