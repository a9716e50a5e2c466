"""The contractual instrument ledger (``config/instruments.toml``) and market-based Scope 2.

GHG Protocol Scope 2 Guidance (WRI/WBCSD 2015), chapter 7, Table 7.1 "Scope 2 Quality Criteria",
as applied here:

- criteria 1–2 (an instrument conveys the claim, and is the only one that does): every certificate
  (GEC, green-power trade, I-REC) carries its serial range; two instruments whose ranges overlap are
  refused at load, naming the file, the lines and both instruments. Claims are a ledger
  (``instrument_claims``: instrument, site, hour, kWh) and no instrument is ever claimed beyond its
  volume (a database trigger refuses it), across sites, months and customers;
- criterion 3 (tracked and retired on behalf of the reporting entity): certificates must name
  their retirement / cancellation evidence;
- criterion 4 (issued and redeemed as close as possible to the consumption): an instrument only
  covers consumption inside its generation period, and (``[rules]
  generation_within_reporting_year``, default on) that period must lie within one reporting year;
- criterion 5 (sourced from the same market): the site's grid region must lie within the
  instrument's ``market_boundary``, and kinds bound to one market (``[rules.boundaries]``, e.g.
  China GEC and green-power trade: ``CN``) must keep to it;
- criterion 8 / section 6.11 (residual mix): consumption no instrument covers gets the region's
  residual-mix factor (series ``residual-mix``); where none is published, the publisher's factor
  excluding market-traded non-fossil power (China MEE/NBS, series
  ``national-power-average-excl-market-nonfossil``); otherwise the location-based factor. Each
  hour records which (``site_market_1h.residual_basis``), and statements disclose it per site.

Allocation is deterministic: ``hourly`` instruments are matched hour by hour (volume spread evenly
over the period's hours, no banking) and go first; the others are retired against the uncovered
consumption in time order, ordered by (period start, id). A change to any hour can move every
claim of every instrument whose period is connected to it through overlapping periods, so a
recompute rebuilds that whole connected group (the fix-point hull of overlapping periods) from
scratch: the result is the full rebuild's, whatever order data arrives in.

Results go to ``site_market_1h`` and ``instrument_claims``, not to ``site_rollups_15m``, which stays
the measured activity.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo

import psycopg
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from compute.config import (
    SCOPE2_CARRIERS,
    Carrier,
    ConfigError,
    check_keys,
    read_toml,
    section_entries,
    validate,
)
from edge.wire import Ident

log = logging.getLogger("scopemeter.compute")

RESIDUAL_SERIES: Final = "residual-mix"
EXCL_NONFOSSIL_SERIES: Final = "national-power-average-excl-market-nonfossil"
# Fallbacks for uncovered consumption, best first: (basis recorded per hour, factor series).
FALLBACKS: Final = (("residual-mix", RESIDUAL_SERIES), ("excl-market-nonfossil", EXCL_NONFOSSIL_SERIES))
LOCATION_BASIS: Final = "location"
_HOUR: Final = timedelta(hours=1)

Kind = Literal["gec", "green-power-trade", "i-rec", "ppa", "green-tariff", "supplier-specific"]
# Tradable certificates (1 certificate = 1 MWh) with registry serials and retirement records.
CERTIFICATE_KINDS: Final = frozenset({"gec", "green-power-trade", "i-rec"})
Region = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2,8}(-[A-Z0-9]{1,8})*$")]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class Instrument(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    site: Ident
    kind: Kind
    carrier: Carrier = Carrier.ELECTRICITY
    certificates: Annotated[int, Field(gt=0)] | None = None  # 1 certificate = 1 MWh
    mwh: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    serial_prefix: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    serial_first: Annotated[int, Field(ge=0)] | None = None
    serial_last: Annotated[int, Field(ge=0)] | None = None
    period_start: date  # generation period, site-local, end exclusive
    period_end: date
    market_boundary: Region
    evidence: Text | None = None  # retirement / cancellation record
    kg_co2e_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    hourly: bool = False
    reference: Text

    @model_validator(mode="after")
    def _check(self) -> Instrument:
        if self.period_start >= self.period_end:
            raise ValueError(f"period_start {self.period_start} must be before period_end {self.period_end}")
        if self.carrier not in SCOPE2_CARRIERS:
            raise ValueError(f"instruments are for Scope 2 carriers, not {self.carrier.value}")
        if (self.certificates is None) == (self.mwh is None):
            raise ValueError("give exactly one of certificates (1 certificate = 1 MWh) or mwh")
        serials = (self.serial_prefix, self.serial_first, self.serial_last)
        if any(s is not None for s in serials) and any(s is None for s in serials):
            raise ValueError("give all of serial_prefix, serial_first and serial_last, or none")
        if self.kind in CERTIFICATE_KINDS:
            if self.certificates is None:
                raise ValueError(f"{self.kind} volumes are counted in certificates (1 certificate = 1 MWh)")
            if self.serial_first is None or self.serial_last is None:
                raise ValueError(
                    f"{self.kind} needs its serial range (serial_prefix, serial_first, serial_last)"
                )
            if self.serial_last - self.serial_first + 1 != self.certificates:
                raise ValueError(
                    f"serials {self.serial_first}..{self.serial_last} are "
                    f"{self.serial_last - self.serial_first + 1} certificates, not {self.certificates}"
                )
            if self.evidence is None:
                raise ValueError(f"{self.kind} needs its retirement evidence (evidence = ...)")
        return self

    @property
    def volume_mwh(self) -> float:
        return float(self.certificates) if self.certificates is not None else float(self.mwh or 0.0)


class Rules(BaseModel):
    """Boundary and vintage rules applied to every instrument (``[rules]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation_within_reporting_year: bool = True
    reporting_year_start_month: Annotated[int, Field(ge=1, le=12)] = 1
    # Kinds that are only valid in some markets: China's GEC and green-power trade on the China grid.
    boundaries: dict[Kind, list[Region]] = {"gec": ["CN"], "green-power-trade": ["CN"]}


@dataclass(frozen=True)
class Ledger:
    path: Path
    instruments: list[Instrument]
    rules: Rules
    lines: dict[str, int]  # instrument id → line of its [[instruments]] header

    def where(self, ident: str) -> str:
        return f"{self.path}:{self.lines.get(ident, 0)}"


_HEADER = re.compile(r"^\s*\[\[\s*instruments\s*\]\]")


def within(region: str, boundary: str) -> bool:
    """``CN-GD`` lies within ``CN``; ``GB`` does not."""
    return region == boundary or region.startswith(boundary + "-")


def reporting_year(d: date, start_month: int) -> int:
    return d.year if d.month >= start_month else d.year - 1


def rule_problems(i: Instrument, rules: Rules) -> list[str]:
    """Why ``i`` breaks a boundary or vintage rule on its own (criteria 4 and 5); empty if it does not."""
    out = []
    allowed = rules.boundaries.get(i.kind)
    if allowed is not None and not any(within(i.market_boundary, b) for b in allowed):
        out.append(
            f"{i.kind} is valid only within {', '.join(allowed)}, not market boundary {i.market_boundary}"
        )
    if rules.generation_within_reporting_year:
        m = rules.reporting_year_start_month
        last = i.period_end - timedelta(days=1)
        if reporting_year(i.period_start, m) != reporting_year(last, m):
            out.append(
                f"generation period {i.period_start}..{i.period_end} is not within one reporting year"
                f" (starting in month {m}); split it per year"
            )
    return out


def site_problem(i: Instrument, site_region: str) -> str | None:
    """Criterion 5 against the site: its grid region must lie within the instrument's market."""
    if not within(site_region, i.market_boundary):
        return (
            f"site {i.site!r} is on grid region {site_region}, outside the instrument's market boundary"
            f" {i.market_boundary}"
        )
    return None


def load_instruments(path: Path) -> Ledger:
    """Parse and check the file on its own (no database): fields, ids, serial overlaps, rules."""
    data = read_toml(path)
    check_keys(data, path, ["instruments", "rules"])
    items = section_entries(data, path, "instruments", Instrument)
    rules = validate(Rules, data.get("rules", {}), path, "[rules]")
    headers = [n for n, line in enumerate(path.read_text().splitlines(), 1) if _HEADER.match(line)]
    lines = {i.id: (headers[k] if k < len(headers) else 0) for k, i in enumerate(items)}
    ledger = Ledger(path, items, rules, lines)
    ids = [i.id for i in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{path}: duplicate instrument ids {dupes}")
    problems = [
        f"{ledger.where(i.id)}: instrument {i.id!r}: {p}" for i in items for p in rule_problems(i, rules)
    ]
    problems += overlapping_serials(ledger)
    if problems:
        raise ConfigError("\n".join(problems))
    return ledger


def overlapping_serials(ledger: Ledger) -> list[str]:
    """Pairs of instruments sharing a certificate serial (criterion 2: one claim per certificate)."""
    by_prefix: dict[str, list[Instrument]] = defaultdict(list)
    for i in ledger.instruments:
        if i.serial_prefix is not None:
            by_prefix[i.serial_prefix].append(i)
    out = []
    for prefix, group in sorted(by_prefix.items()):
        group.sort(key=lambda i: (i.serial_first or 0, i.id))
        for k, a in enumerate(group):
            for b in group[k + 1 :]:
                if (b.serial_first or 0) > (a.serial_last or 0):
                    break
                out.append(
                    f"{ledger.where(b.id)}: instrument {b.id!r} serials {prefix}"
                    f" {b.serial_first}..{b.serial_last}"
                    f" overlap instrument {a.id!r} ({ledger.where(a.id)}) {prefix}"
                    f" {a.serial_first}..{a.serial_last}: a certificate can be claimed once"
                )
    return out


@dataclass(frozen=True)
class ApplyResult:
    upserted: int
    retracted: list[str]  # instruments no longer in the file: deleted with their claims
    sites: list[str]  # sites whose market-based Scope 2 was re-allocated


def apply_instruments(conn: psycopg.Connection[Any], path: Path) -> ApplyResult:
    """Make the DB ledger equal the file: check each instrument against its site's grid region,
    upsert, retract the ones the file no longer lists, and re-allocate every affected site's claims,
    all in one transaction (nothing changes if any instrument is refused)."""
    from compute.recompute import lock_site  # compute.recompute imports this module

    ledger = load_instruments(path)
    with conn.transaction(), conn.cursor() as cur:
        regions = dict(cur.execute("SELECT site_id, grid_region FROM sites").fetchall())
        problems = []
        for i in ledger.instruments:
            if i.site not in regions:
                problems.append(
                    f"{ledger.where(i.id)}: instrument {i.id!r}: unknown site {i.site!r}"
                    " (apply the fleet first)"
                )
            elif (why := site_problem(i, regions[i.site])) is not None:
                problems.append(f"{ledger.where(i.id)}: instrument {i.id!r}: {why}")
        if problems:
            raise ConfigError("\n".join(problems))
        before = dict(cur.execute("SELECT instrument_id, site_id FROM contractual_instruments").fetchall())
        keep = {i.id for i in ledger.instruments}
        retracted = sorted(set(before) - keep)
        sites = sorted(set(before.values()) | {i.site for i in ledger.instruments})
        for site in sites:
            lock_site(cur, site)
        if retracted:
            cur.execute("DELETE FROM contractual_instruments WHERE instrument_id = ANY(%s)", (retracted,))
        for i in ledger.instruments:
            cur.execute(
                "INSERT INTO contractual_instruments (instrument_id, site_id, kind, carrier, mwh,"
                " period_start, period_end, kg_co2e_per_kwh, hourly, reference, serial_prefix,"
                " serial_first, serial_last, market_boundary, evidence)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (instrument_id) DO UPDATE SET site_id = EXCLUDED.site_id, kind = EXCLUDED.kind,"
                " carrier = EXCLUDED.carrier, mwh = EXCLUDED.mwh, period_start = EXCLUDED.period_start,"
                " period_end = EXCLUDED.period_end, kg_co2e_per_kwh = EXCLUDED.kg_co2e_per_kwh,"
                " hourly = EXCLUDED.hourly, reference = EXCLUDED.reference,"
                " serial_prefix = EXCLUDED.serial_prefix, serial_first = EXCLUDED.serial_first,"
                " serial_last = EXCLUDED.serial_last, market_boundary = EXCLUDED.market_boundary,"
                " evidence = EXCLUDED.evidence",
                (
                    i.id,
                    i.site,
                    i.kind,
                    i.carrier.value,
                    i.volume_mwh,
                    i.period_start,
                    i.period_end,
                    i.kg_co2e_per_kwh,
                    i.hourly,
                    i.reference,
                    i.serial_prefix,
                    i.serial_first,
                    i.serial_last,
                    i.market_boundary,
                    i.evidence or "",
                ),
            )
        rebuild_market(cur, sites)
    return ApplyResult(len(ledger.instruments), retracted, sites)


def rebuild_market(cur: psycopg.Cursor[Any], sites: Iterable[str] | None = None) -> int:
    """Re-allocate ``sites`` (default: all) over everything they have, from scratch, set-based
    (``recompute_market_set``). The caller holds the site locks (or a table lock) inside its
    transaction. All sites (the full rebuild): both tables are emptied by TRUNCATE and bulk-loaded
    (``compute.rebuild.bulk_load``). Returns the hours written."""
    from compute.rebuild import bulk_load  # compute.rebuild imports this module

    whole = sites is None
    chosen = sorted(sites) if sites is not None else []
    if whole:
        chosen = [r[0] for r in cur.execute("SELECT site_id FROM sites ORDER BY 1").fetchall()]
        cur.execute("TRUNCATE site_market_1h, instrument_claims")
    else:
        cur.execute("DELETE FROM instrument_claims WHERE site_id = ANY(%s)", (chosen,))
        cur.execute("DELETE FROM site_market_1h WHERE site_id = ANY(%s)", (chosen,))
    spans = cur.execute(  # two primary-key descents per site, not a scan of its rollups
        "SELECT s, (SELECT min(bucket) FROM site_rollups_15m WHERE site_id = s AND scope = 2"
        " AND method = 'location'), (SELECT max(bucket) FROM site_rollups_15m WHERE site_id = s"
        " AND scope = 2 AND method = 'location') FROM unnest(%s::text[]) AS s",
        (chosen,),
    ).fetchall()
    ranges = [(s, b0, b1 + timedelta(minutes=15)) for s, b0, b1 in spans if b0 is not None]
    with (
        bulk_load(cur, "site_market_1h") if whole else nullcontext(),
        bulk_load(cur, "instrument_claims") if whole else nullcontext(),
    ):
        return recompute_market_set(cur, ranges)


@dataclass
class _Hour:
    kwh: float
    location_kg: float | None
    location_factor: str | None
    claimed: float = 0.0
    instrument_kg: float = 0.0
    claims: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Inst:
    id: str
    carrier: str
    kwh: float
    kg_per_kwh: float
    hourly: bool
    p0: datetime
    p1: datetime


def _local_midnight(d: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(d, time(), tzinfo=tz)


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(t: datetime) -> datetime:
    f = _floor_hour(t)
    return f if f == t else f + _HOUR


def connected_hull(insts: list[_Inst], h0: datetime, h1: datetime) -> tuple[datetime, datetime]:
    """Grow ``[h0, h1)`` until no instrument period overlaps it only partly: every instrument that
    can claim an hour inside then lies wholly inside, so re-allocating the hull alone is exact."""
    changed = True
    while changed:
        changed = False
        for i in insts:
            if i.p0 < h1 and h0 < i.p1 and (i.p0 < h0 or i.p1 > h1):
                h0, h1 = min(h0, _floor_hour(i.p0)), max(h1, _ceil_hour(i.p1))
                changed = True
    return h0, h1


def allocate(hours: dict[tuple[str, datetime], _Hour], insts: list[_Inst]) -> None:
    """Claims in place: hourly instruments first, then the others in time order (see module doc)."""
    for i in insts:
        in_period = sorted(k for k in hours if k[0] == i.carrier and i.p0 <= k[1] < i.p1)
        left = i.kwh
        per_hour = i.kwh / ((i.p1 - i.p0) / _HOUR)
        for key in in_period:
            if left <= 0:
                break
            h = hours[key]
            take = min(h.kwh - h.claimed, per_hour if i.hourly else left, left)
            if take <= 0:
                continue
            h.claimed += take
            h.instrument_kg += take * i.kg_per_kwh
            h.claims.append((i.id, take))
            left -= take


# Per-call staging (emptied at each call and at commit): the hours to rebuild per site, their
# location-based sums, the instruments' claims on them and the fallback factor per region,
# carrier and site-local day.
_TEMP_DDL: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS market_ranges (site_id text, h0 timestamptz, h1 timestamptz)"
    " ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS market_hours (site_id text, carrier text, bucket timestamptz, day date,"
    " region text, kwh float8, location_kg float8, location_factor text) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS market_claimed (site_id text, carrier text, bucket timestamptz,"
    " claimed float8, instrument_kg float8, instrument_ids text[]) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS market_fallbacks (region text, carrier text, day date, basis text,"
    " factor_id text, kg float8) ON COMMIT DELETE ROWS",
)
# Location-based Scope 2 per site, carrier and hour: the quarter hours summed in time order.
_STAGE_HOURS = """
INSERT INTO market_hours
SELECT r.site_id, r.carrier, date_trunc('hour', r.bucket) AS h,
       (date_trunc('hour', r.bucket) AT TIME ZONE s.timezone)::date, s.grid_region,
       sum(r.kwh ORDER BY r.bucket),
       CASE WHEN count(*) = count(r.kg_co2e) THEN sum(r.kg_co2e ORDER BY r.bucket) END, min(r.factor_id)
FROM market_ranges w
JOIN site_rollups_15m r ON r.site_id = w.site_id AND r.bucket >= w.h0 AND r.bucket < w.h1
 AND r.scope = 2 AND r.method = 'location'
JOIN sites s ON s.site_id = w.site_id
GROUP BY 1, 2, 3, 4, 5
"""
# The fallback for uncovered consumption (``FALLBACKS``, best first; each for the region, then its
# country), once per (region, carrier, site-local day): disclosure-grade factors only, as
# compute.recompute.FACTOR_LOOKUP, newest vintage, then the highest revision, valid on that day.
_STAGE_FALLBACKS = """
INSERT INTO market_fallbacks
SELECT d.region, d.carrier, d.day, f.basis, f.factor_id, f.kg
FROM (SELECT DISTINCT region, carrier, day FROM market_hours) d
JOIN LATERAL (
    SELECT b.basis, ef.factor_id, ef.kg_co2e_per_unit AS kg
    FROM unnest(%(bases)s::text[], %(series)s::text[]) WITH ORDINALITY AS b(basis, series, rank)
    JOIN emission_factors ef ON ef.series = b.series
    WHERE ef.region IN (d.region, split_part(d.region, '-', 1)) AND ef.carrier = d.carrier AND ef.unit = 'kWh'
      AND ef.gases IS NOT NULL AND ef.data_year IS NOT NULL AND ef.valid_from <= d.day AND d.day < ef.valid_to
    ORDER BY b.rank, (ef.region = d.region) DESC, ef.data_year DESC, ef.version DESC, ef.factor_id
    LIMIT 1
) f ON true
"""
# Every hour at once: instruments' claims first, the fallback factor for the rest; where there is
# none, the location-based emissions of the rest; else unknown (NULL) unless nothing is left.
# ``rest`` is max(0, kWh - claimed) exactly as Python's ``max(0.0, x)`` (0 unless x > 0).
_INSERT_HOURS = """
INSERT INTO site_market_1h (site_id, bucket, carrier, kwh, kwh_instruments, kg_co2e, residual_factor_id,
                            instrument_ids, residual_basis)
SELECT h.site_id, h.bucket, h.carrier, h.kwh, coalesce(c.claimed, 0),
       CASE WHEN f.factor_id IS NOT NULL THEN coalesce(c.instrument_kg, 0) + x.rest * f.kg
            WHEN h.location_kg IS NOT NULL AND h.kwh > 0
                THEN coalesce(c.instrument_kg, 0) + h.location_kg * (x.rest / h.kwh)
            WHEN x.rest <= 0 THEN coalesce(c.instrument_kg, 0) END,
       CASE WHEN f.factor_id IS NOT NULL THEN f.factor_id
            WHEN h.location_kg IS NOT NULL AND h.kwh > 0 THEN h.location_factor END,
       coalesce(c.instrument_ids, '{}'),
       CASE WHEN f.factor_id IS NOT NULL THEN f.basis
            WHEN h.location_kg IS NOT NULL AND h.kwh > 0 THEN %(location)s END
FROM market_hours h
LEFT JOIN market_claimed c ON c.site_id = h.site_id AND c.carrier = h.carrier AND c.bucket = h.bucket
LEFT JOIN market_fallbacks f ON f.region = h.region AND f.carrier = h.carrier AND f.day = h.day
CROSS JOIN LATERAL (SELECT CASE WHEN h.kwh - coalesce(c.claimed, 0) > 0
                                THEN h.kwh - coalesce(c.claimed, 0) ELSE 0::float8 END AS rest) x
"""
_RANGES = "unnest(%s::text[], %s::timestamptz[], %s::timestamptz[]) AS w(site_id, h0, h1)"


def _instruments(cur: psycopg.Cursor[Any], sites: list[str]) -> dict[str, tuple[ZoneInfo, list[_Inst]]]:
    """Per site: its time zone and the instruments that may claim its hours, in allocation order
    (hourly first, then by period start and id). One query each for sites and instruments."""
    info = {
        site: (ZoneInfo(tz), region)
        for site, tz, region in cur.execute(
            "SELECT site_id, timezone, grid_region FROM sites WHERE site_id = ANY(%s)", (sites,)
        ).fetchall()
    }
    out: dict[str, tuple[ZoneInfo, list[_Inst]]] = {site: (tz, []) for site, (tz, _) in info.items()}
    for site, iid, carrier, mwh, p0, p1, kg, hourly, boundary in cur.execute(
        "SELECT site_id, instrument_id, carrier, mwh, period_start, period_end, kg_co2e_per_kwh, hourly,"
        " market_boundary FROM contractual_instruments WHERE site_id = ANY(%s)"
        " ORDER BY site_id, hourly DESC, period_start, instrument_id",
        (sites,),
    ).fetchall():
        tz, region = info[site]
        if boundary and not within(region, boundary):  # the site moved grid region since it was applied
            log.warning(
                "instrument %s: site %s is on %s, outside market boundary %s: no claims",
                iid,
                site,
                region,
                boundary,
            )
            continue
        out[site][1].append(
            _Inst(iid, carrier, mwh * 1000.0, kg, hourly, _local_midnight(p0, tz), _local_midnight(p1, tz))
        )
    return out


def recompute_market_set(cur: psycopg.Cursor[Any], ranges: list[tuple[str, datetime, datetime]]) -> int:
    """Rebuild ``site_market_1h`` and ``instrument_claims`` for the connected hull of each
    ``(site, b0, b1)``, every site at once: one query each for sites, instruments and hourly sums,
    one DELETE per table, and one INSERT of every hour; only the sites with instruments have their
    hours fetched, for the claims (``allocate``, whose greedy order is sequential by nature). Call
    inside the recompute transaction (the site locks are held). Returns the hours written."""
    if not ranges:
        return 0
    for ddl in _TEMP_DDL:
        cur.execute(ddl)
    cur.execute("TRUNCATE market_ranges, market_hours, market_claimed, market_fallbacks")
    sites = _instruments(cur, sorted({r[0] for r in ranges}))
    hulls: list[tuple[str, datetime, datetime]] = []
    for site, b0, b1 in ranges:
        if site in sites:
            hulls.append((site, *connected_hull(sites[site][1], _floor_hour(b0), _ceil_hour(b1))))
    if not hulls:
        return 0
    args = ([h[0] for h in hulls], [h[1] for h in hulls], [h[2] for h in hulls])
    cur.execute(
        "DELETE FROM instrument_claims c USING " + _RANGES + " WHERE c.site_id = w.site_id"
        " AND c.bucket >= w.h0 AND c.bucket < w.h1",
        args,
    )
    cur.execute(
        "DELETE FROM site_market_1h m USING " + _RANGES + " WHERE m.site_id = w.site_id"
        " AND m.bucket >= w.h0 AND m.bucket < w.h1",
        args,
    )
    cur.execute("INSERT INTO market_ranges SELECT * FROM " + _RANGES, args)
    cur.execute(_STAGE_HOURS)
    claiming = sorted(site for site, (_, insts) in sites.items() if insts)
    hours: dict[str, dict[tuple[str, datetime], _Hour]] = defaultdict(dict)
    if claiming:
        for site, carrier, bucket, kwh in cur.execute(
            "SELECT site_id, carrier, bucket, kwh FROM market_hours WHERE site_id = ANY(%s)", (claiming,)
        ).fetchall():
            hours[site][(carrier, bucket)] = _Hour(kwh, None, None)
    claimed, claims = [], []
    for site in claiming:
        allocate(hours[site], sites[site][1])
        for (carrier, bucket), h in sorted(hours[site].items()):
            if h.claims:
                claimed.append((site, carrier, bucket, h.claimed, h.instrument_kg, [c[0] for c in h.claims]))
                claims += [(iid, site, carrier, bucket, kwh) for iid, kwh in h.claims]
    if claimed:
        with cur.copy("COPY market_claimed FROM STDIN") as cp:
            for row in claimed:
                cp.write_row(row)
        with cur.copy(
            "COPY instrument_claims (instrument_id, site_id, carrier, bucket, kwh) FROM STDIN"
        ) as cp:
            for c in claims:
                cp.write_row(c)
    cur.execute("ANALYZE market_hours")
    cur.execute(_STAGE_FALLBACKS, {"bases": [f[0] for f in FALLBACKS], "series": [f[1] for f in FALLBACKS]})
    cur.execute(_INSERT_HOURS, {"location": LOCATION_BASIS})
    return cur.rowcount
