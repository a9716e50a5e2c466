"""Recompute from the source of truth: incremental == clean, exactly, whatever the arrival order."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.recompute import recompute, recompute_all
from ingest.events import DirtyRange
from ingest.writer import dirty_ranges
from tests.test_compute_support import Row, compute_dsn, insert_rows, reset, snapshot

__all__ = ["compute_dsn"]

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "s1"
supplier = "acme"
name = "Shenzhen"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[sites]]
id = "s2"
supplier = "acme"
name = "Nowhere"
grid_region = "ZZ"          # no factor: kg_co2e must be NULL

[[gateways]]
id = "gw1"
site = "s1"

[[gateways]]
id = "gw2"
site = "s2"

[[meters]]
id = "m1"
site = "s1"
gateway = "gw1"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "m2"
site = "s1"
gateway = "gw1"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "m3"
site = "s1"
gateway = "gw1"
carrier = "electricity"
model = "eastron_sdm630"

[[meters]]
id = "m4"
site = "s2"
gateway = "gw2"
carrier = "electricity"
model = "eastron_sdm630"
"""

# v2 supersedes v1 on one site-local day (Asia/Shanghai): 2026-11-01 16:00Z → 2026-11-02 16:00Z.
FACTORS = """
[[factors]]
id = "cn-v1"
publisher = "MEE"
series = "national-power-average"
region = "CN"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
kg_co2e_per_unit = 0.5366
unit = "kWh"
version = 1
source = "test"

[[factors]]
id = "cn-v2-nov2"
publisher = "MEE"
series = "national-power-average"
region = "CN"
carrier = "electricity"
valid_from = 2026-11-02
valid_to = 2026-11-03
kg_co2e_per_unit = 0.6
unit = "kWh"
version = 2
source = "test"

[[factors]]
id = "cn-other-series"
publisher = "MEE"
series = "statistical"
region = "CN"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
kg_co2e_per_unit = 9.9
unit = "kWh"
version = 9
source = "test"
"""

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SITE_OF = {"m1": "s1", "m2": "s1", "m3": "s1", "m4": "s2", "ghost": "s1"}


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        (tmp_path / "fleet.toml").write_text(FLEET)
        (tmp_path / "factors.toml").write_text(FACTORS)
        apply_fleet(c, tmp_path / "fleet.toml")
        apply_factors(c, tmp_path / "factors.toml")
        yield c


def clear_data(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE readings, meter_energy_15m, site_rollups_15m")
    conn.commit()


def generate(seed: int) -> list[Row]:
    """Irregular counter readings for five meters over ~8 h: sub-second timestamps, gaps, a meter
    replacement (m2) and some power readings that compute must ignore."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for meter, site in SITE_OF.items():
        t, v = T0 + timedelta(seconds=rng.uniform(0, 600)), rng.uniform(0, 1e6)
        end = T0 + timedelta(hours=8)
        replaced = False
        while t < end:
            rows.append((meter, "energy_import_kwh", t, v, 0, site, "gw", 0))
            if rng.random() < 0.2:
                rows.append((meter, "power_w", t, rng.uniform(0, 1e5), 0, site, "gw", 0))
            dt = rng.choice([rng.uniform(1, 60), rng.uniform(60, 900), rng.uniform(900, 5400)])
            t += timedelta(seconds=dt)
            v += rng.uniform(0, 200) * dt / 3600
            if meter == "m2" and (rng.random() < 0.03 or (not replaced and t > T0 + timedelta(hours=4))):
                v, replaced = rng.uniform(0, 10), True  # replaced: the register starts again near 0
    return rows


def run_incremental(conn: psycopg.Connection[Any], chunks: list[list[Row]]) -> None:
    for chunk in chunks:
        insert_rows(conn, chunk)
        for dirty in dirty_ranges(chunk):
            recompute(conn, dirty)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shuffled_chunks_replays_and_late_data_equal_clean_run(conn: Any, seed: int) -> None:
    rows = generate(seed)
    rng = random.Random(seed * 7919)

    insert_rows(conn, rows)
    rebuilt = recompute_all(conn)
    assert rebuilt.meters == 5 and rebuilt.negative_deltas > 0
    clean = snapshot(conn)
    assert clean[0] and clean[1]

    # Incremental: shuffled, chunked, with replays of earlier chunks and duplicates inside chunks.
    clear_data(conn)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    chunks: list[list[Row]] = []
    i = 0
    while i < len(shuffled):
        n = rng.randint(1, 60)
        chunk = shuffled[i : i + n] + rng.sample(shuffled[: i + n], k=min(3, i + n))
        chunks.append(chunk)
        if rng.random() < 0.1:
            chunks.append(rng.choice(chunks))  # a replay after a crash
        i += n
    run_incremental(conn, chunks)
    assert snapshot(conn) == clean

    # Mostly in order with a late straggler batch arriving at the end.
    clear_data(conn)
    ordered = sorted(rows, key=lambda r: r[2])
    late = set(rng.sample(range(len(ordered)), k=len(ordered) // 10))
    on_time = [r for j, r in enumerate(ordered) if j not in late]
    run_incremental(conn, [on_time[j : j + 40] for j in range(0, len(on_time), 40)])
    run_incremental(conn, [[ordered[j] for j in sorted(late)]])
    assert snapshot(conn) == clean

    # A full rebuild over the incremental state changes nothing.
    recompute_all(conn)
    assert snapshot(conn) == clean


def test_energy_and_factor_selection(conn: Any) -> None:
    # m1 draws 60 kW from 15:00Z to 17:00Z, read every minute; m3 draws 20 kW on half the period.
    rows: list[Row] = []
    for k in range(121):
        ts = datetime(2026, 11, 1, 15, tzinfo=UTC) + timedelta(minutes=k)
        rows.append(("m1", "energy_import_kwh", ts, 100.0 + k, 0, "s1", "gw1", 0))
        if k <= 60:
            rows.append(("m3", "energy_import_kwh", ts, 5.0 + k / 3, 0, "s1", "gw1", 0))
    rows.append(("m4", "energy_import_kwh", datetime(2026, 11, 1, 15, tzinfo=UTC), 0.0, 0, "s2", "gw2", 0))
    rows.append(
        ("m4", "energy_import_kwh", datetime(2026, 11, 1, 15, 15, tzinfo=UTC), 3.0, 0, "s2", "gw2", 0)
    )
    insert_rows(conn, rows)
    for d in dirty_ranges(rows):
        recompute(conn, d)
    got = conn.execute(
        "SELECT site_id, extract(hour FROM bucket AT TIME ZONE 'UTC')::int, kwh, kg_co2e, factor_id"
        " FROM site_rollups_15m ORDER BY site_id, bucket"
    ).fetchall()
    s1 = [r for r in got if r[0] == "s1"]
    assert len(s1) == 8
    # Before 16:00Z it is Nov 1 in Shanghai (v1); from 16:00Z Nov 2 (v2 supersedes v1).
    for _site, hour, kwh, kg, factor in s1:
        expected_kwh = 15.0 + (5.0 if hour == 15 else 0.0)
        assert kwh == pytest.approx(expected_kwh)
        assert factor == ("cn-v1" if hour < 16 else "cn-v2-nov2")
        assert kg == pytest.approx(expected_kwh * (0.5366 if hour < 16 else 0.6))
    assert [r[2:] for r in got if r[0] == "s2"] == [(3.0, None, None)]


def test_unregistered_meter_and_other_quantities(conn: Any) -> None:
    ts = datetime(2026, 11, 1, 15, tzinfo=UTC)
    rows: list[Row] = [
        ("ghost", "energy_import_kwh", ts, 1.0, 0, "s1", "gw1", 0),
        ("ghost", "energy_import_kwh", ts + timedelta(minutes=10), 2.0, 0, "s1", "gw1", 0),
    ]
    insert_rows(conn, rows)
    (dirty,) = dirty_ranges(rows)
    result = recompute(conn, dirty)
    assert not result.registered and result.buckets == 1
    assert conn.execute("SELECT count(*) FROM site_rollups_15m").fetchone() == (0,)
    gas = DirtyRange(site_id="s1", meter_id="m1", quantity="gas_m3", t_min=ts, t_max=ts, rows=1)
    assert recompute(conn, gas).skipped
