"""The compute package's sub-commands, wired through the same argparse registration as ``scopemeter``."""

from __future__ import annotations

import argparse
from pathlib import Path

import psycopg
import pytest

from compute import cli
from tests.test_compute_support import REPO, compute_dsn, reset

__all__ = ["compute_dsn"]


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="scopemeter")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def test_apply_and_rebuild(
    compute_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCOPEMETER_DB__DSN", compute_dsn)
    monkeypatch.setenv("SCOPEMETER_CONFIG_DIR", str(REPO / "config"))
    with psycopg.connect(compute_dsn) as conn:
        reset(conn)
    from compute.factors import load_factors
    from compute.fleet import load_fleet

    meters = len(load_fleet(REPO / "config" / "fleet.toml").meters)
    factors = len(load_factors(REPO / "config" / "factors.toml"))
    assert run("fleet", "apply") == 0
    assert f"meters: {meters} inserted" in capsys.readouterr().out
    assert run("factors", "apply", str(REPO / "config" / "factors.toml")) == 0
    assert f"emission_factors: {factors} inserted" in capsys.readouterr().out
    assert run("compute", "rebuild") == 0
    assert "rebuilt 0 meters" in capsys.readouterr().out


def test_bad_file_is_a_user_error(tmp_path: Path) -> None:
    from ops.errors import UserError

    bad = tmp_path / "fleet.toml"
    bad.write_text("[[meters]]\nid = 'm1'\n")
    with pytest.raises(UserError, match="meters"):
        run("fleet", "apply", str(bad))


def test_bench_compute_prints_the_measured_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("bench", "compute", "--meters", "4", "--readings", "200", "--repeat", "1") == 0
    out = capsys.readouterr().out
    assert "numba is" in out and "x pandas" in out


def test_bench_parser_is_shared_with_other_packages() -> None:
    import argparse

    from compute.cli import bench_subparsers, register

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    other = bench_subparsers(sub).add_parser("ingest")  # another package registered first
    other.set_defaults(handler="ingest")
    register(sub)
    assert parser.parse_args(["bench", "ingest"]).handler == "ingest"
    assert parser.parse_args(["bench", "compute"]).handler.__name__ == "_bench"
