"""The full rebuild (``scopemeter compute rebuild``): both 15-minute tables from every reading, in
one transaction, e.g. after the factor library or the fleet registry changed.

It shares the incremental path's pieces (``compute.recompute``: the window loader, the kernel call,
the meter-row COPY, the factor lookup and rollup merge) and differs where a whole table is written:
meter rows are compared with the stored ones and rewritten only where they differ (a factor change
leaves them all equal), the rollup tables are TRUNCATEd and bulk-loaded (``bulk_load``), and the
site sums are folded in numba from the meter rows still in memory, in the same order the incremental
path's SQL sums in, so both paths give bit-identical rows.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import psycopg
from psycopg import pq
from psycopg import sql as pgsql

from compute.kernels import BUCKET_MS, EVENT_NAMES, ordered_group_sums
from compute.market import rebuild_market
from compute.recompute import (
    _CLASS_KEY,
    _COPY_ENERGY,
    _COPY_HEADER,
    _COPY_TRAILER,
    _MERGE_ROLLUPS,
    _NO_JIT,
    _PG_EPOCH_US,
    _ROLLUP_TEMP_DDL,
    _STAGE_FACTORS,
    _TAILS,
    _TEMP_DDL,
    QUANTITY_OF_UNIT,
    Params,
    _compute_windows,
    _Computed,
    _energy_copy,
    _lap,
    _meters,
    _params,
    _rollup_args,
    _unregistered,
    copy_out,
)

# All sites and buckets: location and direct rows are rebuilt; rows of any other method are kept.
_DELETE_ROLLUPS_ALL = "DELETE FROM site_rollups_15m WHERE method IN ('location', 'direct')"
_OTHER_ROLLUPS = "SELECT EXISTS (SELECT 1 FROM site_rollups_15m WHERE method NOT IN ('location', 'direct'))"

log = logging.getLogger("scopemeter.compute")


@dataclass(frozen=True)
class RebuildResult:
    meters: int
    buckets: int
    rollups: int
    events: dict[str, int]
    readings: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step, for the benchmark


_NO_LIMIT: Final = np.iinfo(np.int64)
# The (meter, counter) series present in ``readings``, by a loose index scan of its primary key:
# one index descent per series (in every partition) instead of a scan of every reading.
_SERIES = """
WITH RECURSIVE p AS (
    (SELECT meter_id, quantity FROM readings ORDER BY meter_id, quantity LIMIT 1)
    UNION ALL
    SELECT n.meter_id, n.quantity FROM p CROSS JOIN LATERAL (
        SELECT x.meter_id, x.quantity FROM readings x
        WHERE (x.meter_id, x.quantity) > (p.meter_id, p.quantity)
        ORDER BY x.meter_id, x.quantity LIMIT 1) n
)
SELECT meter_id, quantity FROM p WHERE quantity = ANY(%s)
"""
# Each registered meter's activity class (the rollup's grouping, as ``_STAGE_ROLLUPS``).
_CLASSES = f"""
SELECT m.meter_id, {_CLASS_KEY}, m.site_id, m.carrier, coalesce(m.activity_unit, r.unit), m.cv_basis,
       m.reference_conditions, m.fuel_type, r.scope, r.method
FROM meters m
JOIN unnest(%(r_carrier)s::text[], %(r_unit)s::text[], %(r_scope)s::int[], %(r_method)s::text[])
     AS r(carrier, unit, scope, method) ON r.carrier = m.carrier
"""
_SUMS_TEMP_DDL: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS compute_classes (ci int, k text, site_id text, carrier text,"
    " unit text, cv_basis text, refc text, fuel_type text, scope int, method text) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS compute_rollup_sums (ci int, bucket timestamptz, kwh float8,"
    " est float8, measured_ms bigint) ON COMMIT DELETE ROWS",
)


def _swap(sql: str, old: str, new: str) -> str:
    """``sql`` with its one ``old`` part replaced (checked: a changed query fails at import)."""
    if sql.count(old) != 1:
        raise RuntimeError(f"expected one {old!r} in {sql!r}")
    return sql.replace(old, new)


# The rollup merge and factor lookup of the incremental path, read straight from the numba sums:
# no staging INSERT and no ANALYZE of 350k staged rows (a year of 10 sites). The factor days are
# every site-local day from a class's first to its last bucket (days without rows are looked up
# too and joined by nothing).
_SUMS_STAGE: Final = """(
    SELECT c.k, c.site_id, r.bucket, (r.bucket AT TIME ZONE s.timezone)::date AS day, c.carrier, c.unit,
           c.cv_basis, c.refc, c.fuel_type, c.scope, c.method, r.kwh, r.est, r.measured_ms
    FROM compute_rollup_sums r JOIN compute_classes c USING (ci) JOIN sites s ON s.site_id = c.site_id
) e"""
_SUMS_DAYS: Final = """(
    SELECT c.k, c.site_id, d.day::date AS day, c.carrier, c.unit, c.cv_basis, c.refc, c.fuel_type, c.scope
    FROM (SELECT ci, min(bucket) AS b0, max(bucket) AS b1 FROM compute_rollup_sums GROUP BY ci) r
    JOIN compute_classes c USING (ci) JOIN sites s ON s.site_id = c.site_id
    CROSS JOIN LATERAL generate_series((r.b0 AT TIME ZONE s.timezone)::date,
                                       (r.b1 AT TIME ZONE s.timezone)::date, interval '1 day') AS d(day)
) e"""
_FACTORS_OF_SUMS: Final = _swap(
    _STAGE_FACTORS,
    """(SELECT DISTINCT k, site_id, day, carrier, unit, cv_basis, refc, fuel_type, scope
      FROM compute_rollup_stage) e""",
    _SUMS_DAYS,
)
_MERGE_SUMS: Final = _swap(_MERGE_ROLLUPS, "FROM compute_rollup_stage e", "FROM " + _SUMS_STAGE)
_SUMS_ROW: Final = np.dtype(
    [
        ("n", ">i2"),
        ("l0", ">i4"),
        ("c", ">i4"),
        ("l1", ">i4"),
        ("b", ">i8"),
        ("l2", ">i4"),
        ("k", ">f8"),
        ("l3", ">i4"),
        ("e", ">f8"),
        ("l4", ">i4"),
        ("ms", ">i8"),
    ]
)


@contextmanager
def bulk_load(cur: psycopg.Cursor[Any], table: str) -> Iterator[None]:
    """A bulk load in the caller's transaction (PostgreSQL manual, "Populating a Database": remove
    indexes and foreign key constraints): ``table``'s primary key and foreign keys are dropped, and
    added back with their own definitions afterwards, so the key is built once and the references
    are validated by one join instead of one index insertion, uniqueness probe and trigger query
    per row. Takes an ACCESS EXCLUSIVE lock on ``table`` until commit; a violation raises when the
    constraints are added back, and the transaction rolls back."""
    constraints = cur.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = %s::regclass AND contype IN ('p', 'f') ORDER BY contype = 'f', conname",
        (table,),
    ).fetchall()
    name_of = pgsql.Identifier(table)
    for name, _ in reversed(constraints):
        cur.execute(pgsql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(name_of, pgsql.Identifier(name)))
    yield
    for name, definition in constraints:
        cur.execute(
            pgsql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(name_of, pgsql.Identifier(name))
            + pgsql.SQL(definition)
        )


def _rebuild_rollups(
    cur: psycopg.Cursor[Any],
    meter_ids: list[str],
    done: _Computed,
    args: dict[str, Any],
    phases: dict[str, float] | None = None,
) -> int:
    """Site rollups of the whole rebuild from the meter rows still in memory: summed per (class,
    bucket) by ``ordered_group_sums`` in ``meter_id`` code-point order (``meter_ids`` are sorted
    so), the order the incremental path's ``sum(… ORDER BY meter_id COLLATE "C")`` folds in, so
    both give bit-identical sums; then staged by one COPY and merged as ``_write_rollups`` does."""
    t = time.perf_counter()
    classes: dict[str, int] = {}
    class_rows: list[tuple[Any, ...]] = []
    cls_of_meter: dict[str, int] = {}
    for mid, k, *rest in cur.execute(_CLASSES, args).fetchall():
        if k not in classes:
            classes[k] = len(classes)
            class_rows.append((classes[k], k, *rest))
        cls_of_meter[mid] = classes[k]
    assert meter_ids == sorted(meter_ids), "the fold order is the meters' code-point order"
    cls_of_seg = np.array([cls_of_meter.get(m, -1) for m in meter_ids] + [-1], dtype=np.int64)
    cls = cls_of_seg[done.seg]
    take = np.flatnonzero(cls >= 0)
    if len(take) == 0:
        return 0
    cls, starts = cls[take], done.starts[take]
    b0 = int(starts.min())
    span = (int(starts.max()) - b0) // BUCKET_MS + 1
    key = cls * span + (starts - b0) // BUCKET_MS
    by_key = np.argsort(key, kind="stable")  # ties keep segment (= meter_id) order
    order = take[by_key]
    first, kwh, est, mms = ordered_group_sums(key[by_key], done.kwh[order], done.est[order], done.mms[order])
    rows = np.empty(len(first), dtype=_SUMS_ROW)
    rows["n"], rows["l0"], rows["l1"], rows["l2"], rows["l3"], rows["l4"] = 5, 4, 8, 8, 8, 8
    rows["c"] = cls_of_seg[done.seg[order[first]]]
    rows["b"] = done.starts[order[first]] * 1000 - _PG_EPOCH_US
    rows["k"], rows["e"], rows["ms"] = kwh, est, mms
    for ddl in (*_ROLLUP_TEMP_DDL, *_SUMS_TEMP_DDL):
        cur.execute(ddl)
    cur.execute("TRUNCATE compute_rollup_stage, compute_factor_days, compute_classes, compute_rollup_sums")
    with cur.copy("COPY compute_classes FROM STDIN") as copy:
        for r in class_rows:
            copy.write_row(r)
    with cur.copy("COPY compute_rollup_sums FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(_COPY_HEADER + rows.tobytes() + _COPY_TRAILER)
    _lap(phases, "site sums (numba, COPY in)", t)
    t = time.perf_counter()
    cur.execute("ANALYZE compute_rollup_sums")  # the merge joins it by hash
    _lap(phases, "site rollups (stage)", t)
    t = time.perf_counter()
    cur.execute(_FACTORS_OF_SUMS, args)
    cur.execute("ANALYZE compute_factor_days")
    _lap(phases, "site rollups (factors)", t)
    t = time.perf_counter()
    cur.execute(_MERGE_SUMS, args)
    _lap(phases, "site rollups (merge)", t)
    return cur.rowcount


# The stored meter rows with their window (the meter's index in ``{ids}``; -1: a meter the
# rebuild has no series for) as fixed-width binary rows (every column is NOT NULL): (window bigint,
# bucket timestamptz, kwh float8, kwh_estimated float8, measured_ms bigint, flags int4). The
# windows are a literal, not the temporary table, so another connection can run it.
_STORED_ROWS: Final = """
COPY (SELECT coalesce(w.i - 1, -1), me.bucket, me.kwh, me.kwh_estimated, me.measured_ms, me.flags
      FROM meter_energy_15m me LEFT JOIN unnest({ids}::text[]) WITH ORDINALITY AS w(meter_id, i)
           ON w.meter_id = me.meter_id)
TO STDOUT (FORMAT BINARY)
"""
_STORED: Final = np.dtype(
    [
        ("n", ">i2"),
        ("l0", ">i4"),
        ("i", ">i8"),
        ("l1", ">i4"),
        ("b", ">i8"),
        ("l2", ">i4"),
        ("k", ">f8"),
        ("l3", ">i4"),
        ("e", ">f8"),
        ("l4", ">i4"),
        ("ms", ">i8"),
        ("l5", ">i4"),
        ("f", ">i4"),
    ]
)
# Above this share of computed rows changed, the table is rewritten whole (TRUNCATE, COPY FREEZE,
# key built once) instead of deleting and inserting the changed meters' rows under the key. Near
# the break-even measured on 3.5 M rows (2 cores, wal_level=minimal): replacing 24 % of them took
# 2.6 s, rewriting all of them 2.6-3.3 s.
_REWRITE_SHARE: Final = 0.25


def _stored_rows(cur: psycopg.Cursor[Any], meter_ids: list[str]) -> np.ndarray:
    """Every ``meter_energy_15m`` row, with its window index, by one binary COPY."""
    ids = pgsql.Literal(meter_ids).as_string(cur.connection)
    data = copy_out(cur, _STORED_ROWS.format(ids=ids))
    body = len(data) - len(_COPY_HEADER) - len(_COPY_TRAILER)
    n = body // _STORED.itemsize
    if not data.startswith(_COPY_HEADER) or not data.endswith(_COPY_TRAILER) or body != n * _STORED.itemsize:
        raise RuntimeError("unexpected COPY BINARY framing of meter_energy_15m from PostgreSQL")
    rows = np.frombuffer(data, dtype=_STORED, count=n, offset=len(_COPY_HEADER))
    if n and not (rows["n"] == 6).all():
        raise RuntimeError("meter_energy_15m rows are not the expected six non-NULL columns")
    return rows


def _stored_rows_aside(conn: psycopg.Connection[Any], meter_ids: list[str]) -> np.ndarray:
    """``_stored_rows`` over a second connection to the same database, so that PostgreSQL reads
    the meter rows on another core while the rebuild's own connection loads the readings and
    writes the rollups (the client waits in libpq without the GIL). It sees what the rebuild
    sees only because the rebuild made no change of its own before and holds an EXCLUSIVE lock on
    ``meter_energy_15m`` (no writer commits in between); ``recompute_all`` reads aside only then."""
    with psycopg.connect(conn.info.dsn, password=conn.info.password) as aside, aside.cursor() as cur:
        cur.execute("SET jit = off")
        return _stored_rows(cur, meter_ids)


def _aside_or_here(aside: Future[np.ndarray], cur: psycopg.Cursor[Any], meter_ids: list[str]) -> np.ndarray:
    """The rows read aside; when the second connection failed (the database's or the role's
    connection limit reached, a pooler refusing, a dropped link) they are read again over the
    rebuild's own connection: slower, the same rows, and the rebuild goes on."""
    try:
        return aside.result()
    except psycopg.OperationalError as err:
        log.warning("meter rows read over the rebuild's own connection (a second one failed: %s)", err)
        return _stored_rows(cur, meter_ids)


def _changed_windows(done: _Computed, stored: np.ndarray, g_n: int) -> tuple[np.ndarray, int]:
    """Per window: do its stored rows differ from the computed ones (another set of buckets, or
    any value not bit for bit equal)? And how many stored rows belong to no window (their meter
    has no series any more): those must go too."""
    win = stored["i"].astype(np.int64)
    orphans = int(np.count_nonzero(win < 0))
    mine = win >= 0
    # plain native-endian columns first: indexing the structured rows would copy whole records
    win, b_us = win[mine], stored["b"].astype(np.int64)[mine]
    kwh = stored["k"].astype(np.float64)[mine].view(np.int64)  # compared bit for bit
    est = stored["e"].astype(np.float64)[mine].view(np.int64)
    mms, flags = stored["ms"].astype(np.int64)[mine], stored["f"].astype(np.int64)[mine]
    if (
        len(win) > 1 and not ((win[1:] > win[:-1]) | ((win[1:] == win[:-1]) & (b_us[1:] > b_us[:-1]))).all()
    ):  # physical order: sorted already after a rewrite, not after incremental recomputes
        by = np.lexsort((b_us, win))
        win, b_us, kwh, est, mms, flags = win[by], b_us[by], kwh[by], est[by], mms[by], flags[by]
    same = np.bincount(win, minlength=g_n) == done.written
    s, c = same[win], same[done.seg]  # windows with as many stored rows as computed: aligned row by row
    differs = (
        (b_us[s] != done.starts[c] * 1000 - _PG_EPOCH_US)
        | (kwh[s] != np.ascontiguousarray(done.kwh[c]).view(np.int64))
        | (est[s] != np.ascontiguousarray(done.est[c]).view(np.int64))
        | (mms[s] != done.mms[c])
        | (flags[s] != done.flags[c])
    )
    changed = ~same
    changed[done.seg[c][differs]] = True
    return changed, orphans


def _write_meter_rows(
    cur: psycopg.Cursor[Any],
    meter_ids: list[str],
    done: _Computed,
    stored: Callable[[], np.ndarray] | None,
    phases: dict[str, float],
) -> None:
    """Make ``meter_energy_15m`` hold exactly the computed rows. Meter energy depends on the
    readings and the meters' counter parameters only, not on factors, so a rebuild after a factor
    change finds every row already right: the stored rows are read back (one COPY, cheaper than
    writing them and building their key) and compared bit for bit, and only the rows of meters
    that differ are replaced. When many differ (or the table is empty) it is rewritten whole:
    TRUNCATE, COPY FREEZE (PostgreSQL manual, "Populating a Database"; with ``wal_level =
    minimal`` neither the rows nor the key are WAL-logged) and the key built once. ``stored``
    gives the stored rows (``_stored_rows``); None: the table is empty."""
    t = time.perf_counter()
    changed, orphans = np.ones(len(meter_ids), dtype=bool), 0
    if stored is not None:
        changed, orphans = _changed_windows(done, stored(), len(meter_ids))
    _lap(phases, "meter rows (compare)", t)
    t = time.perf_counter()
    take = changed[done.seg]
    if stored is not None and np.count_nonzero(take) <= _REWRITE_SHARE * len(take):
        if orphans:
            cur.execute(
                "DELETE FROM meter_energy_15m me"
                " WHERE NOT EXISTS (SELECT 1 FROM compute_windows w WHERE w.meter_id = me.meter_id)"
            )
        if changed.any():
            cur.execute(
                "DELETE FROM meter_energy_15m WHERE meter_id = ANY(%s)",
                ([meter_ids[g] for g in np.flatnonzero(changed)],),
            )
            rows = _energy_copy(
                meter_ids, done.seg[take], done.starts[take], done.kwh[take], done.est[take],
                done.mms[take], done.flags[take],
            )  # fmt: skip
            with cur.copy(_COPY_ENERGY) as copy:
                copy.write(rows)
        _lap(phases, "meter rows (COPY in)", t)
        phases.setdefault("meter rows (primary key)", 0.0)
        return
    cur.execute("TRUNCATE meter_energy_15m")
    with bulk_load(cur, "meter_energy_15m"):
        with cur.copy(_COPY_ENERGY.replace("(FORMAT BINARY)", "(FORMAT BINARY, FREEZE)")) as copy:
            copy.write(
                _energy_copy(meter_ids, done.seg, done.starts, done.kwh, done.est, done.mms, done.flags)
            )
        _lap(phases, "meter rows (COPY in)", t)
        t = time.perf_counter()
    _lap(phases, "meter rows (primary key)", t)


def recompute_all(
    conn: psycopg.Connection[Any], params: Params | None = None, *, factor_series: str | None = None
) -> RebuildResult:
    """Rebuild both 15-minute tables from every reading, in one transaction (e.g. after the factor
    library or the fleet registry changed). Incremental recomputes wait for it. Set-based like
    ``recompute_set``: every reading in one binary COPY, one kernel call, the stored meter rows
    compared with the computed ones and only differing meters replaced (``_write_meter_rows``),
    site sums folded in numba and staged by one COPY, one rollup INSERT."""
    params = _params(params, factor_series)
    phases: dict[str, float] = {}
    _TAILS.clear()
    t = time.perf_counter()
    aside = conn.info.transaction_status == pq.TransactionStatus.IDLE  # no change of its own yet
    with ThreadPoolExecutor(1) as pool, conn.transaction(), conn.cursor() as cur:
        cur.execute(_TEMP_DDL)
        cur.execute(
            "TRUNCATE compute_windows"
        )  # a caller's outer transaction may hold rows of an earlier call
        cur.execute(_NO_JIT)
        cur.execute("LOCK TABLE meter_energy_15m, site_rollups_15m IN EXCLUSIVE MODE")
        cur.execute("SET LOCAL maintenance_work_mem = '256MB'")  # the primary keys are built in memory
        pairs = sorted(cur.execute(_SERIES, (sorted(set(QUANTITY_OF_UNIT.values())),)).fetchall())
        known = _meters(cur, sorted({p[0] for p in pairs}), params)
        chosen = [(mid, q, known.get(mid) or _unregistered("", params)) for mid, q in pairs]
        chosen = [c for c in chosen if c[2].quantity == c[1]]
        meter_ids = [c[0] for c in chosen]
        stored: Callable[[], np.ndarray] | None = None
        if cur.execute("SELECT EXISTS (SELECT 1 FROM meter_energy_15m)").fetchone() == (True,):
            if aside:
                reading = pool.submit(_stored_rows_aside, conn, meter_ids)
                stored = functools.partial(_aside_or_here, reading, cur, meter_ids)
            else:
                stored = functools.partial(_stored_rows, cur, meter_ids)
        cur.execute(
            "INSERT INTO compute_windows (i, meter_id, quantity, b0, b1, lo, hi)"
            " SELECT i - 1, m, q, '-infinity', 'infinity', '-infinity', 'infinity'"
            " FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS u(m, q, i)",
            ([c[0] for c in chosen], [c[1] for c in chosen]),
        )
        cur.execute("ANALYZE compute_windows")  # else the planner hashes every reading, spilling to disk
        cur.execute("DELETE FROM quarantined_readings")
        _lap(phases, "windows", t)
        g_n = len(chosen)
        done = _compute_windows(
            cur,
            meter_ids,
            [c[1] for c in chosen],
            [c[2] for c in chosen],
            (np.full(g_n, _NO_LIMIT.min, dtype=np.int64), np.full(g_n, _NO_LIMIT.max, dtype=np.int64)),
            phases,
            None,
            whole=True,
        )
        t = time.perf_counter()
        args = _rollup_args(params)
        # Only compute writes location and direct rows; rows of other methods (none are written
        # since market-based hours moved to site_market_1h) are kept by a DELETE instead.
        (foreign,) = cur.execute(_OTHER_ROLLUPS).fetchone() or (True,)
        cur.execute(_DELETE_ROLLUPS_ALL if foreign else "TRUNCATE site_rollups_15m")
        with bulk_load(cur, "site_rollups_15m"):
            _lap(phases, "site rollups (delete)", t)
            rollups = _rebuild_rollups(cur, [c[0] for c in chosen], done, args, phases)
            t = time.perf_counter()
        _lap(phases, "site rollups (keys)", t)
        t = time.perf_counter()
        rebuild_market(cur)
        _lap(phases, "market-based hours", t)
        # last: rollups and market hours come from ``done``, so the rows read aside have had time
        _write_meter_rows(cur, meter_ids, done, stored, phases)
        t = time.perf_counter()
    _lap(phases, "commit", t)
    events = (
        dict(zip(EVENT_NAMES, (int(v) for v in done.events.sum(axis=0)), strict=True))
        if g_n
        else {n: 0 for n in EVENT_NAMES}
    )
    return RebuildResult(g_n, int(done.written.sum()), rollups, events, int(done.loaded.sum()), phases)
