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
