"""The outbox: every issued version, kept forever, as ``OUTBOX/<supplier>/<YYYY-MM>/v<N>/``.

A version directory holds ``statement.pdf``, ``statement.csv`` and the signed ``statement.json``
(which lists the other two files' SHA-256). It is assembled in a temporary directory and renamed
into place, so a reader never sees a half-written version and two concurrent issuers cannot both
create the same version number (the second rename fails).
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

from compute.statements.document import sha256_hex, sign
from compute.statements.render import csv_text, write_pdf
from ops.errors import UserError

_VERSION = re.compile(r"^v(\d+)$")
FILES = ("statement.pdf", "statement.csv", "statement.json")


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


def write_version(outbox: Path, doc: dict[str, Any], key: Ed25519PrivateKey) -> tuple[Path, dict[str, Any]]:
    """Render, hash, sign and publish ``doc`` as its version directory; returns (dir, signed doc)."""
    parent = month_dir(outbox, doc["supplier"]["id"], doc["month"])
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"v{doc['version']}"
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=parent))
    try:
        write_pdf(doc, tmp / "statement.pdf")
        (tmp / "statement.csv").write_text(csv_text(doc))
        files = {name: sha256_hex((tmp / name).read_bytes()) for name in FILES[:2]}
        signed = sign({**doc, "files": files}, key)
        (tmp / "statement.json").write_text(
            json.dumps(signed, indent=2, sort_keys=True, allow_nan=False) + "\n"
        )
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise UserError(
                f"{final} already exists (another issue run?); run again to issue the next version"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, signed
