"""The statement signing key: outside the install directory by default, passphrase-protected from
the environment or a file (never the command line), and rotated so that old statements still
verify with the old public key — through the real CLI and a real PostgreSQL.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization

from compute.factors import apply_factors
from compute.fleet import apply_fleet
from compute.rebuild import recompute_all
from compute.recompute import Params
from compute.statements.config import load_statements_config
from compute.statements.document import (
    check_signature,
    key_id,
    keygen,
    load_private_key,
    load_public_key,
)
from compute.statements.issue import issue_month
from compute.statements.keys import ENV_PASSPHRASE, public_key_path, retired_public_key_path
from ops.cli import main
from ops.errors import UserError
from ops.settings import REPO_ROOT, Settings
from tests.test_compute_support import cn_grid_factor_toml, compute_dsn

__all__ = ["compute_dsn"]

ENV_KEY = "SCOPEMETER_STATEMENTS__SIGNING_KEY"
ENV_FILE = "SCOPEMETER_STATEMENTS__SIGNING_KEY_PASSPHRASE_FILE"


@pytest.fixture
def key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The key where the settings say (a temporary state dir), with a passphrase from the environment."""
    path = tmp_path / "state" / "statement-signing.key"
    monkeypatch.setenv(ENV_KEY, str(path))
    monkeypatch.setenv(ENV_PASSPHRASE, "correct horse battery staple")
    return path


def test_default_location_is_outside_the_install_directory(tmp_path: Path) -> None:
    default = Settings().statements.signing_key
    assert default == Path("/etc/scopemeter/statement-signing.key")
    assert REPO_ROOT not in default.parents
    # The shipped statements config names no key: the setting decides.
    cfg = load_statements_config(REPO_ROOT / "config" / "statements.toml")
    assert cfg.signing_key is None and cfg.key_path == default


def test_keygen_writes_an_encrypted_key_where_the_settings_say(key_env: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "statements.toml"
    cfg.write_text(f'outbox_dir = "{tmp_path / "outbox"}"\n')
    assert load_statements_config(cfg).key_path == key_env
    assert main(["statements", "keygen", "--config", str(cfg)]) == 0
    pem = key_env.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(key_env.stat().st_mode) == 0o600
    # The passphrase is what unlocks it; cryptography agrees independently of our loader.
    raw = serialization.load_pem_private_key(pem, password=b"correct horse battery staple")
    assert key_id(load_private_key(key_env).public_key()) == key_id(raw.public_key())  # type: ignore[arg-type]
    assert load_public_key(public_key_path(key_env)) == load_private_key(key_env).public_key()
    # Without --force an existing key is never replaced.
    assert main(["statements", "keygen", "--config", str(cfg)]) == 2
    assert key_env.read_bytes() == pem


def test_a_protected_key_needs_its_passphrase(key_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keygen(key_env)
    monkeypatch.delenv(ENV_PASSPHRASE)
    with pytest.raises(UserError, match=f"protected by a passphrase: set {ENV_PASSPHRASE}"):
        load_private_key(key_env)
    monkeypatch.setenv(ENV_PASSPHRASE, "wrong")
    with pytest.raises(UserError, match="wrong passphrase"):
        load_private_key(key_env)


def test_passphrase_from_a_file_and_never_from_the_command_line(
    key_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_PASSPHRASE)
    secret = tmp_path / "passphrase"
    secret.write_text("from a file\n")  # a trailing newline (echo, editors) is not part of it
    monkeypatch.setenv(ENV_FILE, str(secret))
    keygen(key_env)
    assert serialization.load_pem_private_key(key_env.read_bytes(), password=b"from a file") is not None
    assert load_private_key(key_env) is not None
    secret.write_text("")
    with pytest.raises(UserError, match=r"passphrase from .* is empty"):
        load_private_key(key_env)
    monkeypatch.setenv(ENV_PASSPHRASE, "both")
    with pytest.raises(ValueError, match="not both"):
        Settings()
    for cmd in ("keygen", "issue", "verify"):
        with pytest.raises(SystemExit):
            main(["statements", cmd, "--passphrase", "x"])


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "etc"
    not_a_dir.write_text("")  # (a permission error reads the same, but root ignores modes)
    with pytest.raises(UserError, match=r"cannot write the signing key .* statements\.signing_key"):
        keygen(not_a_dir / "scopemeter" / "statement-signing.key")


# --- rotation, with real statements ---------------------------------------------------------------

FLEET = """
[[suppliers]]
id = "acme"
name = "Acme"

[[sites]]
id = "s1"
supplier = "acme"
name = "Plant"
grid_region = "CN"

[[meters]]
id = "m1"
site = "s1"
carrier = "electricity"
model = "eastron_sdm630"
"""

FACTORS = cn_grid_factor_toml(0.5)


@pytest.fixture
def db(compute_dsn: str, tmp_path: Path) -> Iterator[str]:
    """September and October at 40 kW, every quarter hour: two complete months."""
    (tmp_path / "fleet.toml").write_text(FLEET)
    (tmp_path / "factors.toml").write_text(FACTORS)
    start, end, step = (
        datetime(2026, 9, 1, tzinfo=UTC),
        datetime(2026, 11, 1, tzinfo=UTC),
        timedelta(minutes=15),
    )
    with psycopg.connect(compute_dsn, autocommit=True) as conn:
        apply_fleet(conn, tmp_path / "fleet.toml")
        apply_factors(conn, tmp_path / "factors.toml")
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT scopemeter_ensure_partitions(%s, %s)", (start, end))
            with cur.copy(
                "COPY readings (meter_id, quantity, ts, value, quality, site_id, gateway_id, batch_seq)"
                " FROM STDIN"
            ) as cp:
                for i in range(int((end - start) / step) + 1):
                    cp.write_row(("m1", "energy_import_kwh", start + i * step, 10.0 * i, 0, "s1", "gw", 1))
        recompute_all(conn)
    yield compute_dsn


def _issue(db: str, cfg_path: Path, month: str) -> Path:
    cfg = load_statements_config(cfg_path)
    with psycopg.connect(db, autocommit=True) as conn:
        [res] = issue_month(
            conn, cfg, month, ["acme"], now=datetime(2026, 11, 5, tzinfo=UTC), params=Params(), progress=False
        )
    assert res.directory is not None
    return res.directory / "statement.json"


def test_rotation_old_statements_still_verify_with_the_old_public_key(
    db: str, key_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("SCOPEMETER_DB__DSN", db)
    cfg = tmp_path / "statements.toml"
    cfg.write_text(f'outbox_dir = "{tmp_path / "outbox"}"\n')
    assert main(["statements", "keygen", "--config", str(cfg)]) == 0
    old_pub = load_public_key(public_key_path(key_env))
    september = _issue(db, cfg, "2026-09")

    assert main(["statements", "keygen", "--config", str(cfg), "--force"]) == 0
    new_pub = load_public_key(public_key_path(key_env))
    assert new_pub != old_pub
    retired = retired_public_key_path(key_env, key_id(old_pub))
    assert load_public_key(retired) == old_pub
    october = _issue(db, cfg, "2026-10")

    # The old statement: valid with the retired public key, refused with the new one (naming both).
    sept_doc, oct_doc = json.loads(september.read_text()), json.loads(october.read_text())
    assert check_signature(sept_doc, old_pub) is None
    assert "not by the trusted key" in (check_signature(sept_doc, new_pub) or "")
    assert check_signature(oct_doc, new_pub) is None and check_signature(oct_doc, old_pub) is not None
    # The same through `statements verify` (signature, file hashes and a recompute from the readings).
    capsys.readouterr()
    assert (
        main(["statements", "verify", str(september), "--config", str(cfg), "--public-key", str(retired)])
        == 0
    )
    assert main(["statements", "verify", str(september), "--config", str(cfg)]) == 1
    assert main(["statements", "verify", str(october), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count(": valid") == 2 and ": invalid" in out
