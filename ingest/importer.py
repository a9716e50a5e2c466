"""``scopemeter import FILE``: meter-data exports (interval energy or register reads) into ``readings``.

Where the rows go, and why there: **straight into PostgreSQL through the writer's own
``ReadingStore``**, not through Kafka. An import is a person running a command on a file they
still hold: the file is the durable copy, so nothing can be lost — a crash leaves some chunks
committed, and running the command again stores the rest and finds the committed ones as
duplicates (same identity, same values). Writing directly is also what lets the summary say
exactly how many readings were stored and how many were already there (``INSERT … ON CONFLICT DO
NOTHING`` counts them); through Kafka the command could only say "sent". After its commits the
import publishes the dirty ranges to ``readings.committed.v1``, exactly as the writer does, so the
compute worker treats imported readings like edge data (or run ``scopemeter compute rebuild``).

The checks are the bridge's: every meter must be in the fleet registry (its site comes from there;
``--site`` must agree), every reading passes the wire contract (``edge.wire.Reading``: identifiers,
quantity, timestamp window [2000, 2100), finite value). The live window
(``ingest.max_age_s``/``max_future_s``) is not applied: an import is explicit, and backfilling
years is its purpose. A row that fails is rejected with its file, line and reason; the rest go in.

Identity and provenance: readings have the edge's identity ``(meter_id, quantity, ts)``;
``gateway_id`` is ``import-<first 16 hex of the file's SHA-256>`` and ``batch_seq`` the file line
the reading came from, so every imported reading names its source file and line.

Interval energy (kWh per interval) becomes a cumulative counter, as compute expects: an opening
reading at the first interval's start, then one reading at every interval end. The opening value
is the meter's stored counter at that instant (so re-importing, or importing the next month's file,
continues the same counter), else its last stored reading before it, else ``--opening`` (0).
A gap between intervals gets a reading at the next interval's start with an unchanged counter, so
compute sees a gap (no energy, flagged as such), never energy spread over it.

Local time: stamps without an offset are in the mapping's ``timezone``, else ``--timezone``, else
the meter's site's zone. ``24:00`` is midnight of the next day. A wall time that occurs twice (the
hour clocks go back) is read in file order: the first occurrence before the change, a repeat after
it. A wall time that does not exist (the hour clocks skip) is rejected. Wide layouts (one row per
meter and day, one column per period, e.g. UK half-hourly HH01..HH50) count periods in elapsed
time from local midnight, so a clock-change day has 46 or 50 half hours (92 or 100 quarter hours).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from compute.config import read_toml, validate
from edge.wire import COUNTER_QUANTITIES, Quantity, Reading
from ingest.admit import Registry, load_registry
from ingest.events import DirtyBatch, DirtyRange
from ingest.writer import ReadingStore, Row
from ops.errors import UserError
from ops.settings import REPO_ROOT, KafkaSettings

PRESETS_DIR = REPO_ROOT / "config" / "import"
CHUNK_ROWS = 5_000  # readings per DB transaction
_MIDNIGHT_24 = re.compile(r"^24:00(:00)?$")


class RejectReason(StrEnum):
    """Why a file row was not imported (each shown with its file and line)."""

    MISSING_FIELD = "missing_field"  # a mapped column is absent or empty
    BAD_TIME = "bad_time"  # a date/time the mapping's formats do not parse
    NONEXISTENT_LOCAL_TIME = "nonexistent_local_time"  # in the hour the clocks skip
    BAD_VALUE = "bad_value"  # not a finite number, or negative energy
    BAD_UNIT = "bad_unit"  # a unit the mapping does not know
    BAD_PERIOD = "bad_period"  # a wide-layout period beyond the end of its day
    UNREGISTERED_METER = "unregistered_meter"  # not in the fleet registry (`scopemeter fleet apply`)
    METER_SITE_MISMATCH = "meter_site_mismatch"  # registered to another site than --site
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # same meter and time twice, different values
    OVERLAPPING_INTERVAL = "overlapping_interval"  # starts before the previous interval ends
    COUNTER_CONFLICT = "counter_conflict"  # the built counter would not meet the meter's later stored one
    SCHEMA = "schema"  # fails the wire contract (identifier, timestamp window, value)


def _codec(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r}") from None
    return name


class Mapping(BaseModel):
    """How one CSV layout maps to readings (a preset in ``config/import/`` or ``--mapping FILE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    source: str = ""  # where the layout was checked (documentation, real exports)
    layout: Literal["long", "wide"] = "long"
    kind: Literal["interval", "register"] = "interval"
    stamp: Literal["start", "end"] = "end"  # which end of the interval a long row's time names
    interval_minutes: Annotated[int, Field(gt=0, le=1440)] | None = None
    quantity: Quantity = Quantity.ENERGY_IMPORT_KWH
    timezone: str | None = None  # default: --timezone, else the meter's site
    delimiter: Annotated[str, Field(min_length=1, max_length=1)] = ","
    encoding: Annotated[str, AfterValidator(_codec)] = "utf-8-sig"  # BOM skipped; Europe: often cp1252
    header_starts_with: str | None = None  # skip preamble lines until the header line starts so
    meter_column: str | None = None  # default: --meter
    datetime_column: str | None = None
    date_column: str | None = None
    time_column: str | None = None
    datetime_formats: list[str] = ["%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]
    date_formats: list[str] = ["%Y-%m-%d"]
    time_formats: list[str] = ["%H:%M", "%H:%M:%S"]
    # The interval's last minute (Green Button's END TIME 00:14): the interval ends a minute later.
    end_time_column: str | None = None
    value_column: str | list[str] | None = None  # a list: the first present in the header
    value_scale: float = 1.0
    unit_column: str | None = None
    units: dict[str, float] = {"kWh": 1.0}  # unit cell → factor to the quantity's unit
    row_filter: dict[str, str] = {}  # only rows whose column equals this value
    period_pattern: str = r"^HH(\d{1,2})$"  # wide layout: period columns; group 1 = period number


def load_mapping(preset: str | None, mapping_file: Path | None) -> Mapping:
    if mapping_file is not None:
        path = mapping_file
    else:
        path = PRESETS_DIR / f"{preset or 'interval-end'}.toml"
        if not path.exists():
            names = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
            raise UserError(f"unknown import preset {preset!r}; presets: {', '.join(names)}")
    return validate(Mapping, read_toml(path), path, "import mapping")


def presets() -> dict[str, str]:
    """Preset name → description."""
    return {p.stem: str(read_toml(p).get("description", "")) for p in sorted(PRESETS_DIR.glob("*.toml"))}


@dataclass(frozen=True)
class Rejection:
    line: int
    reason: RejectReason
    detail: str


@dataclass
class ImportResult:
    path: Path
    sha256: str
    rows_read: int = 0
    rows_imported: int = 0
    readings_offered: int = 0
    readings_stored: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    dirty: list[DirtyRange] = field(default_factory=list)
    meters: dict[str, int] = field(default_factory=dict)  # meter → readings offered

    @property
    def readings_duplicate(self) -> int:
        return self.readings_offered - self.readings_stored

    def rejected_by_reason(self) -> Counter[str]:
        return Counter(r.reason.value for r in self.rejections)


@dataclass(frozen=True)
class _Point:
    """One parsed row value: an interval [start, end) of energy, or a register read at ``end``."""

    meter: str
    start: datetime | None
    end: datetime
    value: float
    line: int


class _RowError(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"unknown IANA timezone {name!r}") from None


def local_instant(naive: datetime, tz: ZoneInfo, previous: datetime | None) -> datetime:
    """The UTC instant of a wall time. Twice-occurring wall times are read in order: the later
    offset when the earlier one would not move past ``previous`` (the same meter's last instant)."""
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) != naive:
        raise _RowError(
            RejectReason.NONEXISTENT_LOCAL_TIME, f"{naive:%Y-%m-%d %H:%M} does not exist in {tz.key}"
        )
    if first != second and previous is not None and first <= previous:
        return second
    return first


def _parse(text: str, formats: Sequence[str], what: str) -> datetime:
    for fmt in formats:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    raise _RowError(RejectReason.BAD_TIME, f"{what} {text!r} matches none of {list(formats)}")


def _wall_time(row: dict[str, str], m: Mapping, time_col: str | None) -> datetime:
    """A naive wall time (or an aware one when the cell carries an offset); 24:00 is next midnight."""
    if m.datetime_column is not None and time_col is None:
        text = _cell(row, m.datetime_column)
        head, _, tail = text.rpartition(" ")
        if head and _MIDNIGHT_24.match(tail):
            return _parse(head, m.date_formats, "date") + timedelta(days=1)
        try:
            return (
                datetime.fromisoformat(text)
                if "T" in text or "+" in text
                else _parse(text, m.datetime_formats, "date-time")
            )
        except ValueError:
            raise _RowError(RejectReason.BAD_TIME, f"date-time {text!r} is not ISO 8601") from None
    if m.date_column is None or time_col is None:
        raise UserError("the mapping needs datetime_column, or date_column and time_column")
    day = _parse(_cell(row, m.date_column), m.date_formats, "date")
    clock = _cell(row, time_col)
    if _MIDNIGHT_24.match(clock):
        return day + timedelta(days=1)
    t = _parse(clock, m.time_formats, "time")
    return datetime.combine(day.date(), time(t.hour, t.minute, t.second))


def _cell(row: dict[str, str], column: str) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise _RowError(RejectReason.MISSING_FIELD, f"column {column!r} is empty or missing")
    return value


def _number(text: str, scale: float, column: str) -> float:
    try:
        v = float(text.replace("\u00a0", "").replace(" ", "")) * scale
    except ValueError:
        raise _RowError(RejectReason.BAD_VALUE, f"{column} {text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise _RowError(RejectReason.BAD_VALUE, f"{column} {text!r} is not a finite number >= 0")
    return v


class _Reader:
    """Turns CSV rows into points, one meter at a time keeping its last instant (for DST folds)."""

    def __init__(self, m: Mapping, registry: Registry, meter: str | None, tz: str | None, site: str | None):
        self.m = m
        self.registry = registry
        self.meter = meter
        self.tz_override = _zone(tz) if tz else (_zone(m.timezone) if m.timezone else None)
        self.site = site
        self.last: dict[str, datetime] = {}
        self.interval = timedelta(minutes=m.interval_minutes) if m.interval_minutes else None
        if m.kind == "interval" and self.interval is None and m.end_time_column is None:
            raise UserError("interval data needs interval_minutes (or --interval-minutes) or end_time_column")
        if m.layout == "wide" and self.interval is None:
            raise UserError("a wide layout needs interval_minutes (or --interval-minutes)")

    def meter_of(self, row: dict[str, str]) -> str:
        if self.m.meter_column is not None:
            return _cell(row, self.m.meter_column)
        if self.meter is None:
            raise UserError("the mapping has no meter_column: name the meter with --meter")
        return self.meter

    def zone_for(self, meter: str) -> ZoneInfo:
        home = self.registry.meters.get(meter)
        if home is None:
            raise _RowError(RejectReason.UNREGISTERED_METER, f"meter {meter!r} is not in the fleet registry")
        if self.site is not None and home.site != self.site:
            raise _RowError(
                RejectReason.METER_SITE_MISMATCH, f"meter {meter!r} is registered to site {home.site!r}"
            )
        if self.tz_override is not None:
            return self.tz_override
        return _zone(self.registry.site_tz.get(home.site, "UTC"))

    def instant(self, meter: str, wall: datetime) -> datetime:
        if wall.tzinfo is not None:
            return wall.astimezone(UTC)
        return local_instant(wall, self.zone_for(meter), self.last.get(meter))

    def value(self, row: dict[str, str], column: str) -> float:
        scale = self.m.value_scale
        if self.m.unit_column is not None and self.m.unit_column in row:  # PG&E omits UNITS
            unit = _cell(row, self.m.unit_column)
            if unit not in self.m.units:
                raise _RowError(RejectReason.BAD_UNIT, f"unit {unit!r} is not one of {sorted(self.m.units)}")
            scale *= self.m.units[unit]
        return _number(_cell(row, column), scale, column)

    def long_points(self, row: dict[str, str], line: int, value_col: str) -> list[_Point]:
        m = self.m
        meter = self.meter_of(row)
        self.zone_for(meter)  # registry checks first: they name the real problem
        stamp = self.instant(meter, _wall_time(row, m, m.time_column))
        value = self.value(row, value_col)
        self.last[meter] = stamp
        if m.kind == "register":
            return [_Point(meter, None, stamp, value, line)]
        if m.stamp == "end":
            assert self.interval is not None
            return [_Point(meter, stamp - self.interval, stamp, value, line)]
        if m.end_time_column is not None:
            last_minute = self.instant(meter, _wall_time(row, m, m.end_time_column))
            end = last_minute + timedelta(minutes=1)
        else:
            assert self.interval is not None
            end = stamp + self.interval
        return [_Point(meter, stamp, end, value, line)]

    def wide_points(self, row: dict[str, str], line: int, periods: list[tuple[int, str]]) -> list[_Point]:
        m = self.m
        assert self.interval is not None and m.date_column is not None
        meter = self.meter_of(row)
        tz = self.zone_for(meter)
        day = _parse(_cell(row, m.date_column), m.date_formats, "date").date()
        midnight = local_instant(datetime.combine(day, time()), tz, None)
        next_midnight = local_instant(datetime.combine(day + timedelta(days=1), time()), tz, None)
        points = []
        for n, column in periods:
            text = (row.get(column) or "").strip()
            if not text:
                continue
            start = midnight + (n - 1) * self.interval
            if start + self.interval > next_midnight:
                raise _RowError(
                    RejectReason.BAD_PERIOD,
                    f"{column} = {text!r}, but {day} has only {(next_midnight - midnight) // self.interval}"
                    f" periods in {tz.key}",
                )
            points.append(_Point(meter, start, start + self.interval, self.value(row, column), line))
        return points


def _value_column(m: Mapping, header: Sequence[str]) -> str:
    wanted = [m.value_column] if isinstance(m.value_column, str) else (m.value_column or [])
    for column in wanted:
        if column in header:
            return column
    raise UserError(f"none of the value columns {wanted} is in the header {list(header)}")


def _rows(path: Path, m: Mapping) -> Iterator[tuple[int, dict[str, str], list[str]]]:
    """(file line, row, header) for every data row, after any preamble. A file that is not text in
    the mapping's encoding, or not CSV, stops the import with its file and line (nothing is stored:
    rows are only written once the whole file has been read)."""
    line = 0
    try:
        with path.open(newline="", encoding=m.encoding) as f:
            lines = enumerate(f, 1)
            header: list[str] = []
            if m.header_starts_with is not None:
                for n, text in lines:
                    line = n  # for the error message of a decode failure in the preamble
                    if text.startswith(m.header_starts_with):
                        header = next(csv.reader([text], delimiter=m.delimiter), [])
                        break
                else:
                    raise UserError(f"{path}: no header line starting with {m.header_starts_with!r}")
            else:
                line, text = next(lines, (0, ""))
                header = next(csv.reader([text], delimiter=m.delimiter), [])
            header_line = line
            header = [h.strip() for h in header]
            reader = csv.reader((text for _, text in lines), delimiter=m.delimiter)
            for cells in reader:
                line = header_line + reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                yield line, dict(zip(header, cells, strict=False)), header
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}:{line + 1}: not {m.encoding} text ({exc.reason}); set the mapping's encoding"
            ' (e.g. encoding = "cp1252")'
        ) from None
    except csv.Error as exc:
        raise UserError(f"{path}:{line + 1}: not CSV: {exc}") from None


def read_points(
    path: Path,
    m: Mapping,
    registry: Registry,
    *,
    meter: str | None = None,
    timezone: str | None = None,
    site: str | None = None,
    result: ImportResult,
    progress: Callable[[int], None] | None = None,
) -> list[_Point]:
    """Every point of the file; rejected rows go to ``result.rejections``."""
    reader = _Reader(m, registry, meter, timezone, site)
    points: list[_Point] = []
    value_col: str | None = None
    periods: list[tuple[int, str]] | None = None
    pattern = re.compile(m.period_pattern)
    for line, row, header in _rows(path, m):
        result.rows_read += 1
        if progress is not None and result.rows_read % 1000 == 0:
            progress(result.rows_read)
        if any((row.get(col) or "").strip() != want for col, want in m.row_filter.items()):
            result.rows_read -= 1  # not a data row of this layout (e.g. another TYPE)
            continue
        try:
            if m.layout == "long":
                value_col = value_col or _value_column(m, header)
                new = reader.long_points(row, line, value_col)
            else:
                if periods is None:
                    periods = sorted((int(match.group(1)), h) for h in header if (match := pattern.match(h)))
                    if not periods:
                        raise UserError(f"{path}: no column matches period_pattern {m.period_pattern!r}")
                new = reader.wide_points(row, line, periods)
        except _RowError as exc:
            result.rejections.append(Rejection(line, exc.reason, exc.detail))
            continue
        result.rows_imported += 1
        points.extend(new)
    if progress is not None:
        progress(result.rows_read)
    return points


def _stored_counter(conn: psycopg.Connection[Any], meter: str, quantity: str, at: datetime) -> float | None:
    """The meter's stored counter at ``at``, else its last reading before it."""
    row = conn.execute(
        "SELECT value FROM readings WHERE meter_id = %s AND quantity = %s AND ts <= %s"
        " ORDER BY ts DESC LIMIT 1",
        (meter, quantity, at),
    ).fetchone()
    return None if row is None else float(row[0])


def to_readings(
    points: list[_Point],
    m: Mapping,
    *,
    opening: float,
    stored: Callable[[str, datetime], float | None],
    stored_after: Callable[[str, datetime], tuple[datetime, float] | None] = lambda _m, _t: None,
    result: ImportResult,
) -> dict[str, list[tuple[datetime, float, int]]]:
    """Per meter, (ts, value, file line) in time order: register reads as they are, intervals as a
    cumulative counter (see the module doc). Duplicates and overlaps are rejected here.

    ``stored(meter, t)``: the meter's stored counter at or before ``t``; ``stored_after(meter, t)``:
    its first stored reading at or after ``t``. A counter built from intervals must meet that later
    reading exactly (a re-import does; so does history imported before live data with the
    ``--opening`` this rejection names), else compute would count the step as energy or a reset:
    all rows of that meter are rejected as ``counter_conflict`` instead."""
    by_meter: dict[str, list[_Point]] = defaultdict(list)
    for p in points:
        by_meter[p.meter].append(p)
    out: dict[str, list[tuple[datetime, float, int]]] = {}
    for meter, pts in by_meter.items():
        pts.sort(key=lambda p: (p.start or p.end, p.end, p.line))
        kept: list[_Point] = []
        for p in pts:
            prev = kept[-1] if kept else None
            if prev is not None and (prev.start, prev.end) == (p.start, p.end):
                if prev.value != p.value:
                    result.rejections.append(Rejection(p.line, RejectReason.CONFLICTING_DUPLICATE, (
                        f"meter {meter!r} at {p.end.isoformat()} is {p.value!r} here and"
                        f" {prev.value!r} on line {prev.line}"
                    )))  # fmt: skip
                continue  # an identical repeat: the first one stands
            if prev is not None and p.start is not None and p.start < prev.end:
                result.rejections.append(Rejection(p.line, RejectReason.OVERLAPPING_INTERVAL, (
                    f"meter {meter!r}: {p.start.isoformat()} starts before the interval of line"
                    f" {prev.line} ends ({prev.end.isoformat()})"
                )))  # fmt: skip
                continue
            kept.append(p)
        if not kept:
            continue
        if m.kind == "register":
            out[meter] = [(p.end, p.value, p.line) for p in kept]
            continue
        first_start = kept[0].start
        assert first_start is not None
        base = stored(meter, first_start)
        counter = opening if base is None else base
        series: list[tuple[datetime, float, int]] = []
        previous_end: datetime | None = None
        for p in kept:
            assert p.start is not None
            if previous_end != p.start:
                series.append((p.start, counter, p.line))
            counter += p.value
            series.append((p.end, counter, p.line))
            previous_end = p.end
        conflict = _counter_conflict(meter, series, counter - (opening if base is None else base),
                                     stored_after(meter, series[-1][0]))  # fmt: skip
        if conflict:
            result.rejections.extend(Rejection(p.line, RejectReason.COUNTER_CONFLICT, conflict) for p in kept)
            continue
        out[meter] = series
    return out


def _counter_conflict(
    meter: str, series: list[tuple[datetime, float, int]], total: float, later: tuple[datetime, float] | None
) -> str:
    """Why the counter ``series`` (its file total ``total``) cannot be stored before ``later``."""
    if later is None:
        return ""
    end_ts, end_value, _line = series[-1]
    at, value = later
    if math.isclose(end_value, value, rel_tol=1e-12, abs_tol=1e-9):
        return ""
    start = value - total
    hint = (
        f"to end on it use --opening {start!r}" if start >= 0
        else "import this meter's earlier files first (the counter would have to start below 0)"
    )  # fmt: skip
    return (
        f"meter {meter!r}: this file's counter ends at {end_value!r} ({end_ts.isoformat()}) but"
        f" {value!r} is stored at {at.isoformat()}; {hint}"
    )


def _stored_after(
    conn: psycopg.Connection[Any], meter: str, quantity: str, at: datetime
) -> tuple[datetime, float] | None:
    row = conn.execute(
        "SELECT ts, value FROM readings WHERE meter_id = %s AND quantity = %s AND ts >= %s"
        " ORDER BY ts LIMIT 1",
        (meter, quantity, at),
    ).fetchone()
    return None if row is None else (row[0], float(row[1]))


def run_import(
    path: Path,
    dsn: str,
    m: Mapping,
    *,
    meter: str | None = None,
    timezone: str | None = None,
    site: str | None = None,
    opening: float = 0.0,
    dry_run: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> ImportResult:
    """Read ``path`` with mapping ``m``, check every row, and store the readings (unless ``dry_run``).
    ``progress(phase, done, total)`` is called as rows are read and readings written."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    digest = file_sha256(path)
    result = ImportResult(path=path, sha256=digest)
    gateway = f"import-{digest[:16]}"
    try:
        conn = psycopg.connect(dsn, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise UserError(f"cannot reach PostgreSQL (SCOPEMETER_DB__DSN): {str(exc).strip()}") from None
    with conn:
        registry = load_registry(conn)
        total_lines = sum(1 for _ in path.open("rb"))
        points = read_points(
            path, m, registry, meter=meter, timezone=timezone, site=site, result=result,
            progress=(lambda n: progress("reading", n, total_lines)) if progress else None,
        )  # fmt: skip
        q = m.quantity.value
        series = to_readings(
            points, m, opening=opening, result=result,
            stored=lambda mt, at: _stored_counter(conn, mt, q, at),
            stored_after=lambda mt, at: _stored_after(conn, mt, q, at),
        )  # fmt: skip
    rows: list[Row] = []
    for meter_id, readings in series.items():
        site_id = registry.meters[meter_id].site
        for ts, value, line in readings:
            try:
                Reading(meter_id=meter_id, quantity=m.quantity, ts=ts, value=value)
            except ValidationError as exc:
                detail = "; ".join(e["msg"] for e in exc.errors(include_url=False))
                result.rejections.append(
                    Rejection(line, RejectReason.SCHEMA, f"meter {meter_id!r}: {detail}")
                )
                continue
            rows.append((meter_id, q, ts, value, 0, site_id, gateway, line))
        result.meters[meter_id] = len(readings)
    rows.sort()
    result.readings_offered = len(rows)
    result.dirty = _dirty_ranges(rows)
    result.rejections.sort(key=lambda r: r.line)
    if dry_run or not rows:
        return result
    store = ReadingStore(dsn)
    try:
        for i in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[i : i + CHUNK_ROWS]
            result.readings_stored += store.write(chunk, ordered=True).inserted
            if progress is not None:
                progress("writing", i + len(chunk), len(rows))
    finally:
        store.close()
    return result


def _dirty_ranges(rows: list[Row]) -> list[DirtyRange]:
    spans: dict[tuple[str, str, str], list[Any]] = {}
    for meter_id, q, ts, _v, _qual, site_id, _g, _seq in rows:
        span = spans.setdefault((site_id, meter_id, q), [ts, ts, 0])
        span[0], span[1], span[2] = min(span[0], ts), max(span[1], ts), span[2] + 1
    return [
        DirtyRange(site_id=s, meter_id=mt, quantity=q, t_min=lo, t_max=hi, rows=n)
        for (s, mt, q), (lo, hi, n) in sorted(spans.items())
        if q in COUNTER_QUANTITIES
    ]


async def notify_compute(kafka: KafkaSettings, topic: str, dirty: list[DirtyRange]) -> int:
    """Publish the import's dirty ranges as the writer does after a commit; returns records sent."""
    from aiokafka import AIOKafkaProducer

    by_site: dict[str, list[DirtyRange]] = defaultdict(list)
    for d in dirty:
        by_site[d.site_id].append(d)
    from ops.kafka_client import client_kwargs

    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all")
    await producer.start()
    try:
        for site, ranges in by_site.items():
            await producer.send_and_wait(
                topic, DirtyBatch(site_id=site, ranges=ranges).encode(), key=site.encode()
            )
    finally:
        await producer.stop()
    return len(by_site)
