"""The one settings model for every scopemeter process.

Values come from (highest first) environment variables ``SCOPEMETER_<SECTION>__<FIELD>``
(e.g. ``SCOPEMETER_DB__DSN``), then defaults. The defaults are the embedded stack that
``scopemeter stack up`` starts on this machine, so nothing needs configuring for the demo.

Strict on purpose: a section rejects keys it does not have, and a ``SCOPEMETER_*`` variable that
sets nothing stops the process at start, naming the closest real variable. A typo would otherwise
leave the default in place without a word (a misspelt DSN variable: the local default database).
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ops.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "SCOPEMETER_"


class Section(BaseModel):
    """A settings section: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class MqttSettings(Section):
    host: str = "127.0.0.1"
    # The project's own Mosquitto listens here, beside any broker the machine already runs on 1883.
    port: int = 18883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    # Bridges share the subscription so that more of them split the load.
    share_group: str = "ingest"


class KafkaSettings(Section):
    bootstrap: str = "127.0.0.1:19092"
    readings_topic: str = "readings.v1"
    dlq_topic: str = "readings.dlq.v1"
    committed_topic: str = "readings.committed.v1"
    partitions: int = 4
    # Replicas of each topic `stack up` creates; unset: 3, or every broker of a smaller cluster
    # (1 on the embedded node). Production sets min.insync.replicas=2 on the brokers.
    replication_factor: int | None = Field(default=None, ge=1)
    # The largest record the bridge produces and the topics accept (the bridge's MQTT batches).
    max_message_bytes: int = 8 * 1024 * 1024
    writer_group: str = "writer"
    compute_group: str = "compute"
    # How long a consumer's fetch may wait for data. With Kafka's 500 ms default a record waited
    # ~50 ms (now and then 300 ms) in the broker before the consumer had it; with 50 ms, 2-10 ms
    # (measured). An idle consumer then asks 20 times a second, which costs nothing noticeable.
    fetch_max_wait_ms: int = 50
    # Client security, as the brokers' listener wants it (ops.kafka_client.client_kwargs applies it
    # to every producer, consumer and admin client).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    # CA bundle that signed the brokers' certificates (unset: the system's trust store).
    ssl_cafile: Path | None = None
    # Client certificate and key, for brokers that require mutual TLS.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaSettings:
        protocol = self.security_protocol
        sasl = protocol.startswith("SASL_")
        if sasl and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(f"security_protocol {protocol} needs sasl_username and sasl_password")
        if not sasl and (self.sasl_username is not None or self.sasl_password is not None):
            raise ValueError(f"sasl_username/sasl_password are set but security_protocol is {protocol}")
        tls_files = {"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile}
        tls_files["ssl_keyfile"] = self.ssl_keyfile
        given = [name for name, path in tls_files.items() if path is not None]
        if given and not protocol.endswith("SSL"):
            raise ValueError(f"{', '.join(given)} set but security_protocol is {protocol} (no TLS)")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile")
        return self


class DbSettings(Section):
    """The embedded default is the machine's Debian PostgreSQL with the ``scopemeter`` role that
    ``make services`` (ops/ensure-services.sh) creates: password auth on loopback, as Debian ships it."""

    dsn: str = "postgresql://scopemeter:scopemeter@127.0.0.1:5432/scopemeter"
    # Used only to create (and, in tests, drop) databases; the role needs CREATEDB.
    admin_dsn: str = "postgresql://scopemeter:scopemeter@127.0.0.1:5432/postgres"
    # The writer and the compute worker outlive PostgreSQL: after a failure they reconnect after
    # 0.5 s, 1 s, 2 s … at most this long between attempts.
    reconnect_max_s: float = Field(default=30.0, gt=0)


class ClockSettings(Section):
    """Accelerated time for simulations: every process given the same values agrees on 'now'.

    sim_now = sim_start + (wall_now - wall_start) * speed.  Real UTC when ``speed`` is 1 and
    ``sim_start`` is unset.
    """

    speed: float = Field(default=1.0, gt=0)
    sim_start: datetime | None = None
    wall_start: float | None = None

    @model_validator(mode="after")
    def _anchor(self) -> ClockSettings:
        # A simulated start without a wall anchor is anchored once, here: time then moves.
        if self.sim_start is not None and self.wall_start is None:
            self.wall_start = time.time()
        return self

    def now(self) -> datetime:
        if self.sim_start is None or self.wall_start is None:
            return datetime.now(UTC)
        return self.sim_start + (time.time() - self.wall_start) * self.speed * _SECOND

    def sleep_sim(self, sim_seconds: float) -> None:
        time.sleep(sim_seconds / self.speed)


_SECOND = datetime(2000, 1, 1, 0, 0, 1) - datetime(2000, 1, 1)


class ComputeSettings(Section):
    # Which published series of grid factors location-based Scope 2 uses (see config/factors.toml).
    factor_series: str = "national-power-average"
    # Scope 1 fuel factors: this series, the site's region first, else region GLOBAL.
    fuel_factor_series: str = "ipcc-2006-default"
    # A counter interval longer than this is a gap: its energy is counted as estimated.
    max_gap_s: float = Field(default=900.0, gt=0)


class IngestSettings(Section):
    """What the bridge accepts. A reading outside [now - max_age_s, now + max_future_s] is a broken
    gateway clock: it goes to the DLQ instead of making the writer create partitions for it."""

    max_future_s: float = Field(default=86_400.0, ge=0)
    max_age_s: float = Field(default=400 * 86_400.0, ge=0)
    # $share/<mqtt.share_group>/… lets bridges split the load, but Mosquitto 2.0.11 does not restore
    # shared subscriptions from its persistence file: after a broker restart, batches published
    # before the bridge re-subscribes are PUBACKed and dropped. A single bridge should say False.
    shared_subscription: bool = True
    # How often the bridge asks the DB whether the fleet registry changed (a one-row read); a batch
    # naming an unknown meter or gateway makes it ask at once (at most once a second).
    registry_refresh_s: float = Field(default=5.0, gt=0)
    # The writer's storage engine (``ingest.writer.STORES``): a second engine adds its name here.
    store: Literal["postgresql"] = "postgresql"


class StackSettings(Section):
    """What ``scopemeter stack up`` runs: pid files, logs and broker data live in ``state_dir``."""

    state_dir: Path = REPO_ROOT / ".scopemeter"
    # Unset: ``mosquitto`` on PATH or in /usr/sbin; ``java`` on PATH.
    mosquitto_bin: Path | None = None
    java_bin: Path | None = None
    # Apache Kafka's jars (ops/kafka/pom.xml, checked against ops/kafka/jars.lock) are fetched here
    # once with Maven; unset: $XDG_CACHE_HOME/scopemeter/kafka (~/.cache/scopemeter/kafka).
    kafka_cache_dir: Path | None = None
    # The embedded KRaft node's controller listener (the broker listens on kafka.bootstrap).
    kafka_controller_port: int = 19093
    kafka_heap: str = "512m"
    # Seconds each piece may take to answer on its port.
    start_timeout: float = Field(default=30.0, gt=0)


class MetricsSettings(Section):
    """Where each process serves /metrics and /healthz (the port is each command's --metrics-port)."""

    # 0.0.0.0 (or a specific interface) lets a Prometheus on another machine scrape.
    bind: str = "127.0.0.1"


class StatementsSettings(Section):
    """The Ed25519 key that signs statements (``scopemeter statements keygen`` creates it)."""

    # Outside the install directory, so that a reinstall, a copy of the code or a backup of it never
    # carries the key; the public key is written beside it (``.pub``). The demo uses its state dir.
    signing_key: Path = Path("/etc/scopemeter/statement-signing.key")
    # The key's passphrase (PKCS#8, encrypted with cryptography's BestAvailableEncryption): from the
    # environment (SCOPEMETER_STATEMENTS__SIGNING_KEY_PASSPHRASE) or from a file that holds it (e.g.
    # a systemd credential), never from a command line, where every user of the machine sees it.
    signing_key_passphrase: SecretStr | None = None
    signing_key_passphrase_file: Path | None = None

    @model_validator(mode="after")
    def _one_passphrase(self) -> StatementsSettings:
        if self.signing_key_passphrase is not None and self.signing_key_passphrase_file is not None:
            raise ValueError("set signing_key_passphrase or signing_key_passphrase_file, not both")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    mqtt: MqttSettings = MqttSettings()
    kafka: KafkaSettings = KafkaSettings()
    db: DbSettings = DbSettings()
    clock: ClockSettings = ClockSettings()
    stack: StackSettings = StackSettings()
    compute: ComputeSettings = ComputeSettings()
    ingest: IngestSettings = IngestSettings()
    metrics: MetricsSettings = MetricsSettings()
    statements: StatementsSettings = StatementsSettings()
    config_dir: Path = REPO_ROOT / "config"

    @model_validator(mode="before")
    @classmethod
    def _known_environment(cls, data: Any) -> Any:
        check_environment(os.environ)
        return data


def env_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> set[str]:
    """Every environment variable that sets something: a section as JSON, or one of its fields."""
    names = set()
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        names.add(env)
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names |= env_names(kind, f"{env}__")
    return names


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse a ``SCOPEMETER_*`` variable that sets nothing (a typo would otherwise leave the
    default in place without a word), naming the closest real one."""
    known = env_names()
    unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        problems.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise UserError(
        f"environment variable{'s' if len(unknown) > 1 else ''} {'; '.join(problems)} set no setting;"
        " settings are SCOPEMETER_<SECTION>__<FIELD> (see README, Settings)"
    )
