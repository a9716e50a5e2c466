"""The edge agent's Prometheus endpoint serves what operations alert on, and config checks that
catch wiring mistakes a plant engineer can make."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge import metrics
from edge.config import EdgeConfigError, load_edge_config
from ops.procs import free_port
from tests.test_edge_agent import agent_with_simulator, broker_port, setup

__all__ = ["broker_port"]  # the fixture, re-used


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def test_metrics_endpoint_counts_polls_and_reports_an_empty_outbox(tmp_path: Path, broker_port: int) -> None:
    polls, modbus_port, metrics_port = 3, free_port(), free_port()
    config, settings = setup(tmp_path, broker_port, modbus_port)
    config = config.model_copy(update={"metrics_port": metrics_port})
    polls_before = metrics.EDGE_POLLS._value.get()
    published_before = metrics.EDGE_PUBLISHED_BATCHES._value.get()

    report, _sim = asyncio.run(agent_with_simulator(config, settings, polls, modbus_port))

    scraped = _scrape(metrics_port)  # the server thread outlives the run, as in a long-lived agent
    assert report.polls == polls
    assert scraped["scopemeter_edge_polls_total"] == polls_before + polls
    assert scraped["scopemeter_edge_published_batches_total"] == published_before + report.batches_published
    assert scraped["scopemeter_edge_outbox_batches"] == 0
    # /healthz follows the MQTT session: the run connected, then disconnected at its end.
    with pytest.raises(urllib.error.HTTPError) as down:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5)
    assert down.value.code == 503
    state = json.loads(down.value.read())
    assert state["status"] == "down" and state["dependencies"]["mqtt"].startswith("disconnected")


def _scrape_all(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_per_meter_metrics_show_which_meter_fails_and_only_edge_metrics_are_served(
    tmp_path: Path, broker_port: int
) -> None:
    polls, modbus_port, metrics_port = 3, free_port(), free_port()
    config, settings = setup(tmp_path, broker_port, modbus_port, ghost=True)
    config = config.model_copy(update={"metrics_port": metrics_port})
    errors = metrics.EDGE_POLL_ERRORS.labels(config.gateway, "sz1-ghost", "exception_11")
    errors_before = errors._value.get()  # counters are per process: other tests ran this meter too
    asyncio.run(agent_with_simulator(config, settings, polls, modbus_port))
    scraped = _scrape_all(metrics_port)

    def sample(name: str, meter: str, **labels: str) -> float | None:
        key = frozenset({"gateway": config.gateway, "meter": meter, **labels}.items())
        return scraped.get((name, key))

    status = "scopemeter_edge_meter_status"
    assert sample(status, "sz1-ghost", scopemeter_edge_meter_status="failed") == 1
    assert sample(status, "sz1-hvac", scopemeter_edge_meter_status="ok") == 1
    assert sample("scopemeter_edge_meter_consecutive_failures", "sz1-ghost") == polls
    assert sample("scopemeter_edge_meter_consecutive_failures", "sz1-hvac") == 0
    assert sample("scopemeter_edge_meter_last_success_timestamp_seconds", "sz1-ghost") is None
    assert (sample("scopemeter_edge_meter_last_success_timestamp_seconds", "sz1-hvac") or 0) > 0
    # The simulator answers an absent unit like a TCP gateway: exception 11, once per poll.
    assert (
        sample("scopemeter_edge_poll_errors_total", "sz1-ghost", kind="exception_11") == errors_before + polls
    )
    # The edge's own families, plus the dependency gauge every process serves beside /healthz.
    families = {name.split("_")[1] for name, _ in scraped if name.startswith("scopemeter_")}
    assert families == {"edge", "dependency"}


def test_mixed_transports_on_one_endpoint_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "gw.toml"
    bad.write_text(
        "supplier = 'acme'\nsite = 'x'\ngateway = 'gw'\n"
        "[[meters]]\nid = 'm1'\nhost = 'h'\nport = 502\nunit_id = 1\nmodel = 'eastron_sdm630'\n"
        "[[meters]]\nid = 'm2'\nhost = 'h'\nport = 502\nunit_id = 2\nmodel = 'eastron_sdm120'\n"
        "transport = 'rtu_over_tcp'\n"
    )
    with pytest.raises(EdgeConfigError, match="must share one transport"):
        load_edge_config(bad)
