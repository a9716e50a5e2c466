"""The bridge's registry (ingest.registry): the identity check's exact answers for supplier, site and
gateway, and when the cache asks PostgreSQL again. Only PostgreSQL is needed (no brokers), so these
run fast enough to be the module's mutation tests (issue 17). The cache's clock is frozen and moved
by the test (``time.monotonic`` in the module), so no test waits for real seconds."""

from __future__ import annotations

import logging
import uuid

import psycopg
import pytest

import ingest.registry
from ingest.registry import MeterHome, Registry, RegistryCache, register_gateway
from ops.procs import free_port

REGISTRY = Registry(
    version=3,
    sites={"site-a": "sup-a", "site-b": "sup-b"},
    gateways={"gw-a": "site-a", "gw-b": "site-b"},
    meters={"m1": MeterHome("site-a", "gw-a")},
)


def test_identity_is_checked_on_supplier_site_and_gateway() -> None:
    assert REGISTRY.source_problem("sup-a", "site-a", "gw-a") == ""
    assert REGISTRY.source_problem("sup-a", "site-x", "gw-a") == "site 'site-x' is not in the fleet registry"
    assert REGISTRY.source_problem("sup-a", "site-b", "gw-b") == (
        "site 'site-b' belongs to supplier 'sup-b', not 'sup-a'"
    )
    assert REGISTRY.source_problem("sup-a", "site-a", "gw-x") == "gateway 'gw-x' is not in the fleet registry"
    assert REGISTRY.source_problem("sup-a", "site-a", "gw-b") == (
        "gateway 'gw-b' is registered to site 'site-b', not 'site-a'"
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(ingest.registry.time, "monotonic", c)
    return c


def test_the_cache_reloads_only_when_due_and_only_when_the_version_moved(pg_db: str, clock: Clock) -> None:
    tag = uuid.uuid4().hex[:8]
    cache = RegistryCache(pg_db, refresh_s=10.0)
    assert not cache.loaded() and cache.registry.version == -1
    try:
        with psycopg.connect(pg_db, autocommit=True) as conn:
            register_gateway(conn, f"s-{tag}", f"site-{tag}", f"gw-{tag}", [f"m-{tag}"])
            first = cache.refresh()
            assert cache.loaded() and first.version >= 0
            assert first.meters[f"m-{tag}"] == MeterHome(f"site-{tag}", f"gw-{tag}")
            assert first.sites[f"site-{tag}"] == f"s-{tag}" and first.gateways[f"gw-{tag}"] == f"site-{tag}"
            register_gateway(conn, f"s-{tag}", f"site-{tag}", f"gw2-{tag}", [])
            clock.t += 5.0
            assert cache.refresh() is first  # not due: refresh_s is 10 s
            clock.t += 0.5
            second = cache.refresh(soon=True)  # a batch named something unknown: look (≥ 1 s since)
            assert second is not first and second.version > first.version
            assert second.gateways[f"gw2-{tag}"] == f"site-{tag}"
            clock.t += 0.5
            register_gateway(conn, f"s-{tag}", f"site-{tag}", f"gw3-{tag}", [])
            assert cache.refresh(soon=True) is second  # at most once a second
            clock.t += 0.5
            third = cache.refresh(soon=True)
            assert f"gw3-{tag}" in third.gateways
            clock.t += 10.0
            assert cache.refresh() is third  # due, but the version did not move: no reload
    finally:
        cache.close()


def test_soon_never_waits_longer_than_the_refresh_interval(pg_db: str, clock: Clock) -> None:
    cache = RegistryCache(pg_db, refresh_s=0.2)
    try:
        first = cache.refresh()
        with psycopg.connect(pg_db, autocommit=True) as conn:
            tag = uuid.uuid4().hex[:8]
            register_gateway(conn, f"s-{tag}", f"site-{tag}", f"gw-{tag}", [])
        clock.t += 0.2
        assert cache.refresh(soon=True) is not first  # min(1 s, refresh_s)
    finally:
        cache.close()


def test_an_unreachable_database_keeps_the_last_registry_and_says_why(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RegistryCache(f"postgresql://nobody@127.0.0.1:{free_port()}/none", refresh_s=1.0)
    with caplog.at_level(logging.WARNING, logger="scopemeter.registry"):
        assert cache.refresh() is cache.registry and not cache.loaded()
    (record,) = caplog.records
    assert record.getMessage().startswith("fleet registry not refreshed (keeping v-1): connection")
    cache.close()


def test_the_cache_connection_is_bounded_and_never_left_in_a_transaction(pg_db: str, clock: Clock) -> None:
    """The bridge calls ``refresh`` between messages: a hanging DB may delay it 5 s at most, and an
    idle cache must not hold a transaction open (it would pin old row versions)."""
    cache = RegistryCache(pg_db, refresh_s=1.0)
    try:
        cache.refresh()
        conn = cache._connection()
        assert conn.autocommit is True
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.info.get_parameters()["connect_timeout"] == "5"
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
    finally:
        cache.close()


def test_a_loaded_registry_of_version_zero_counts_as_loaded() -> None:
    cache = RegistryCache("postgresql://unused", refresh_s=1.0)  # never connects here
    cache.registry = Registry(0)
    assert cache.loaded()
    cache.registry = Registry(-1)
    assert not cache.loaded()


def test_a_reload_is_logged_with_its_size(pg_db: str, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    cache = RegistryCache(pg_db, refresh_s=1.0)
    try:
        with caplog.at_level(logging.INFO, logger="scopemeter.registry"):
            r = cache.refresh()
        assert [rec.getMessage() for rec in caplog.records] == [
            f"fleet registry v{r.version}: {len(r.sites)} sites, {len(r.gateways)} gateways,"
            f" {len(r.meters)} meters"
        ]
    finally:
        cache.close()


def test_a_database_error_without_text_is_named_by_its_type(
    pg_db: str, clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fake: PostgreSQL always says something, but psycopg may raise an error with no message
    (a dropped connection); the warning then names the error's type rather than failing itself."""

    def silent(_conn: object) -> int:
        raise psycopg.OperationalError()

    monkeypatch.setattr(ingest.registry, "current_version", silent)
    cache = RegistryCache(pg_db, refresh_s=1.0)
    with caplog.at_level(logging.WARNING, logger="scopemeter.registry"):
        cache.refresh()
    assert [rec.getMessage() for rec in caplog.records] == [
        "fleet registry not refreshed (keeping v-1): OperationalError"
    ]
    cache.close()


def test_register_gateway_defaults(pg_db: str) -> None:
    tag = uuid.uuid4().hex[:8]
    with psycopg.connect(pg_db, autocommit=True) as conn:
        register_gateway(conn, f"s-{tag}", f"site-{tag}", f"gw-{tag}", [f"m-{tag}"])
        register_gateway(conn, f"s-{tag}", f"site-{tag}", f"gw-{tag}", [f"m-{tag}"])  # again: no error
        assert conn.execute(
            "SELECT carrier, model, site_id, gateway_id FROM meters WHERE meter_id = %s", (f"m-{tag}",)
        ).fetchall() == [("electricity", "synthetic", f"site-{tag}", f"gw-{tag}")]
        assert conn.execute(
            "SELECT supplier_id, name, grid_region FROM sites WHERE site_id = %s", (f"site-{tag}",)
        ).fetchall() == [(f"s-{tag}", f"site-{tag}", "CN")]
