"""``config/statements.toml``: customer allocation shares, production data, signing key, outbox, e-mail.

Validated like the fleet and factor files: unknown keys are rejected and errors name the entry.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from compute.config import ConfigError, read_toml, section_entries, validate
from edge.wire import Ident
from ops.settings import REPO_ROOT

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def _month(v: str) -> str:
    if not MONTH_RE.match(v):
        raise ValueError(f"month must be YYYY-MM, not {v!r}")
    return v


def _share(v: float) -> float:
    if not math.isfinite(v) or not 0 < v <= 1:
        raise ValueError("share must be a fraction in (0, 1]")
    return v


def _positive(v: float) -> float:
    if not math.isfinite(v) or v <= 0:
        raise ValueError("must be a finite number > 0")
    return v


Month = Annotated[str, AfterValidator(_month)]


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Allocation(_Entry):
    supplier: Ident
    customer: Ident
    customer_name: Text
    share: Annotated[float, AfterValidator(_share)]
    basis: Text = "revenue"


class Production(_Entry):
    supplier: Ident
    month: Month
    quantity: Annotated[float, AfterValidator(_positive)]
    unit: Text


class Exclusion(_Entry):
    what: Text
    reason: Text


DEFAULT_RECALCULATION = (
    "The base year is recalculated when structural changes (acquisitions, divestments, outsourcing),"
    " changes in calculation methodology or emission factors, or discovered errors change base-year"
    " emissions by 5 % or more (GHG Protocol Corporate Standard, chapter 5)."
)


class Reporting(_Entry):
    """What a supplier's statements disclose about their boundary and assurance (GHG Protocol,
    ISO 14064-1:2018 clause 9, CDP Supply Chain SC1.1)."""

    supplier: Ident
    consolidation_approach: Literal["operational_control", "financial_control", "equity_share"]
    base_year: Annotated[int, Field(ge=1990, le=2100)]
    recalculation_policy: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = (
        DEFAULT_RECALCULATION
    )
    exclusions: list[Exclusion] = []
    verification: Literal["none", "limited", "reasonable"] = "none"
    verifier: Text | None = None
    verification_standard: Text | None = None  # e.g. "ISO 14064-3:2019"
    allocation_level: Literal["company", "facility", "product"] = "company"
    # Assumed uncertainty (percent) of estimated energy (gaps, estimated readings) and of
    # non-metered activity; measured energy takes its meters' accuracy class.
    estimated_uncertainty_pct: Annotated[float, AfterValidator(_positive)] = 10.0


class Recipients(_Entry):
    """Who receives what: without ``customer`` the supplier's full statement, with it only that
    customer's statement (its own allocation)."""

    supplier: Ident
    customer: Ident | None = None
    to: list[Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(min_length=1)


class EmailConfig(_Entry):
    host: Text = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    sender: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")] = "statements@localhost"
    starttls: bool = False
    username: str | None = None
    password: str | None = None


class StatementsConfig(_Entry):
    # Overrides the setting statements.signing_key (default /etc/scopemeter/statement-signing.key),
    # e.g. for a second configuration on one machine; unset in the shipped config.
    signing_key: Path | None = None
    outbox_dir: Path = Path(".scopemeter/statements")
    email: EmailConfig = EmailConfig()
    allocations: list[Allocation] = []
    production: list[Production] = []
    recipients: list[Recipients] = []
    reporting: list[Reporting] = []
    # A registered meter that measured less of its month than this makes the month incomplete:
    # no "Final" statement (``compute.statements.completeness``).
    min_meter_coverage: Annotated[float, Field(ge=0, le=1)] = 0.99

    def path(self, p: Path) -> Path:
        """Relative paths are relative to the repository root (where the default config lives)."""
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def key_path(self) -> Path:
        if self.signing_key is not None:
            return self.path(self.signing_key)
        from ops.settings import Settings

        return Settings().statements.signing_key

    @property
    def outbox(self) -> Path:
        return self.path(self.outbox_dir)

    def allocations_for(self, supplier: str) -> list[Allocation]:
        return [a for a in self.allocations if a.supplier == supplier]

    def production_for(self, supplier: str, month: str) -> Production | None:
        """The month's production; for a year (``YYYY``) the sum of its months, when every month of
        the year is given in one unit (else None: no annual intensity from partial data)."""
        if len(month) == 4:
            months = [
                p for p in self.production if p.supplier == supplier and p.month.startswith(f"{month}-")
            ]
            if len(months) != 12 or len({p.unit for p in months}) != 1:
                return None
            return Production(
                supplier=supplier,
                month=f"{month}-12",
                quantity=sum(p.quantity for p in months),
                unit=months[0].unit,
            )
        return next((p for p in self.production if p.supplier == supplier and p.month == month), None)

    def reporting_for(self, supplier: str) -> Reporting | None:
        return next((r for r in self.reporting if r.supplier == supplier), None)

    def recipients_for(self, supplier: str, customer: str | None = None) -> list[str]:
        return [
            addr
            for r in self.recipients
            if r.supplier == supplier and r.customer == customer
            for addr in r.to
        ]


_SECTIONS: dict[str, type[_Entry]] = {
    "allocations": Allocation,
    "production": Production,
    "recipients": Recipients,
    "reporting": Reporting,
}


def load_statements_config(path: Path) -> StatementsConfig:
    """Parse and validate; raises ``ConfigError`` (a ``UserError``) naming the bad entry."""
    data = read_toml(path)
    for section, model in _SECTIONS.items():
        section_entries(data, path, section, model)  # first, for errors that name the entry
    cfg = validate(StatementsConfig, data, path, "top level")
    totals: dict[str, float] = defaultdict(float)
    seen: set[tuple[str, str]] = set()
    for a in cfg.allocations:
        if (a.supplier, a.customer) in seen:
            raise ConfigError(f"{path}: customer {a.customer!r} is allocated twice for {a.supplier!r}")
        seen.add((a.supplier, a.customer))
        totals[a.supplier] += a.share
    for supplier, total in totals.items():
        if total > 1 + 1e-9:
            raise ConfigError(f"{path}: allocation shares of {supplier!r} add up to {total:.4f} > 1")
    reporting = [r.supplier for r in cfg.reporting]
    if len(set(reporting)) != len(reporting):
        raise ConfigError(f"{path}: [[reporting]] is given twice for the same supplier")
    for r in cfg.recipients:
        if r.customer is not None and (r.supplier, r.customer) not in seen:
            raise ConfigError(
                f"{path}: recipients for customer {r.customer!r} of {r.supplier!r}, who has no allocation"
            )
    months = [(p.supplier, p.month) for p in cfg.production]
    if len(set(months)) != len(months):
        raise ConfigError(f"{path}: production is given twice for the same supplier and month")
    return cfg
