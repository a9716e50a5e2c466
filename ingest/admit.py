"""The bridge's checks for one wire batch, plus the fleet-registry checks, for the paths that feed
the bridge's output without being the bridge: ``dlq replay``, the Sparkplug B host and imports.

This is a thin adapter over ``ingest.validate.classify`` (the bridge's own decision, unchanged) and
the fleet registry as it stands in the DB. It exists because ``classify`` on this branch does not
yet take the registry; the hook wanted from ``ingest.validate`` is
``classify(topic, payload, *, now, limits, registry) -> Accepted | DeadLetter`` with the registry
reasons (``unregistered_gateway``, ``unregistered_meter``, ``meter_site_mismatch``) in
``ingest.dlq.Reason``. Once that lands, ``admit`` should call it and ``Registry`` should be
``ingest.registry.Registry``; the reason names here are the same strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from edge.wire import check_batch
from ingest.dlq import DeadLetter, Reason
from ingest.validate import Accepted, classify
from ops.settings import IngestSettings

UNREGISTERED_GATEWAY = "unregistered_gateway"
UNREGISTERED_METER = "unregistered_meter"
METER_SITE_MISMATCH = "meter_site_mismatch"


@dataclass(frozen=True)
class MeterHome:
    site: str
    gateway: str | None  # None: any gateway of the site may read it


@dataclass(frozen=True)
class Registry:
    """The fleet registry as the checks need it, read from the DB in one snapshot."""

    sites: Mapping[str, str] = field(default_factory=dict)  # site → supplier
    site_tz: Mapping[str, str] = field(default_factory=dict)  # site → IANA zone
    gateways: Mapping[str, str] = field(default_factory=dict)  # gateway → site
    meters: Mapping[str, MeterHome] = field(default_factory=dict)

    def source_problem(self, supplier: str, site: str, gateway: str) -> str:
        """Why ``supplier/site/gateway`` is not a registered source; '' if it is."""
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

    def meter_problem(self, meter: str, site: str, gateway: str | None) -> tuple[str, str] | None:
        """(reason, detail) when ``meter`` may not be reported for ``site`` (and ``gateway``)."""
        home = self.meters.get(meter)
        if home is None:
            return UNREGISTERED_METER, f"meter {meter!r} is not in the fleet registry"
        if home.site != site or (gateway is not None and home.gateway not in (None, gateway)):
            return METER_SITE_MISMATCH, (
                f"meter {meter!r} is registered to site {home.site!r} gateway {home.gateway!r},"
                f" not {site!r} gateway {gateway!r}"
            )
        return None


def load_registry(conn: psycopg.Connection[Any]) -> Registry:
    with conn.transaction():
        sites = conn.execute("SELECT site_id, supplier_id, timezone FROM sites").fetchall()
        gateways = dict(conn.execute("SELECT gateway_id, site_id FROM gateways").fetchall())
        meters = {
            m: MeterHome(s, g) for m, s, g in conn.execute("SELECT meter_id, site_id, gateway_id FROM meters")
        }
    return Registry(
        sites={s: sup for s, sup, _ in sites},
        site_tz={s: tz for s, _, tz in sites},
        gateways=gateways,
        meters=meters,
    )


@dataclass(frozen=True)
class Refused:
    """A refusal: ``reason`` is a DLQ reason name (``ingest.dlq.Reason`` or a registry reason)."""

    reason: str
    detail: str


def admit(
    topic: str,
    payload: bytes,
    registry: Registry,
    *,
    now: datetime | None = None,
    limits: IngestSettings | None = None,
) -> Accepted | Refused:
    """The bridge's decision for ``payload`` on ``topic``, then every reading's meter checked against
    ``registry``. Total: never raises for anything a client sent."""
    decided = classify(topic, payload, now=now, limits=limits)
    if isinstance(decided, DeadLetter):
        return Refused(decided.reason.value, decided.detail)
    problem = registry.source_problem(decided.supplier, decided.site, decided.gateway)
    if problem:
        return Refused(UNREGISTERED_GATEWAY, problem)
    readings = check_batch(payload)["readings"]  # valid: classify accepted it
    for i, r in enumerate(readings):
        refused = registry.meter_problem(r["meter_id"], decided.site, decided.gateway)
        if refused is not None:
            return Refused(refused[0], f"readings[{i}]: {refused[1]}")
    return decided


def dead_letter(reason: str, detail: str, topic: str, payload: bytes) -> bytes:
    """A DLQ record in ``ingest.dlq.DeadLetter``'s format with any reason name (the registry reasons
    are not members of ``Reason`` on this branch); its other fields come from ``DeadLetter.of``."""
    record: dict[str, Any] = json.loads(DeadLetter.of(Reason.SCHEMA, detail, topic, payload).encode())
    record["reason"] = reason
    return json.dumps(record, separators=(",", ":")).encode()
