"""Contractual instruments (``config/instruments.toml``) and market-based Scope 2 per site and hour.

GHG Protocol Scope 2 market-based: consumption covered by contractual instruments (China GEC —
1 certificate = 1 MWh —, I-REC, PPAs, green tariffs) gets the instrument's factor (0 for
renewables); the rest gets the region's residual-mix factor (series ``residual-mix``) or, where
none is published (China, the UK today), the location-based factor — so market equals location
where a site has no instruments.

Allocation is deterministic from the location rollups, so a recompute always gives the same
numbers: instruments with ``hourly = true`` are matched hour by hour (volume spread evenly over the
period's hours, no banking) and go first; the others are retired against the uncovered
consumption in time order within their period, ordered by (period start, id).

Results go to ``site_market_1h``, not to ``site_rollups_15m``: allocation is over an instrument's
period and hours, and ``site_rollups_15m`` stays the measured activity (summing it never counts the
same kWh twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo

import psycopg
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compute.config import SCOPE2_CARRIERS, Carrier, ConfigError, check_keys, read_toml, section_entries
from edge.wire import Ident

RESIDUAL_SERIES: Final = "residual-mix"
_HOUR: Final = timedelta(hours=1)


class Instrument(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    site: Ident
    kind: Literal["gec", "i-rec", "ppa", "green-tariff"]
    carrier: Carrier = Carrier.ELECTRICITY
    certificates: Annotated[int, Field(gt=0)] | None = None  # GEC / I-REC: 1 certificate = 1 MWh
    mwh: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    period_start: date  # site-local, end exclusive
    period_end: date
    kg_co2e_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    hourly: bool = False
    reference: Annotated[str, Field(min_length=1, max_length=500)]

    @model_validator(mode="after")
    def _check(self) -> Instrument:
        if self.period_start >= self.period_end:
            raise ValueError(f"period_start {self.period_start} must be before period_end {self.period_end}")
        if self.carrier not in SCOPE2_CARRIERS:
            raise ValueError(f"instruments are for Scope 2 carriers, not {self.carrier.value}")
        if (self.certificates is None) == (self.mwh is None):
            raise ValueError("give exactly one of certificates (1 certificate = 1 MWh) or mwh")
        if self.kind in ("gec", "i-rec") and self.certificates is None:
            raise ValueError(f"{self.kind} volumes are counted in certificates (1 certificate = 1 MWh)")
        return self

    @property
    def volume_mwh(self) -> float:
        return float(self.certificates) if self.certificates is not None else float(self.mwh or 0.0)


def load_instruments(path: Path) -> list[Instrument]:
    data = read_toml(path)
    check_keys(data, path, ["instruments"])
    items = section_entries(data, path, "instruments", Instrument)
    ids = [i.id for i in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{path}: duplicate instrument ids {dupes}")
    return items


def apply_instruments(conn: psycopg.Connection[Any], path: Path) -> int:
    """Validate and upsert; returns how many rows were written. Run ``compute rebuild`` after."""
    items = load_instruments(path)
    with conn.transaction(), conn.cursor() as cur:
        sites = {r[0] for r in cur.execute("SELECT site_id FROM sites").fetchall()}
        for i in items:
            if i.site not in sites:
                raise ConfigError(
                    f"{path}: instrument {i.id!r}: unknown site {i.site!r} (apply the fleet first)"
                )
            cur.execute(
                "INSERT INTO contractual_instruments (instrument_id, site_id, kind, carrier, mwh,"
                " period_start, period_end, kg_co2e_per_kwh, hourly, reference)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (instrument_id) DO UPDATE SET site_id = EXCLUDED.site_id, kind = EXCLUDED.kind,"
                " carrier = EXCLUDED.carrier, mwh = EXCLUDED.mwh, period_start = EXCLUDED.period_start,"
                " period_end = EXCLUDED.period_end, kg_co2e_per_kwh = EXCLUDED.kg_co2e_per_kwh,"
                " hourly = EXCLUDED.hourly, reference = EXCLUDED.reference",
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
                ),
            )
    return len(items)


@dataclass
class _Hour:
    kwh: float
    location_kg: float | None
    location_factor: str | None
    claimed: float = 0.0
    instrument_kg: float = 0.0
    ids: tuple[str, ...] = ()


def _local_midnight(d: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(d, time(), tzinfo=tz)


def recompute_market(cur: psycopg.Cursor[Any], site: str, b0: datetime, b1: datetime) -> int:
    """Rebuild ``site_market_1h`` for every hour a change in ``[b0, b1)`` can affect: the hours of
    the range and the whole periods of the site's instruments overlapping it. Call inside the
    recompute transaction (the site lock is held). Returns the rows written."""
    row = cur.execute("SELECT timezone, grid_region FROM sites WHERE site_id = %s", (site,)).fetchone()
    if row is None:
        return 0
    tz, region = ZoneInfo(row[0]), row[1]
    h0 = b0.replace(minute=0, second=0, microsecond=0)
    h1 = b1 if b1 == b1.replace(minute=0, second=0, microsecond=0) else b1.replace(minute=0) + _HOUR
    inst = cur.execute(
        "SELECT instrument_id, carrier, mwh, period_start, period_end, kg_co2e_per_kwh, hourly"
        " FROM contractual_instruments WHERE site_id = %s ORDER BY hourly DESC, period_start, instrument_id",
        (site,),
    ).fetchall()
    periods = [(_local_midnight(i[3], tz), _local_midnight(i[4], tz)) for i in inst]
    for p0, p1 in periods:
        if p0 < h1 and h0 < p1:
            h0, h1 = min(h0, p0), max(h1, p1)
    hours: dict[tuple[str, datetime], _Hour] = {}
    for carrier, bucket, kwh, kg, factor in cur.execute(
        "SELECT carrier, date_trunc('hour', bucket), sum(kwh ORDER BY bucket), sum(kg_co2e ORDER BY bucket),"
        " min(factor_id) FROM site_rollups_15m WHERE site_id = %s AND scope = 2 AND method = 'location'"
        " AND bucket >= %s AND bucket < %s GROUP BY 1, 2 ORDER BY 1, 2",
        (site, h0, h1),
    ).fetchall():
        hours[(carrier, bucket)] = _Hour(kwh, kg, factor)
    for (iid, carrier, mwh, *_rest, kg_per_kwh, hourly), (p0, p1) in zip(inst, periods, strict=True):
        in_period = sorted(k for k in hours if k[0] == carrier and p0 <= k[1] < p1)
        if not in_period:
            continue
        left = mwh * 1000.0
        per_hour = left / ((p1 - p0) / _HOUR)
        for key in in_period:
            h = hours[key]
            take = min(h.kwh - h.claimed, per_hour if hourly else left)
            if take <= 0:
                continue
            h.claimed += take
            h.instrument_kg += take * kg_per_kwh
            h.ids = (*h.ids, iid)
            left -= take
            if not hourly and left <= 0:
                break
    cur.execute(
        "DELETE FROM site_market_1h WHERE site_id = %s AND bucket >= %s AND bucket < %s", (site, h0, h1)
    )
    rows = []
    for (carrier, bucket), h in sorted(hours.items()):
        rest = h.kwh - h.claimed
        residual = cur.execute(
            "SELECT factor_id, kg_co2e_per_unit FROM emission_factors WHERE series = %s AND region = %s"
            " AND carrier = %s AND unit = 'kWh' AND valid_from <= (%s AT TIME ZONE %s)::date"
            " AND (%s AT TIME ZONE %s)::date < valid_to ORDER BY version DESC, factor_id LIMIT 1",
            (RESIDUAL_SERIES, region, carrier, bucket, str(tz), bucket, str(tz)),
        ).fetchone()
        if residual is not None:
            factor, kg = residual[0], h.instrument_kg + rest * residual[1]
        elif h.location_kg is not None and h.kwh > 0:
            factor, kg = h.location_factor, h.instrument_kg + h.location_kg * (rest / h.kwh)
        elif rest <= 0:
            factor, kg = None, h.instrument_kg
        else:
            factor, kg = None, None
        rows.append((site, bucket, carrier, h.kwh, h.claimed, kg, factor, list(h.ids)))
    cur.executemany(
        "INSERT INTO site_market_1h (site_id, bucket, carrier, kwh, kwh_instruments, kg_co2e,"
        " residual_factor_id, instrument_ids) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        rows,
    )
    return len(rows)
