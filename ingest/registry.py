"""The fleet registry as the bridge checks it: which supplier a site belongs to, which site a gateway
serves, and which site and gateway each meter is registered to.

The bridge holds one ``Registry`` in memory and asks the DB for the registry's version (a counter
that triggers on suppliers, sites, gateways and meters bump, migration 0007) every
``ingest.registry_refresh_s`` seconds, and right away (at most once a second) when a batch names
something it does not know; it reloads only when the version moved. While the DB is unreachable the
last registry stays in force.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ingest.dlq import Reason

log = logging.getLogger("scopemeter.registry")


@dataclass(frozen=True)
class MeterHome:
    site: str
    gateway: str | None  # None: any gateway of the site may read it


@dataclass(frozen=True)
class Registry:
    """The one in-memory view of the fleet registry: the bridge's checks (``ingest.validate``), and
    the paths that feed its output without being the bridge (imports, ``dlq replay``, Sparkplug)."""

    version: int = -1  # -1: not loaded yet
    sites: Mapping[str, str] = field(default_factory=dict)  # site → supplier
    gateways: Mapping[str, str] = field(default_factory=dict)  # gateway → site
    meters: Mapping[str, MeterHome] = field(default_factory=dict)
    site_tz: Mapping[str, str] = field(default_factory=dict)  # site → IANA zone (imports read local time)

    def source_problem(self, supplier: str, site: str, gateway: str) -> str:
        """Why ``supplier/site/gateway`` (a topic's identity) is not a registered source; '' if it is."""
        owner = self.sites.get(site)
        if owner is None:
            return f"site {site!r} is not in the fleet registry"
        if owner != supplier:
            return f"site {site!r} belongs to supplier {owner!r}, not {supplier!r}"
        home = self.gateways.get(gateway)
        if home is None:
            return f"gateway {gateway!r} is not in the fleet registry"
        if home != site:
            return f"gateway {gateway!r} is registered to site {home!r}, not {site!r}"
        return ""

    def meter_problem(self, meter: str, site: str, gateway: str | None) -> tuple[Reason, str] | None:
        """(reason, detail) when ``meter`` may not be reported for ``site`` by ``gateway`` (None: any
        gateway of the site, as an import has none); None when it may."""
        home = self.meters.get(meter)
        if home is None:
            return Reason.UNREGISTERED_METER, f"meter {meter!r} is not registered"
        if home.site != site or (gateway is not None and home.gateway not in (None, gateway)):
            return Reason.METER_SITE_MISMATCH, (
                f"meter {meter!r} is registered to site {home.site!r} gateway {home.gateway!r},"
                f" not {site!r} gateway {gateway!r}"
            )
        return None


def load(conn: psycopg.Connection[Any]) -> Registry:
    """The whole registry in one snapshot (one transaction, so version and rows agree)."""
    with conn.transaction():
        row = conn.execute("SELECT version FROM fleet_registry_version").fetchone()
        site_rows = conn.execute("SELECT site_id, supplier_id, timezone FROM sites").fetchall()
        gateways = dict(conn.execute("SELECT gateway_id, site_id FROM gateways").fetchall())
        meters = {
            m: MeterHome(s, g) for m, s, g in conn.execute("SELECT meter_id, site_id, gateway_id FROM meters")
        }
    sites = {site: supplier for site, supplier, _tz in site_rows}
    site_tz = {site: tz for site, _supplier, tz in site_rows}
    return Registry(int(row[0]) if row else 0, sites, gateways, meters, site_tz)


def current_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT version FROM fleet_registry_version").fetchone()
    return int(row[0]) if row else 0


class RegistryCache:
    """The bridge's registry, refreshed from ``dsn`` when its version changes.

    Synchronous on purpose: the queries are a single-row read every few seconds and a full read
    only after a fleet change; the bridge calls ``refresh`` between messages.
    """

    def __init__(self, dsn: str, refresh_s: float) -> None:
        self._dsn = dsn
        self._refresh_s = refresh_s
        self._conn: psycopg.Connection[Any] | None = None
        self._checked = 0.0
        self.registry = Registry(-1)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # Bounded waits: the bridge calls this between messages, so a DB that hangs (or a
            # TRUNCATE holding a lock) may delay a refresh but never stall the bridge for long.
            self._conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=5, options="-c statement_timeout=5000"
            )
        return self._conn

    def refresh(self, *, soon: bool = False) -> Registry:
        """Reload when the version moved; checked every ``refresh_s`` (every second when ``soon``)."""
        now = time.monotonic()
        if now - self._checked < (min(1.0, self._refresh_s) if soon else self._refresh_s):
            return self.registry
        self._checked = now
        try:
            conn = self._connection()
            if current_version(conn) != self.registry.version:
                self.registry = load(conn)
                log.info(
                    "fleet registry v%d: %d sites, %d gateways, %d meters", self.registry.version,
                    len(self.registry.sites), len(self.registry.gateways), len(self.registry.meters),
                )  # fmt: skip
        except psycopg.Error as exc:
            if self._conn is not None:
                self._conn.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("fleet registry not refreshed (keeping v%d): %s", self.registry.version, reason)
        return self.registry

    def loaded(self) -> bool:
        return self.registry.version >= 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def register_gateway(
    conn: psycopg.Connection[Any],
    supplier: str,
    site: str,
    gateway: str,
    meters: list[str],
    *,
    carrier: str = "electricity",
    model: str = "synthetic",
) -> None:
    """Register a gateway and its meters (and its site and supplier when missing), as the load
    generator and tests need: a real fleet is registered from ``config/fleet.toml`` instead."""
    conn.execute("INSERT INTO suppliers VALUES (%s, %s) ON CONFLICT DO NOTHING", (supplier, supplier))
    conn.execute(
        "INSERT INTO sites (site_id, supplier_id, name, grid_region) VALUES (%s, %s, %s, 'CN')"
        " ON CONFLICT DO NOTHING",
        (site, supplier, site),
    )
    conn.execute("INSERT INTO gateways VALUES (%s, %s) ON CONFLICT DO NOTHING", (gateway, site))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO meters (meter_id, site_id, gateway_id, carrier, model) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            [(m, site, gateway, carrier, model) for m in meters],
        )
