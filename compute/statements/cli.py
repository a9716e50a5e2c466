"""``scopemeter statements keygen|issue|verify``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ops.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("statements", help="monthly supplier emission statements: PDF + CSV + signed JSON")
    ssub = st.add_subparsers(dest="statements_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="default: CONFIG_DIR/statements.toml")

    keygen = ssub.add_parser(
        "keygen",
        help="create the Ed25519 signing key at the setting statements.signing_key, encrypted with"
        " the configured passphrase (never taken from the command line)",
    )
    common(keygen)
    keygen.add_argument(
        "--force", action="store_true", help="rotate: keep the old public key as KEY.<id>.pub, then replace"
    )
    keygen.set_defaults(handler=_keygen)

    issue = ssub.add_parser("issue", help="issue (or supersede) the statements of one month")
    common(issue)
    period = issue.add_mutually_exclusive_group(required=True)
    period.add_argument("--month", help="YYYY-MM, or 'previous' (the month before now)")
    period.add_argument("--year", help="YYYY: the annual statement, rolling up the year's months")
    issue.add_argument("--supplier", action="append", help="repeatable; default: every supplier")
    issue.add_argument("--email", action="store_true", help="also e-mail each new version to its recipients")
    issue.add_argument(
        "--force", action="store_true", help="issue a new version even if inputs are unchanged"
    )
    issue.add_argument(
        "--provisional",
        action="store_true",
        help="issue incomplete months too, marked PROVISIONAL on every page with the reasons",
    )
    issue.add_argument("--outbox", type=Path, help="override the config's outbox_dir")
    issue.set_defaults(handler=_issue)

    verify = ssub.add_parser(
        "verify",
        help="check statements as received (signature, renditions, latest version) and, with the"
        " database, recompute every figure",
    )
    common(verify)
    verify.add_argument(
        "files",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="the statement JSON, its PDF/CSV and optionally the signed index.json, any names; or folders",
    )
    verify.add_argument(
        "--public-key", type=Path, help="trusted key (default: the config's signing key .pub)"
    )
    verify.add_argument(
        "--offline", action="store_true", help="no database: signature, file hashes and index only"
    )
    verify.set_defaults(handler=_verify)


def _config(args: Any, settings: Settings) -> Any:
    from compute.statements.config import load_statements_config

    cfg = load_statements_config(args.config or settings.config_dir / "statements.toml")
    if getattr(args, "outbox", None):
        cfg = cfg.model_copy(update={"outbox_dir": args.outbox.resolve()})
    return cfg


def _keygen(args: Any) -> int:
    from compute.statements.document import fingerprint, keygen, load_public_key

    cfg = _config(args, Settings())
    pub = keygen(cfg.key_path, overwrite=args.force)
    print(f"signing key: {cfg.key_path}\npublic key (give this to customers): {pub}")
    print(f"fingerprint (every statement carries it): {fingerprint(load_public_key(pub))}")
    return 0


def _month(spec: str, settings: Settings) -> str:
    from compute.statements.figures import month_bounds, previous_month

    if spec == "previous":
        return previous_month(settings.clock.now().strftime("%Y-%m"))
    month_bounds(spec)
    return spec


def _year(spec: str) -> str:
    from compute.statements.figures import is_year, month_bounds

    if not is_year(spec):
        from ops.errors import UserError

        raise UserError(f"--year must be YYYY, not {spec!r}")
    month_bounds(spec)
    return spec


def _issue(args: Any) -> int:
    import sys

    import psycopg

    from compute.recompute import Params
    from compute.statements.issue import issue_month

    settings = Settings()
    cfg = _config(args, settings)
    month = _month(args.month, settings) if args.month else _year(args.year)
    with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
        results = issue_month(
            conn,
            cfg,
            month,
            args.supplier,
            now=settings.clock.now(),
            params=Params.from_settings(settings.compute),
            email=args.email,
            force=args.force,
            provisional=args.provisional,
            progress=sys.stderr.isatty(),
        )
    refused = False
    for r in results:
        if r.status in ("refused", "skipped"):
            period = "year" if len(r.month) == 4 else "month"
            what = f"refused Final ({period} incomplete)" if r.status == "refused" else "no statement"
            print(f"{r.supplier} {r.month}: {what}:")
            for reason in r.reasons:
                print(f"    {reason}")
            refused = refused or r.status == "refused"
            continue
        note = f", e-mailed to {', '.join(r.emailed_to)}" if r.emailed_to else ""
        kind = " PROVISIONAL" if r.provisional else ""
        print(f"{r.supplier} {r.month}: v{r.version}{kind} {r.status} → {r.directory}{note}")
        for reason in r.reasons:
            print(f"    incomplete: {reason}")
        for c in r.changes[:20]:
            print(f"    {c['figure']}: {c['old']:.6g} → {c['new']:.6g} ({c['delta']:+.6g})")
        if len(r.changes) > 20:
            print(f"    … and {len(r.changes) - 20} more changed figures (see the statement)")
    if refused:
        print("some months are incomplete: fix the data, or issue them with --provisional", file=sys.stderr)
    return 1 if refused else 0


def _verify(args: Any) -> int:
    from compute.statements.document import load_public_key, public_key_path
    from compute.statements.verify import verify_offline, verify_statement

    settings = Settings()
    if args.public_key is not None:
        trusted = load_public_key(args.public_key)
    else:
        trusted = load_public_key(public_key_path(_config(args, settings).key_path))
    if args.offline:
        results = verify_offline(args.files, trusted)
    else:
        import psycopg

        cfg = _config(args, settings)
        verify_offline(args.files, trusted)  # unreadable files are reported before touching the database
        with psycopg.connect(settings.db.dsn, autocommit=True) as conn:
            results = verify_statement(conn, args.files, trusted, cfg)
    for v in results:
        print(f"{v.path}: {v.status} ({v.statement_id}, key {v.fingerprint})")
        for p in v.problems:
            print(f"  {p}")
        for n in v.notes:
            print(f"  note: {n}")
        for c in v.differences[:50]:
            print(f"  {c['figure']}: signed {c['old']:.6g}, recomputed {c['new']:.6g} ({c['delta']:+.6g})")
        if len(v.differences) > 50:
            print(f"  … and {len(v.differences) - 50} more differing figures")
    return 0 if all(v.status == "valid" for v in results) else 1
