"""The fleet registry: strict validation (bar three simulation keys) and idempotent upserts."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from compute.config import ConfigError
from compute.fleet import apply_fleet, load_fleet
from tests.test_compute_support import REPO, compute_dsn, reset

__all__ = ["compute_dsn"]

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "s1"
supplier = "acme"
name = "Site 1"
grid_region = "CN"
timezone = "Asia/Shanghai"

[[gateways]]
id = "gw1"
site = "s1"

[[meters]]
id = "m1"
site = "s1"
gateway = "gw1"
carrier = "electricity"
model = "eastron_sdm630"
unit_id = 1
{meter_extra}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def fleet(tmp_path: Path, meter_extra: str = "", replace: tuple[str, str] = ("", "")) -> Path:
    return write(tmp_path, FLEET.format(meter_extra=meter_extra).replace(*replace))


def test_repo_fleet_loads() -> None:
    f = load_fleet(REPO / "config" / "fleet.toml")
    assert {m.site for m in f.meters} <= {s.id for s in f.sites}


def test_simulation_keys_tolerated_other_extras_rejected(tmp_path: Path) -> None:
    ok = load_fleet(fleet(tmp_path, 'profile = "hvac"\nbase_kw = 1.0\npeak_kw = 2.0'))
    assert ok.meters[0].id == "m1"
    with pytest.raises(ConfigError, match=r"\[\[meters\]\] #1 \(id='m1'\): colour: Extra inputs"):
        load_fleet(fleet(tmp_path, 'colour = "red"'))
    with pytest.raises(ConfigError, match="profile"):
        load_fleet(fleet(tmp_path, replace=('timezone = "Asia/Shanghai"', 'timezone = "UTC"\nprofile = "x"')))


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (('supplier = "acme"', 'supplier = "nobody"'), "site 's1': unknown supplier 'nobody'"),
        (
            ('[[gateways]]\nid = "gw1"\nsite = "s1"', '[[gateways]]\nid = "gw1"\nsite = "s9"'),
            "unknown site 's9'",
        ),
        (('gateway = "gw1"', 'gateway = "gw9"'), "meter 'm1': unknown gateway 'gw9'"),
        (('timezone = "Asia/Shanghai"', 'timezone = "Mars/Olympus"'), "unknown IANA timezone"),
        (('carrier = "electricity"', 'carrier = "vibes"'), "carrier"),
        (("unit_id = 1", "unit_id = 999"), "unit_id"),
    ],
)
def test_inconsistent_fleet_rejected(tmp_path: Path, replace: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_fleet(fleet(tmp_path, replace=replace))


def test_gateway_of_another_site_rejected(tmp_path: Path) -> None:
    text = FLEET.format(meter_extra="") + (
        '\n[[sites]]\nid = "s2"\nsupplier = "acme"\nname = "Site 2"\ngrid_region = "CN"\n'
        '\n[[meters]]\nid = "m2"\nsite = "s2"\ngateway = "gw1"\ncarrier = "electricity"\nmodel = "x"\n'
    )
    with pytest.raises(ConfigError, match="meter 'm2' is at site 's2' but its gateway 'gw1' is at site 's1'"):
        load_fleet(write(tmp_path, text))


def test_apply_upserts_and_reports(compute_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
        first = apply_fleet(conn, REPO / "config" / "fleet.toml")
        assert first.inserted["meters"] == 4 and first.updated["meters"] == 0
        again = apply_fleet(conn, REPO / "config" / "fleet.toml")
        assert sum(again.inserted.values()) == 0 and sum(again.updated.values()) == 0
        # A smaller file with a renamed site: the upsert updates, and nothing is silently deleted.
        path = fleet(tmp_path, replace=('name = "Site 1"', 'name = "Site One"'))
        small = apply_fleet(conn, path)
        assert small.inserted["sites"] == 1
        assert "sz-plant-1" in small.not_in_file["sites"]
        assert len(small.not_in_file["meters"]) == 4
        renamed = apply_fleet(conn, fleet(tmp_path, replace=('name = "Site 1"', 'name = "Site 1b"')))
        assert renamed.updated["sites"] == 1
        row = conn.execute(
            "SELECT carrier, model, unit_id, ct_ratio FROM meters WHERE meter_id='m1'"
        ).fetchone()
        assert row == ("electricity", "eastron_sdm630", 1, 1.0)
