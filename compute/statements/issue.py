"""Issue monthly statements: figures + inputs in one snapshot; refused when the month is incomplete.

Per supplier: check the month's completeness (``compute.statements.completeness``), read its
figures, the previous month's (month-on-month change) and the inputs digest in one REPEATABLE READ
snapshot, and compare with the latest version in the outbox. A supplier with no activity in the
month gets no statement; an incomplete month is refused ("refused", with the reasons) unless
``provisional`` is asked for, when it is issued with a PROVISIONAL banner and its reasons. The same
inputs, the same status and the same stated figures (every number, not only the digest) → nothing
new ("unchanged"); anything else → the next version, which names the one it supersedes and lists
every figure that differs. Each version also writes one statement per customer, and the outbox's
signed index of latest versions is rewritten.
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
from compute.statements import completeness, mail, outbox
from compute.statements.config import StatementsConfig
from compute.statements.document import (
    build_inputs,
    canonical,
    derive,
    differences,
    load_private_key,
    new_document,
    sha256_hex,
    text_differences,
)
from compute.statements.figures import month_bounds, month_figures, previous_month, supplier_name
from ops.errors import UserError


@dataclass(frozen=True)
class Issued:
    supplier: str
    month: str
    version: int | None
    status: str  # new | superseded | unchanged | refused (incomplete month) | skipped (no activity)
    directory: Path | None
    changes: list[dict[str, Any]] = field(default_factory=list)
    emailed_to: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()  # why the month is incomplete (refused, or issued provisional)
    provisional: bool = False


def suppliers_with_sites(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT supplier_id FROM sites ORDER BY 1").fetchall()]


@dataclass(frozen=True)
class Snapshot:
    state: completeness.Completeness
    figures: dict[str, Any]
    previous: dict[str, Any]
    inputs: dict[str, Any]


def snapshot(
    conn: psycopg.Connection[Any],
    supplier: str,
    month: str,
    cfg: StatementsConfig,
    params: Params,
    now: datetime,
) -> Snapshot:
    """Completeness, figures, previous month's figures and inputs from one consistent snapshot."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        supplier_name(conn, supplier)  # an unknown supplier is an error, not "no activity"
        state = completeness.check(conn, supplier, month, now=now, min_meter_coverage=cfg.min_meter_coverage)
        figures = month_figures(conn, supplier, month)
        previous = month_figures(conn, supplier, previous_month(month))
        inputs = build_inputs(conn, figures, cfg, params)
    return Snapshot(state, figures, previous, inputs)


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
    provisional: bool = False,
) -> Issued:
    key = load_private_key(cfg.key_path)  # fail before any work when the key is missing
    snap = snapshot(conn, supplier, month, cfg, params, now)
    reasons = tuple(snap.state.reasons)
    if not snap.state.active:
        return Issued(supplier, month, None, "skipped", None, reasons=reasons)
    if reasons and not provisional:
        return Issued(supplier, month, None, "refused", None, reasons=reasons)
    last = outbox.latest(cfg.outbox, supplier, month)
    prev_figures = snap.previous if snap.previous["lines"] else None
    derived = derive(snap.figures, prev_figures, cfg)
    version = 1 if last is None else last["version"] + 1
    doc = new_document(snap.figures, snap.inputs, derived, version, last, now, list(reasons))
    if (
        last is not None
        and not force
        and last["inputs_digest"] == sha256_hex(canonical(snap.inputs))
        and last["provisional"] == doc["provisional"]
        and last.get("incomplete_reasons", []) == doc["incomplete_reasons"]
        and not differences(last, doc)
        and not text_differences(last, doc)
    ):
        d = outbox.month_dir(cfg.outbox, supplier, month) / f"v{last['version']}"
        return Issued(
            supplier, month, last["version"], "unchanged", d, reasons=reasons, provisional=last["provisional"]
        )
    directory, signed, customers = outbox.write_version(cfg.outbox, doc, key)
    outbox.write_index(cfg.outbox, key, now)
    emailed: tuple[str, ...] = ()
    if email:
        emailed = _send(cfg, directory, signed, customers)
    changes = signed["supersedes"]["changes"] if signed["supersedes"] else []
    return Issued(
        supplier,
        month,
        version,
        "superseded" if last else "new",
        directory,
        changes,
        emailed,
        reasons,
        signed["provisional"],
    )


def _send(
    cfg: StatementsConfig, directory: Path, signed: dict[str, Any], customers: dict[str, dict[str, Any]]
) -> tuple[str, ...]:
    """The full statement to the supplier's recipients; each customer's own to its recipients."""
    supplier = signed["supplier"]["id"]
    to = cfg.recipients_for(supplier)
    customer_to = {c: cfg.recipients_for(supplier, c) for c in customers}
    if not to and not any(customer_to.values()):
        raise UserError(f"no [[recipients]] for supplier {supplier!r} in the statements config")
    sent: list[str] = []
    if to:
        mail.send(cfg.email, mail.build_message(signed, directory, cfg.email.sender, to))
        sent += to
    for customer, addresses in customer_to.items():
        if addresses:
            d = outbox.customer_dir(directory, customer)
            mail.send(cfg.email, mail.build_message(customers[customer], d, cfg.email.sender, addresses))
            sent += addresses
    return tuple(sent)


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
    provisional: bool = False,
    progress: bool = True,
) -> list[Issued]:
    """Issue ``month`` for ``suppliers`` (default: every supplier with sites), with a progress bar.
    Every supplier that can be issued is; the others come back "refused" or "skipped" with why."""
    month_bounds(month)
    chosen = list(suppliers) if suppliers else suppliers_with_sites(conn)
    results: list[Issued] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"statements {month}", total=len(chosen))
        for supplier in chosen:
            bar.update(task, description=f"statements {month}: {supplier}")
            results.append(
                issue_one(
                    conn,
                    cfg,
                    supplier,
                    month,
                    now=now,
                    params=params,
                    email=email,
                    force=force,
                    provisional=provisional,
                )
            )
            bar.advance(task)
    return results
