"""ops/: Prometheus config and alert rules (promtool), Grafana dashboards, the statements timer.

The dashboards' PromQL is checked by promtool and their SQL runs against a real migrated database;
every metric named anywhere must exist in ops/metrics.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edge.metrics import EDGE_REGISTRY
from ops import metrics
from ops.cli import build_parser

OPS = Path(__file__).resolve().parent.parent / "ops"
PROM = OPS / "prometheus"
DASHBOARDS = sorted((OPS / "grafana" / "dashboards").glob("*.json"))
METRIC_RE = re.compile(r"\bscopemeter_[a-z0-9_]+\b")


def promtool(*args: str) -> str:
    r = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def known_metrics() -> set[str]:
    names = set()
    # The server processes' registries, and the edge agent's own.
    registries = [*metrics.REGISTRIES.values(), EDGE_REGISTRY]
    families = [f for registry in registries for f in registry.collect()]
    for family in families:
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_sum", "_count", "_created"):
            names.add(family.name + suffix)
    return names


def prom_exprs() -> list[str]:
    return [
        t["expr"]
        for d in DASHBOARDS
        for p in json.loads(d.read_text())["panels"]
        for t in p["targets"]
        if "expr" in t
    ]


def test_prometheus_config_and_rules_are_valid_and_alerts_fire() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "9 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_unit_test_and_names_real_metrics() -> None:
    text = (PROM / "alerts.yml").read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)", text, re.M)
    assert len(alerts) == 9
    tested = (PROM / "alerts_test.yml").read_text()
    for alert in alerts:
        assert f"alertname: {alert}" in tested, alert
    known = known_metrics()
    for name in METRIC_RE.findall(text):
        assert name in known, f"alerts.yml uses {name}, which ops/metrics.py does not define"


def test_dashboards_promql_is_valid_and_names_real_metrics(tmp_path: Path) -> None:
    exprs = prom_exprs()
    assert len(exprs) > 15
    known = known_metrics()
    for expr in exprs:
        for name in METRIC_RE.findall(expr):
            assert name in known, f"dashboard query uses {name}, which ops/metrics.py does not define"
    # promtool parses PromQL only in rule files: wrap each query in a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert f"{len(exprs)} rules found" in promtool("check", "rules", str(path))


def test_dashboards_use_provisioned_datasources_and_cover_the_issue() -> None:
    datasources = (OPS / "grafana/provisioning/datasources.yml").read_text()
    provisioned = set(re.findall(r"^\s*uid: ([\w-]+)", datasources, re.M))
    assert provisioned == {"scopemeter-prometheus", "scopemeter-postgres"}
    titles = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), path
        for p in d["panels"]:
            titles.append(p["title"].lower())
            assert p["datasource"]["uid"] in provisioned
            assert all(t["datasource"]["uid"] in provisioned for t in p["targets"])
    joined = " | ".join(titles)
    for topic in ("dlq", "consumer lag", "backlog", "kg co2e", "latency", "since last batch"):
        assert topic in joined, topic


def grafana_sql(raw: str) -> str:
    """Expand the Grafana macros the dashboards use into plain SQL."""
    raw = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '6 hours' AND now()", raw)
    return raw.replace("$site", "'s1', 's2'")


def test_dashboard_sql_runs_against_the_schema(pg_db: str) -> None:
    queries: list[str] = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        queries += [t["rawSql"] for p in d["panels"] for t in p["targets"] if "rawSql" in t]
        queries += [
            v["query"]
            for v in d["templating"]["list"]
            if v.get("datasource", {}).get("type", "").endswith("sql")
        ]
    assert len(queries) >= 5
    with psycopg.connect(pg_db) as conn:
        for q in queries:
            try:
                conn.execute(grafana_sql(q)).fetchall()
            finally:
                conn.rollback()


def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_statements_timer_runs_the_issue_command_monthly() -> None:
    service = _unit(OPS / "systemd" / "scopemeter-statements.service")
    timer = _unit(OPS / "systemd" / "scopemeter-statements.timer")
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/scopemeter")
    args: Any = build_parser().parse_args(argv[1:])
    assert (args.command, args.statements_command, args.month, args.email) == (
        "statements",
        "issue",
        "previous",
        True,
    )
    assert service["Type"] == ["oneshot"]
    assert timer["Persistent"] == ["true"]
    assert timer["OnCalendar"]
    for spec in timer["OnCalendar"]:
        r = subprocess.run(["systemd-analyze", "calendar", spec], capture_output=True, text=True)
        if r.returncode != 0 and "Failed to" in r.stderr and "bus" in r.stderr.lower():
            pytest.fail(f"systemd-analyze could not run: {r.stderr}")
        assert r.returncode == 0, r.stderr
        assert re.search(r"Next elapse: \w+ \d{4}-\d{2}-(02|09) 06:00:00 UTC", r.stdout), r.stdout
