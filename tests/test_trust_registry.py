"""The bridge's registry cache against a real PostgreSQL: loads, follows changes, survives outages."""

from __future__ import annotations

import logging
import uuid

import psycopg
import pytest

from ingest.registry import MeterHome, RegistryCache, register_gateway
from ops.settings import Settings


def test_the_cache_follows_registry_changes_and_keeps_the_last_one_in_an_outage(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    cache = RegistryCache(settings.db.dsn, refresh_s=1e-6)  # look every time: no waiting in the test
    try:
        with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
            register_gateway(conn, f"sup-{tag}", f"site-{tag}", f"gw-{tag}", [f"m-{tag}"])
            first = cache.refresh()
            assert cache.loaded()
            assert first.meters[f"m-{tag}"] == MeterHome(f"site-{tag}", f"gw-{tag}")
            assert first.source_problem(f"sup-{tag}", f"site-{tag}", f"gw-{tag}") == ""
            assert cache.refresh() is first  # nothing changed: no reload
            # The meter moves to another site (a fleet change): the next refresh sees it.
            register_gateway(conn, f"sup-{tag}", f"site2-{tag}", f"gw2-{tag}", [])
            conn.execute("UPDATE meters SET site_id = %s, gateway_id = %s WHERE meter_id = %s",
                         (f"site2-{tag}", f"gw2-{tag}", f"m-{tag}"))  # fmt: skip
            second = cache.refresh()
            assert second.version > first.version
            assert second.meters[f"m-{tag}"] == MeterHome(f"site2-{tag}", f"gw2-{tag}")
        cache._dsn = "postgresql://scopemeter:scopemeter@127.0.0.1:1/none"  # the DB goes away
        if cache._conn is not None:
            cache._conn.close()
        with caplog.at_level(logging.WARNING, logger="scopemeter.registry"):
            assert cache.refresh() is second  # the last registry stays in force
        assert "not refreshed" in caplog.text
    finally:
        cache.close()
