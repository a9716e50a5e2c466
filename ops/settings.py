"""The one settings model for every scopemeter process.

Values come from (highest first) environment variables ``SCOPEMETER_<SECTION>__<FIELD>``
(e.g. ``SCOPEMETER_DB__DSN``), then defaults. The defaults are the embedded stack that
``scopemeter stack up`` starts on this machine, so nothing needs configuring for the demo.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class MqttSettings(BaseModel):
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


class KafkaSettings(BaseModel):
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


class DbSettings(BaseModel):
    """The embedded default is the machine's Debian PostgreSQL with the ``scopemeter`` role that
    ``make services`` (ops/ensure-services.sh) creates: password auth on loopback, as Debian ships it."""

    dsn: str = "postgresql://scopemeter:scopemeter@127.0.0.1:5432/scopemeter"
    # Used only to create (and, in tests, drop) databases; the role needs CREATEDB.
    admin_dsn: str = "postgresql://scopemeter:scopemeter@127.0.0.1:5432/postgres"


class ClockSettings(BaseModel):
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


class ComputeSettings(BaseModel):
    # Which published series of grid factors location-based Scope 2 uses (see config/factors.toml).
    factor_series: str = "national-power-average"
    # Scope 1 fuel factors: this series, the site's region first, else region GLOBAL.
    fuel_factor_series: str = "ipcc-2006-default"
    # A counter interval longer than this is a gap: its energy is counted as estimated.
    max_gap_s: float = Field(default=900.0, gt=0)


class IngestSettings(BaseModel):
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


class StackSettings(BaseModel):
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCOPEMETER_", env_nested_delimiter="__")

    mqtt: MqttSettings = MqttSettings()
    kafka: KafkaSettings = KafkaSettings()
    db: DbSettings = DbSettings()
    clock: ClockSettings = ClockSettings()
    stack: StackSettings = StackSettings()
    compute: ComputeSettings = ComputeSettings()
    ingest: IngestSettings = IngestSettings()
    config_dir: Path = REPO_ROOT / "config"
