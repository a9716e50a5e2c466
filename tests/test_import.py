"""``scopemeter import``: a real-shaped year of 15-minute interval data, re-import, rejections, presets.

The expected monthly totals are computed here from the CSV text alone (string dates, Decimal
sums), independently of the importer; the imported readings then go through the real compute
recompute (``compute.recompute``) against the real PostgreSQL, and its 15-minute energy summed per
local month must equal them.
"""

from __future__ import annotations

import csv
import os
import random
import re
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from compute.recompute import recompute
from ingest.importer import RejectReason, load_mapping, run_import

DATA = Path(__file__).parent / "data"


def _register(dsn: str, site_tz: str, meters: list[str]) -> str:
    """A supplier, a site in ``site_tz`` and electricity meters in the registry; returns the site."""
    tag = uuid.uuid4().hex[:8]
    site = f"site-{tag}"
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO suppliers VALUES (%s, %s)", (f"sup-{tag}", "Steel Co"))
        conn.execute(
            "INSERT INTO sites (site_id, supplier_id, name, grid_region, timezone)"
            " VALUES (%s, %s, %s, 'CN', %s)",
            (site, f"sup-{tag}", "Steel plant", site_tz),
        )
        for m in meters:
            conn.execute(
                "INSERT INTO meters (meter_id, site_id, carrier, model)"
                " VALUES (%s, %s, 'electricity', 'ami')",
                (m, site),
            )
    return site


def _write_year(path: Path, meter: str, tz_name: str, year: int, midnight_24: bool, seed: int) -> None:
    """One year of 15-minute kWh stamped at interval END in local wall time, as an AMI export writes
    it: ends are walked in UTC and formatted in the zone (so clock-change days have 92 or 100 rows,
    and the repeated hour's wall times appear twice). Midnight is ``24:00`` of the day, or
    ``00:00`` of the next day. Values: a steel plant's shifts plus noise, 3 decimals."""
    tz = ZoneInfo(tz_name)
    end = datetime(year, 1, 1, tzinfo=tz).astimezone(UTC) + timedelta(minutes=15)
    stop = datetime(year + 1, 1, 1, tzinfo=tz).astimezone(UTC)
    rnd = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["meter_id", "timestamp", "kwh"])
        while end <= stop:
            local = end.astimezone(tz)
            shift = 1.0 if 6 <= local.hour < 22 else 0.45
            kwh = round(2400 * shift * (0.85 + 0.3 * rnd.random()), 3)
            if midnight_24 and (local.hour, local.minute) == (0, 0):
                stamp = f"{(local - timedelta(days=1)):%Y-%m-%d} 24:00"
            else:
                stamp = f"{local:%Y-%m-%d %H:%M}"
            w.writerow([meter, stamp, f"{kwh:.3f}"])
            end += timedelta(minutes=15)


def _file_months(path: Path) -> tuple[dict[str, Decimal], Counter[str]]:
    """Per local month, the sum of the file's kWh, and the rows per local day — from the strings:
    an interval-end stamp of 00:00 (or 24:00) belongs to the day before (or the day written)."""
    months: dict[str, Decimal] = defaultdict(Decimal)
    days: Counter[str] = Counter()
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            day, clock = row["timestamp"].split(" ")
            if clock == "00:00":
                day = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
            months[day[:7]] += Decimal(row["kwh"])
            days[day] += 1
    return months, days


def _computed_months(dsn: str, meter: str, tz_name: str, months: list[str]) -> dict[str, float]:
    tz = ZoneInfo(tz_name)
    out = {}
    with psycopg.connect(dsn) as conn:
        for month in months:
            y, m = int(month[:4]), int(month[5:])
            lo = datetime(y, m, 1, tzinfo=tz)
            hi = datetime(y + m // 12, m % 12 + 1, 1, tzinfo=tz)
            row = conn.execute(
                "SELECT sum(kwh) FROM meter_energy_15m WHERE meter_id = %s AND bucket >= %s AND bucket < %s",
                (meter, lo, hi),
            ).fetchone()
            out[month] = float(row[0]) if row and row[0] is not None else 0.0
    return out


def _recompute(dsn: str, result: Any) -> None:
    with psycopg.connect(dsn) as conn:
        for d in result.dirty:
            recompute(conn, d)


@pytest.mark.parametrize(
    ("tz_name", "year", "midnight_24"),
    [("Asia/Shanghai", 2018, True), ("Europe/London", 2019, False)],
    ids=["shanghai-no-dst-24h", "london-dst-next-day-midnight"],
)
def test_a_year_of_interval_end_data_matches_the_file_month_by_month(
    pg_db: str, tmp_path: Path, tz_name: str, year: int, midnight_24: bool
) -> None:
    meter = f"steel-{uuid.uuid4().hex[:8]}"
    _register(pg_db, tz_name, [meter])
    path = tmp_path / "year.csv"
    _write_year(path, meter, tz_name, year, midnight_24, seed=year)
    expected, days = _file_months(path)
    assert len(expected) == 12
    rows = sum(days.values())
    if tz_name == "Europe/London":  # the file really has the clock-change days
        assert rows == 35_040 and days[f"{year}-03-31"] == 92 and days[f"{year}-10-27"] == 100
        assert Counter(days.values()) == {96: 363, 92: 1, 100: 1}
    else:
        assert rows == 35_040 and set(days.values()) == {96}

    result = run_import(path, pg_db, load_mapping("interval-end", None))

    assert result.rejections == []
    assert (result.rows_read, result.readings_offered, result.readings_stored) == (rows, rows + 1, rows + 1)
    with psycopg.connect(pg_db) as conn:
        first, gateway, seq = conn.execute(
            "SELECT ts, gateway_id, batch_seq FROM readings WHERE meter_id = %s ORDER BY ts LIMIT 1", (meter,)
        ).fetchone()  # type: ignore[misc]
    assert first == datetime(year, 1, 1, tzinfo=ZoneInfo(tz_name))  # the opening reading
    assert gateway == f"import-{result.sha256[:16]}" and seq == 2  # provenance: file digest, line
    _recompute(pg_db, result)
    computed = _computed_months(pg_db, meter, tz_name, sorted(expected))
    for month, kwh in expected.items():
        assert computed[month] == pytest.approx(float(kwh), rel=1e-12, abs=1e-6), month

    again = run_import(path, pg_db, load_mapping("interval-end", None))
    assert (again.readings_offered, again.readings_stored, again.readings_duplicate) == (
        rows + 1,
        0,
        rows + 1,
    )


def test_the_next_file_continues_the_stored_counter(pg_db: str, tmp_path: Path) -> None:
    meter = f"m-{uuid.uuid4().hex[:8]}"
    _register(pg_db, "Asia/Shanghai", [meter])
    jan, feb = tmp_path / "jan.csv", tmp_path / "feb.csv"
    jan.write_text(f"meter_id,timestamp,kwh\n{meter},2018-01-31 23:45,2.5\n{meter},2018-01-31 24:00,1.5\n")
    feb.write_text(f"meter_id,timestamp,kwh\n{meter},2018-02-01 00:15,4.0\n")
    m = load_mapping("interval-end", None)
    run_import(jan, pg_db, m)
    r = run_import(feb, pg_db, m)
    assert (r.readings_offered, r.readings_stored) == (2, 1)  # its opening reading is January's last
    with psycopg.connect(pg_db) as conn:
        values = [
            v for (v,) in conn.execute("SELECT value FROM readings WHERE meter_id = %s ORDER BY ts", (meter,))
        ]
    assert values == [0.0, 2.5, 4.0, 8.0]


def test_rejections_name_file_line_and_reason(pg_db: str, tmp_path: Path) -> None:
    meter = f"m-{uuid.uuid4().hex[:8]}"
    _register(pg_db, "Europe/London", [meter])
    path = tmp_path / "mixed.csv"
    path.write_text(
        "meter_id,timestamp,kwh\n"
        f"{meter},2019-03-31 00:15,1.0\n"  # 2
        f"{meter},2019-03-31 01:30,1.0\n"  # 3: the hour the clocks skip
        "nobody,2019-03-31 00:30,1.0\n"  # 4
        f"{meter},2019-03-31 00:30,-1\n"  # 5
        f"{meter},2019-03-31 00:30,abc\n"  # 6
        f"{meter},31/03/2019 00:45,1.0\n"  # 7
        f"{meter},2019-03-31 00:30,2.0\n"  # 8
        f"{meter},2019-03-31 00:30,3.0\n"  # 9: same interval, another value
        f"{meter},1999-12-31 23:45,1.0\n"  # 10: before the wire contract's 2000
    )
    r = run_import(path, pg_db, load_mapping("interval-end", None))
    got = {(x.line, x.reason) for x in r.rejections}
    assert got == {
        (3, RejectReason.NONEXISTENT_LOCAL_TIME),
        (4, RejectReason.UNREGISTERED_METER),
        (5, RejectReason.BAD_VALUE),
        (6, RejectReason.BAD_VALUE),
        (7, RejectReason.BAD_TIME),
        (9, RejectReason.CONFLICTING_DUPLICATE),
        (10, RejectReason.SCHEMA),
    }
    # 1999-12-31 23:30 (the opening) and 23:45 fail the contract; 00:00, 00:15, 00:30 (line 2, 8) stored
    assert r.readings_stored == 3


def test_register_reads_are_stored_as_read(pg_db: str, tmp_path: Path) -> None:
    meter = f"m-{uuid.uuid4().hex[:8]}"
    _register(pg_db, "Asia/Shanghai", [meter])
    path = tmp_path / "reads.csv"
    path.write_text(
        f"meter_id,timestamp,value\n{meter},2015-06-01T08:00:00+08:00,1000.5\n{meter},2015-07-01 08:00,1200\n"
    )
    r = run_import(path, pg_db, load_mapping("register", None))
    assert (r.readings_stored, r.rejections) == (2, [])
    with psycopg.connect(pg_db) as conn:
        rows = conn.execute(
            "SELECT ts, value FROM readings WHERE meter_id = %s ORDER BY ts", (meter,)
        ).fetchall()
    assert rows == [
        (datetime(2015, 6, 1, 0, tzinfo=UTC), 1000.5),
        (datetime(2015, 7, 1, 0, tzinfo=UTC), 1200.0),
    ]


def test_uk_half_hourly_wide_layout_counts_46_and_50_period_days(pg_db: str) -> None:
    """tests/data/uk_hh_2019_clock_changes.csv: the short and long days of 2019 and an ordinary day,
    HH01..HH50 (Elexon settlement periods); one cell beyond the short day's 46 periods."""
    mpan = "1200023305967"  # fixture meter points
    mpan2 = "1200023305968"
    _register(pg_db, "Europe/London", [mpan, mpan2])
    r = run_import(DATA / "uk_hh_2019_clock_changes.csv", pg_db, load_mapping("uk-hh", None))
    assert [(x.line, x.reason) for x in r.rejections] == [(5, RejectReason.BAD_PERIOD)]
    with psycopg.connect(pg_db) as conn:
        spans = dict(
            conn.execute(
                "SELECT meter_id, count(*) FROM readings WHERE meter_id IN (%s, %s) GROUP BY 1", (mpan, mpan2)
            ).fetchall()
        )
        last = conn.execute(
            "SELECT max(ts) FROM readings WHERE meter_id = %s AND ts <= '2019-10-28 00:00+00'", (mpan,)
        ).fetchone()
    # mpan: 46 + 50 + 48 periods on three days with gaps between them: 3 openings + 144 ends
    assert spans[mpan] == 3 + 46 + 50 + 48
    assert last is not None and last[0] == datetime(
        2019, 10, 28, 0, 0, tzinfo=UTC
    )  # HH50 ends at midnight GMT


def test_green_button_preset_reads_a_pge_style_export(pg_db: str) -> None:
    meter = f"gb-{uuid.uuid4().hex[:8]}"
    _register(pg_db, "America/Los_Angeles", [meter])
    r = run_import(DATA / "green_button_pge.csv", pg_db, load_mapping("green-button", None), meter=meter)
    assert r.rejections == [] and r.rows_read == 8
    with psycopg.connect(pg_db) as conn:
        rows = conn.execute(
            "SELECT ts, value FROM readings WHERE meter_id = %s ORDER BY ts", (meter,)
        ).fetchall()
    # 00:00-00:14 PST is 08:00-08:15 UTC; 8 intervals → opening + 8 ends
    assert rows[0] == (datetime(2024, 1, 15, 8, 0, tzinfo=UTC), 0.0)
    assert rows[-1][0] == datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
    assert rows[-1][1] == pytest.approx(0.30 + 0.23 + 0.25 + 0.27 + 0.31 + 0.22 + 0.19 + 0.41)


def test_cli_prints_the_summary_and_notifies_compute(settings: Any, tmp_path: Path) -> None:
    meter = f"m-{uuid.uuid4().hex[:8]}"
    _register(settings.db.dsn, "Asia/Shanghai", [meter])
    path = tmp_path / "small.csv"
    path.write_text(f"meter_id,timestamp,kwh\n{meter},2010-05-01 00:15,1\nghost,2010-05-01 00:15,1\n")
    env = {
        **os.environ,
        "SCOPEMETER_DB__DSN": settings.db.dsn,
        "SCOPEMETER_KAFKA__BOOTSTRAP": settings.kafka.bootstrap,
        "SCOPEMETER_KAFKA__COMMITTED_TOPIC": f"committed-{uuid.uuid4().hex[:6]}",
    }
    run = subprocess.run(
        [sys.executable, "-m", "ops.cli", "import", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr  # a row was rejected
    out = " ".join(run.stdout.split())
    assert "rows read 2" in out and "stored 2" in out and "unregistered_meter: 1 rows" in out
    assert f"{path}:3: meter 'ghost' is not in the fleet registry" in out
    assert "compute notified (1 dirty ranges" in out


def test_history_before_live_data_must_meet_the_live_counter(pg_db: str, tmp_path: Path) -> None:
    """Interval history imported before a meter's live (edge) counter would step from the file's
    total to the live register value: refused with the --opening that makes them meet, which then
    imports with no energy invented between the two."""
    meter = f"m-{uuid.uuid4().hex[:8]}"
    _register(pg_db, "Asia/Shanghai", [meter])
    live = tmp_path / "live.csv"
    live.write_text(
        f"meter_id,timestamp,value\n{meter},2018-01-01 06:00,52000.5\n{meter},2018-01-01 06:15,52010.5\n"
    )
    assert run_import(live, pg_db, load_mapping("register", None)).readings_stored == 2
    history = tmp_path / "history.csv"
    history.write_text(
        f"meter_id,timestamp,kwh\n{meter},2018-01-01 05:30,12.25\n{meter},2018-01-01 05:45,7.75\n"
    )
    refused = run_import(history, pg_db, load_mapping("interval-end", None))
    assert {(r.line, r.reason) for r in refused.rejections} == {
        (2, RejectReason.COUNTER_CONFLICT),
        (3, RejectReason.COUNTER_CONFLICT),
    }
    assert refused.readings_stored == 0
    assert "use --opening 51980.5" in refused.rejections[0].detail
    ok = run_import(history, pg_db, load_mapping("interval-end", None), opening=51980.5)
    assert ok.rejections == [] and ok.readings_stored == 3
    assert _stored_values(pg_db, meter) == [51980.5, 51992.75, 52000.5, 52000.5, 52010.5]
    again = run_import(history, pg_db, load_mapping("interval-end", None), opening=51980.5)
    assert again.rejections == [] and again.readings_duplicate == 3


def _stored_values(dsn: str, meter: str) -> list[float]:
    with psycopg.connect(dsn) as conn:
        return [
            v for (v,) in conn.execute("SELECT value FROM readings WHERE meter_id = %s ORDER BY ts", (meter,))
        ]


def test_no_file_content_escapes_as_anything_but_a_named_rejection_or_error(tmp_path: Path) -> None:
    """Fuzz (no DB): any bytes under every preset give rejections with a real line number, or a
    UserError naming the file; nothing else escapes (the registry knows meter m1 only)."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    from ingest.admit import MeterHome, Registry
    from ingest.importer import ImportResult, read_points, to_readings
    from ops.errors import UserError

    registry = Registry(
        sites={"s": "sup"}, site_tz={"s": "Europe/London"}, meters={"m1": MeterHome("s", None)}
    )
    cell = st.one_of(
        st.sampled_from(["m1", "m2", "2019-03-31 01:30", "2019-10-27 01:15", "24:00", "31/03/2019", "1.5",
                         "-2", "nan", "1e400", "kWh", "Wh", "", "Electric usage", "2019-03-31", "0:14"]),
        st.text(max_size=8),
    )  # fmt: skip
    row = st.lists(cell, min_size=1, max_size=8).map(",".join)
    headers = st.sampled_from([
        "meter_id,timestamp,kwh", "meter_id,timestamp,value", "MPAN,Date,HH01,HH02,HH47,HH49",
        "TYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES",
    ])  # fmt: skip
    texts = st.builds(lambda h, rows: "\n".join([h, *rows]), headers, st.lists(row, max_size=12))
    files = st.one_of(texts.map(str.encode), st.binary(max_size=200))
    presets = ["interval-end", "interval-start", "register", "green-button", "uk-hh"]
    path = tmp_path / "fuzz.csv"

    @hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(presets), files)
    def check(preset: str, data: bytes) -> None:
        path.write_bytes(data)
        lines = len(re.split(rb"\r\n|\r|\n", data))  # the line ends text files know (a lone CR too)
        result = ImportResult(path=path, sha256="0" * 64)
        try:
            points = read_points(path, load_mapping(preset, None), registry, meter="m1", result=result)
            to_readings(
                points, load_mapping(preset, None), opening=0.0, stored=lambda _m, _t: None, result=result
            )
        except UserError as exc:
            assert str(path) in str(exc) or "mapping" in str(exc) or "column" in str(exc)
            return
        assert all(1 <= r.line <= lines and r.detail for r in result.rejections)

    check()


def test_a_cp1252_export_is_named_then_read_with_its_encoding(pg_db: str, tmp_path: Path) -> None:
    from ops.errors import UserError

    meter = f"m-{uuid.uuid4().hex[:8]}"
    _register(pg_db, "Europe/London", [meter])
    path = tmp_path / "zähler.csv"
    path.write_bytes(
        f"meter_id,timestamp,kwh,Zähler\n{meter},2019-01-01 00:15,1.5,Halle 3 – Öfen\n".encode("cp1252")
    )
    with pytest.raises(UserError, match=r"zähler.csv:1: not utf-8-sig text"):
        run_import(path, pg_db, load_mapping("interval-end", None))
    r = run_import(path, pg_db, load_mapping("interval-end", None).model_copy(update={"encoding": "cp1252"}))
    assert r.rejections == [] and r.readings_stored == 2
