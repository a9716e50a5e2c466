"""Recompute from the source of truth: incremental == clean, exactly, whatever the arrival order."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import compute.recompute
from compute.rebuild import recompute_all
from compute.recompute import recompute, recompute_set
from edge.wire import Quality
from ingest.events import DirtyRange
from ingest.writer import dirty_ranges
from tests.test_compute_support import Row, apply_registry, compute_dsn, insert_rows, reset, snapshot

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
counter_max = 1000000.0     # a 6-digit register: wraps are undone

[[meters]]
id = "gas1"
site = "s1"
carrier = "natural_gas"
reference_conditions = "15C-101.325kPa"
model = "gas_pulse"
max_gap_s = 600

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
data_year = 2022
kg_co2_per_unit = 0.5366
gases = "CO2"
gwp_set = "none"
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
data_year = 2022
kg_co2_per_unit = 0.6
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 2
source = "test"

[[factors]]
id = "gas-m3"
publisher = "IPCC"
series = "ipcc-2006-default"
region = "GLOBAL"
carrier = "natural_gas"
valid_from = 2006-01-01
valid_to = 2100-01-01
data_year = 2006
kg_co2_per_unit = 2.0
kg_ch4_per_unit = 0.001
kg_n2o_per_unit = 0.0001
gwp_set = "AR5"
gases = "CO2e"
unit = "m3"
version = 1
source = "test"
cv_basis = "net"
ncv = 10.0
ncv_unit = "kWh (net CV) per m3"
ncv_source = "test"
reference_conditions = "15C-101.325kPa"

[[factors]]
id = "cn-other-series"
publisher = "MEE"
series = "statistical"
region = "CN"
carrier = "electricity"
valid_from = 2022-01-01
valid_to = 2100-01-01
data_year = 2022
kg_co2_per_unit = 9.9
gases = "CO2"
gwp_set = "none"
unit = "kWh"
version = 9
source = "test"
"""

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SITE_OF = {"m1": "s1", "m2": "s1", "m3": "s1", "m4": "s2", "ghost": "s1", "gas1": "s1"}
QUALITY = [0] * 30 + [int(Quality.ESTIMATED), int(Quality.COUNTER_RESET), int(Quality.COUNTER_WRAP)]


@pytest.fixture
def conn(compute_dsn: str, tmp_path: Path) -> Any:
    with psycopg.connect(compute_dsn) as c:
        reset(c)
        apply_registry(c, tmp_path, FLEET, FACTORS)
        yield c


def clear_data(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE readings, meter_energy_15m, site_rollups_15m")
    conn.commit()


def generate(seed: int) -> list[Row]:
    """Irregular counter readings for six meters over ~8 h: sub-second timestamps, gaps, quality bits,
    register wraps (m1), a meter replacement (m2), a gas meter and power readings compute ignores."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for meter, site in SITE_OF.items():
        quantity = "gas_m3" if meter == "gas1" else "energy_import_kwh"
        t, v = T0 + timedelta(seconds=rng.uniform(0, 600)), rng.uniform(9.5e5, 1e6)
        end = T0 + timedelta(hours=8)
        replaced, quality = False, 0
        while t < end:
            rows.append((meter, quantity, t, v, quality, site, "gw", 0))
            if rng.random() < 0.2:
                rows.append((meter, "power_w", t, rng.uniform(0, 1e5), 0, site, "gw", 0))
            dt = rng.choice([rng.uniform(1, 60), rng.uniform(60, 900), rng.uniform(900, 5400)])
            t += timedelta(seconds=dt)
            v += rng.uniform(0, 2000) * dt / 3600
            quality = rng.choice(QUALITY)
            if meter == "m1" and v >= 1e6:
                v -= 1e6  # the register wraps
            if meter == "m2" and (rng.random() < 0.03 or (not replaced and t > T0 + timedelta(hours=4))):
                v, replaced = rng.uniform(0, 10), True  # replaced: the register starts again near 0
                quality = int(Quality.METER_REPLACED)
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
    assert rebuilt.meters == 6
    assert all(
        rebuilt.events[k] > 0 for k in ("wraps", "resets", "replacements", "drops", "gaps", "estimated")
    )
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


def test_scope1_gas_gases_estimated_gap_and_coverage(conn: Any) -> None:
    # gas1: 1 m3/min, read every minute 15:00-15:15, then nothing until 15:45 (a 30-min gap > 600 s).
    t = datetime(2026, 11, 1, 15, tzinfo=UTC)
    rows: list[Row] = [
        ("gas1", "gas_m3", t + timedelta(minutes=k), float(k), 0, "s1", "gw1", 0) for k in range(16)
    ]
    rows.append(("gas1", "gas_m3", t + timedelta(minutes=45), 45.0, 0, "s1", "gw1", 0))
    # m1 only of the three electricity meters at s1: electricity coverage is 1/3.
    rows += [
        ("m1", "energy_import_kwh", t + timedelta(minutes=k), 10.0 + k, 0, "s1", "gw1", 0) for k in range(16)
    ]
    insert_rows(conn, rows)
    for d in dirty_ranges(rows):
        recompute(conn, d)
    got = conn.execute(
        "SELECT carrier, scope, method, activity_unit, kwh, kwh_estimated, coverage, kg_co2e, kg_co2, kg_ch4,"
        " kg_n2o, factor_id FROM site_rollups_15m WHERE site_id = 's1' ORDER BY carrier, bucket"
    ).fetchall()
    elec = [r for r in got if r[0] == "electricity"]
    assert [r[1:4] for r in elec] == [(2, "location", "kWh")]
    assert elec[0][4] == pytest.approx(15.0) and elec[0][5] == 0.0 and elec[0][6] == pytest.approx(1 / 3)
    gas = [r for r in got if r[0] == "natural_gas"]
    assert [r[1:4] for r in gas] == [(1, "direct", "m3")] * 3
    assert [r[4] for r in gas] == pytest.approx([15.0, 15.0, 15.0])
    assert [r[5] for r in gas] == pytest.approx([0.0, 15.0, 15.0])  # the gap is estimated
    assert [r[6] for r in gas] == pytest.approx([1.0, 0.0, 0.0])
    for r in gas:
        assert r[8:11] == pytest.approx((r[4] * 2.0, r[4] * 0.001, r[4] * 0.0001))
        assert r[7] == pytest.approx(r[4] * (2.0 + 0.001 * 28 + 0.0001 * 265))
        assert r[11] == "gas-m3"
    hourly = conn.execute(
        "SELECT kwh, kwh_estimated FROM site_rollups_1h WHERE site_id = 's1' AND carrier = 'natural_gas'"
    ).fetchall()
    assert hourly == [pytest.approx((45.0, 30.0))]


@pytest.mark.parametrize("seed", [4, 5])
def test_set_based_polls_of_shuffled_replayed_chunks_equal_clean_run(conn: Any, seed: int) -> None:
    """What the worker does: many chunks' dirty ranges (replays and duplicates included) in one
    ``recompute_set`` call per poll give exactly the clean rebuild."""
    rows = generate(seed)
    rng = random.Random(seed)
    insert_rows(conn, rows)
    recompute_all(conn)
    clean = snapshot(conn)
    clear_data(conn)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    cuts = sorted({0, len(shuffled), *rng.sample(range(1, len(shuffled)), k=len(shuffled) // 40)})
    chunks = [shuffled[a:b] for a, b in itertools.pairwise(cuts)]
    chunks += rng.sample(chunks, k=3)  # replays after a crash
    for p in range(0, len(chunks), 7):  # a poll takes several writer batches at once
        poll = chunks[p : p + 7]
        for chunk in poll:
            insert_rows(conn, chunk)
        recompute_set(conn, [d for chunk in poll for d in dirty_ranges(chunk)])
    assert snapshot(conn) == clean


def test_one_poll_is_one_kernel_call_and_rebuilds_each_site_bucket_once(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overlapping ranges of several meters of one site, in one poll: one kernel call for all of
    them, and every (site, bucket) rollup row inserted exactly once (counted by PostgreSQL's
    per-transaction statistics), not once per meter as a per-range recompute does."""
    rows = generate(6)
    insert_rows(conn, rows)
    ranges = [d for j in range(0, len(rows), 25) for d in dirty_ranges(rows[j : j + 25])]
    assert len({(d.meter_id, d.quantity) for d in ranges}) < len(ranges)  # overlapping ranges per meter
    calls: list[int] = []
    real = compute.recompute.bucket_energy_many

    def counting(*args: Any) -> Any:
        calls.append(len(args[0]) - 1)
        return real(*args)

    monkeypatch.setattr(compute.recompute, "bucket_energy_many", counting)
    with conn.transaction():  # recompute_set's own transaction becomes a savepoint of this one
        results = recompute_set(conn, ranges)
        (inserted,) = conn.execute(
            "SELECT n_tup_ins FROM pg_stat_xact_user_tables WHERE relname = 'site_rollups_15m'"
        ).fetchone()
        (stored,) = conn.execute("SELECT count(*) FROM site_rollups_15m").fetchone()
    assert calls == [sum(1 for r in results if r.skipped is None)]
    assert stored > 0 and inserted == stored


def test_recomputes_nested_in_one_outer_transaction(conn: Any) -> None:
    """Statements verify by recomputing inside a transaction they roll back: several recomputes
    and a rebuild in one outer transaction must not meet each other's staged rows."""
    rows = generate(7)
    insert_rows(conn, rows)
    recompute_all(conn)
    clean = snapshot(conn)
    half = len(rows) // 2
    with conn.transaction():
        recompute_set(conn, dirty_ranges(rows[:half]))
        recompute_set(conn, dirty_ranges(rows[half:]))
        recompute_all(conn)
        recompute_all(conn)
    assert snapshot(conn) == clean
