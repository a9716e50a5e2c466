"""The ``scopemeter`` command registers every group explicitly (a broken import is an error, never a
silently missing command), and a server command on a gateway install names the extra it needs."""

from __future__ import annotations

import argparse

import pytest

from ops import cli


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_command_group_is_registered() -> None:
    assert {"stack", "demo", "edge", "ingest", "bench", "db", "fleet", "factors", "instruments",
            "compute", "statements", "sim"} <= _commands(cli.build_parser())


def test_a_broken_import_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registrar whose module cannot import is an ImportError at start, not a missing command."""

    def broken(_sub: object) -> None:
        raise ImportError("cannot import name 'register' from 'ingest.cli'")

    monkeypatch.setattr(cli, "REGISTRARS", (*cli.REGISTRARS, broken))
    with pytest.raises(ImportError):
        cli.build_parser()


def _run_missing(monkeypatch: pytest.MonkeyPatch, module: str) -> int:
    """``scopemeter ingest`` whose handler meets a missing ``module``, as on a gateway install."""

    def handler(_args: object) -> int:
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    namespace = argparse.Namespace(command="ingest", handler=handler)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: namespace)
    return cli.main(["ingest"])


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Simulated: this venv has every extra, so the handler raises what the import would on a gateway.
    tests/test_edge_package.py runs the real wheel without the server extra."""
    assert _run_missing(monkeypatch, "aiokafka") == 2
    err = capsys.readouterr().err
    assert "needs aiokafka" in err and "pip install 'scopemeter[server]'" in err


def test_an_unknown_missing_module_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModuleNotFoundError):
        _run_missing(monkeypatch, "scopemeter_typo")
