"""Issue monthly statements: figures + inputs in one snapshot, a new version only when inputs changed.

Per supplier: read the month's figures, the previous month's (month-on-month change) and the
inputs digest in one REPEATABLE READ snapshot; compare with the latest version in the outbox. Same
digest → nothing new ("unchanged"). Different (late data, revised factor, new allocation) → the
next version, which names the one it supersedes and lists the differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from rich.progress import Progress

from compute.recompute import Params
from compute.statements import mail, outbox
from compute.statements.config import StatementsConfig
from compute.statements.document import (
    build_inputs,
    canonical,
    derive,
    load_private_key,
    new_document,
    sha256_hex,
)
from compute.statements.figures import month_bounds, month_figures, previous_month
from ops.errors import UserError


@dataclass(frozen=True)
class Issued:
    supplier: str
    month: str
    version: int
    status: str  # new | superseded | unchanged
    directory: Path
    changes: list[dict[str, Any]] = field(default_factory=list)
    emailed_to: tuple[str, ...] = ()


def suppliers_with_sites(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT supplier_id FROM sites ORDER BY 1").fetchall()]


def snapshot(
    conn: psycopg.Connection[Any], supplier: str, month: str, cfg: StatementsConfig, params: Params
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(figures, previous month's figures, inputs) from one consistent snapshot."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        figures = month_figures(conn, supplier, month)
        previous = month_figures(conn, supplier, previous_month(month))
        inputs = build_inputs(conn, figures, cfg, params)
    return figures, previous, inputs


def issue_one(
    conn: psycopg.Connection[Any],
    cfg: StatementsConfig,
    supplier: str,
    month: str,
    *,
    now: datetime,
    params: Params,
    email: bool = False,
    force: bool = False,
) -> Issued:
    key = load_private_key(cfg.key_path)  # fail before any work when the key is missing
    figures, previous, inputs = snapshot(conn, supplier, month, cfg, params)
    last = outbox.latest(cfg.outbox, supplier, month)
    if last is not None and last["inputs_digest"] == sha256_hex(canonical(inputs)) and not force:
        d = outbox.month_dir(cfg.outbox, supplier, month) / f"v{last['version']}"
        return Issued(supplier, month, last["version"], "unchanged", d)
    prev_figures = previous if previous["lines"] else None
    derived = derive(figures, prev_figures, cfg)
    version = 1 if last is None else last["version"] + 1
    doc = new_document(figures, inputs, derived, version, last, now)
    directory, signed = outbox.write_version(cfg.outbox, doc, key)
    emailed: tuple[str, ...] = ()
    if email:
        to = cfg.recipients_for(supplier)
        if not to:
            raise UserError(f"no [[recipients]] for supplier {supplier!r} in the statements config")
        mail.send(cfg.email, mail.build_message(signed, directory, cfg.email.sender, to))
        emailed = tuple(to)
    changes = signed["supersedes"]["changes"] if signed["supersedes"] else []
    return Issued(supplier, month, version, "superseded" if last else "new", directory, changes, emailed)


def issue_month(
    conn: psycopg.Connection[Any],
    cfg: StatementsConfig,
    month: str,
    suppliers: Sequence[str] | None = None,
    *,
    now: datetime,
    params: Params,
    email: bool = False,
    force: bool = False,
    progress: bool = True,
) -> list[Issued]:
    """Issue ``month`` for ``suppliers`` (default: every supplier with sites), with a progress bar."""
    month_bounds(month)
    chosen = list(suppliers) if suppliers else suppliers_with_sites(conn)
    results: list[Issued] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"statements {month}", total=len(chosen))
        for supplier in chosen:
            bar.update(task, description=f"statements {month}: {supplier}")
            results.append(
                issue_one(conn, cfg, supplier, month, now=now, params=params, email=email, force=force)
            )
            bar.advance(task)
    return results
