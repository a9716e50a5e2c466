"""E-mail delivery of one statement version (PDF, CSV, signed JSON attached) over SMTP."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from compute.statements.config import EmailConfig
from compute.statements.document import figure
from ops.errors import UserError

_TYPES = {".pdf": ("application", "pdf"), ".csv": ("text", "csv"), ".json": ("application", "json")}


def build_message(doc: dict[str, Any], directory: Path, sender: str, to: list[str]) -> EmailMessage:
    msg = EmailMessage()
    sup = doc["supplier"]
    what = "Revised GHG statement" if doc["supersedes"] else "GHG statement"
    if doc["provisional"]:
        what = "PROVISIONAL " + what
    msg["Subject"] = f"{what} {doc['month']} — {sup['name']} (version {doc['version']})"
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    lines = [
        f"{what} for {sup['name']}, {doc['month']}, version {doc['version']}.",
        "",
        f"Scope 1:                 {figure(doc, 'figures.totals.scope1') / 1000:,.3f} t CO2e",
        f"Scope 2 location-based:  {figure(doc, 'figures.totals.scope2_location') / 1000:,.3f} t CO2e",
        f"Scope 2 market-based:    {figure(doc, 'figures.totals.scope2_market') / 1000:,.3f} t CO2e",
        "",
    ]
    if doc["supersedes"]:
        lines.append(f"This version supersedes version {doc['supersedes']['version']} (late data):")
        lines += [f"  {c['figure']}: {c['old']:,.3f} → {c['new']:,.3f}" for c in doc["supersedes"]["changes"]]
        lines.append("")
    fp = doc["signing_key"]["fingerprint"]
    lines.append(
        f"The .json attachment is signed (Ed25519, key {fp}). With the supplier's public key, check it"
        " and the other attachments as received: `scopemeter statements verify --offline --public-key"
        " KEY.pub FILES…` (add --index with the supplier's signed index.json to see whether a newer"
        " version exists)."
    )
    msg.set_content("\n".join(lines))
    audience = doc.get("audience", "supplier")
    tail = "" if audience == "supplier" else f"-{audience}"
    for name in ("statement.pdf", "statement.csv", "statement.json"):
        path = directory / name
        maintype, subtype = _TYPES[path.suffix]
        fname = f"{sup['id']}-{doc['month']}-v{doc['version']}{tail}{path.suffix}"
        msg.add_attachment(path.read_bytes(), maintype=maintype, subtype=subtype, filename=fname)
    return msg


def send(cfg: EmailConfig, msg: EmailMessage, timeout: float = 30.0) -> None:
    try:
        with smtplib.SMTP(cfg.host, cfg.port, timeout=timeout) as smtp:
            if cfg.starttls:
                smtp.starttls()
            if cfg.username:
                smtp.login(cfg.username, cfg.password or "")
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        raise UserError(f"cannot send e-mail via {cfg.host}:{cfg.port}: {exc}") from None
