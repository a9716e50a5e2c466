"""ops/settings.py is strict: unknown keys and SCOPEMETER_* variables that set nothing are errors
that name the variable and the closest real one; Kafka security settings are checked for sense."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ops.errors import UserError
from ops.kafka_client import client_kwargs
from ops.settings import DbSettings, KafkaSettings, Settings, env_names

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("SCOPEMETER_DB__DNS", "SCOPEMETER_DB__DSN"),
        ("SCOPEMETER_KAFKA_BOOTSTRAP", "SCOPEMETER_KAFKA__BOOTSTRAP"),
        ("SCOPEMETER_MQTT__PROT", "SCOPEMETER_MQTT__PORT"),
        ("SCOPEMETER_METRICS__BIND_ADDRESS", "SCOPEMETER_METRICS__BIND"),
    ],
)
def test_unknown_environment_variable_is_an_error_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, suggestion: str
) -> None:
    monkeypatch.setenv(variable, "x")
    with pytest.raises(UserError) as err:
        Settings()
    assert f"{variable} (did you mean {suggestion}?)" in str(err.value)


def test_every_real_variable_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEMETER_DB__DSN", "postgresql://u@h:1/d")
    monkeypatch.setenv("SCOPEMETER_KAFKA__BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("SCOPEMETER_METRICS__BIND", "0.0.0.0")
    monkeypatch.setenv("SCOPEMETER_CONFIG_DIR", "/etc/scopemeter")
    monkeypatch.setenv("SCOPEMETER_MQTT", '{"port": 8883}')  # a whole section as JSON
    s = Settings()
    assert (s.db.dsn, s.kafka.bootstrap, s.metrics.bind) == ("postgresql://u@h:1/d", "broker:9092", "0.0.0.0")
    assert s.config_dir == Path("/etc/scopemeter") and s.mqtt.port == 8883


def test_the_cli_refuses_a_typo_at_start_in_one_line() -> None:
    env = {**os.environ, "SCOPEMETER_DB__DNS": "postgresql://nowhere"}
    argv = [sys.executable, "-m", "ops.cli", "compute", "rebuild"]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "SCOPEMETER_DB__DNS (did you mean SCOPEMETER_DB__DSN?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_scopemeter_variable_the_repository_uses_is_a_setting() -> None:
    """Units, scripts, tests and tools set SCOPEMETER_* variables on purpose: each must set something."""
    import re

    used: set[str] = set()
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).parts
        if any(part.startswith(".") or part in {"node_modules", "__pycache__"} for part in rel):
            continue
        if path == Path(__file__).resolve():  # its typos are on purpose
            continue
        if path.is_file() and path.suffix in {".py", ".sh", ".service", ".timer", ".toml", ".yml", ""}:
            try:
                text = path.read_text()
            except (UnicodeDecodeError, PermissionError):
                continue
            used |= set(re.findall(r"\bSCOPEMETER_[A-Z0-9_]*[A-Z0-9]\b", text))
    # Not settings: the prefix itself in prose, and names of the variables' general shape.
    used -= {"SCOPEMETER_"}
    assert used, "found no SCOPEMETER_ variables at all"
    unknown = sorted(v for v in used if v not in env_names() and not v.endswith(("_SECTION", "_FIELD")))
    assert not unknown, f"variables that set no setting: {unknown}"


def test_sections_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="dns"):
        Settings(db={"dns": "postgresql://x"})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="bootstrap_servers"):
        KafkaSettings(bootstrap_servers="b:9092")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        DbSettings(reconnect_max_s=0)


def test_kafka_security_settings_must_make_sense() -> None:
    with pytest.raises(ValidationError, match="needs sasl_username and sasl_password"):
        KafkaSettings(security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="security_protocol is PLAINTEXT"):
        KafkaSettings(sasl_username="u", sasl_password="p")
    with pytest.raises(ValidationError, match="no TLS"):
        KafkaSettings(ssl_cafile=Path("/etc/ssl/ca.pem"), security_protocol="SASL_PLAINTEXT",
                      sasl_username="u", sasl_password="p")  # fmt: skip
    with pytest.raises(ValidationError, match="ssl_keyfile needs ssl_certfile"):
        KafkaSettings(security_protocol="SSL", ssl_keyfile=Path("/k.pem"))
    with pytest.raises(ValidationError, match="security_protocol"):
        KafkaSettings(security_protocol="TLS")  # type: ignore[arg-type]


def test_client_kwargs_carry_sasl_and_tls() -> None:
    plain = client_kwargs(KafkaSettings(bootstrap="b:9092"))
    assert plain == {"bootstrap_servers": "b:9092", "security_protocol": "PLAINTEXT"}
    secured = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
    )
    sasl = client_kwargs(secured)
    assert (sasl["sasl_mechanism"], sasl["sasl_plain_username"], sasl["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "u", "p",
    )  # fmt: skip
    context = sasl["ssl_context"]
    assert context.check_hostname  # brokers are verified, against the system store here
    with pytest.raises(FileNotFoundError):
        client_kwargs(KafkaSettings(security_protocol="SSL", ssl_cafile=Path("/nonexistent/ca.pem")))
