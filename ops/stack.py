"""The embedded stack on one machine: Mosquitto, Apache Kafka (KRaft) and PostgreSQL.

``up(settings)`` starts what is not already reachable and prepares it (database + migrations,
Kafka topics); ``down(settings)`` stops only what ``up`` started (pid files in the state dir);
``status(settings)`` reports each piece. ``start_mosquitto`` / ``ops.kafka_broker.start_kafka``
start an independent broker on any port in any directory — tests and chaos tests use them directly.

Kafka keeps its log directory in ``<state dir>/kafka``: topics, records and committed offsets
survive ``down``/``up`` and a kill -9, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import shutil
import string
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ops.errors import UserError
from ops.mqtt_auth import (
    ADMIN_USER,
    BRIDGE_USER,
    AuthFiles,
    apply_live,
    auth_files,
    gateway_grants,
    write_auth,
)
from ops.procs import (
    ManagedProcess,
    PortState,
    free_port,
    probe_kafka,
    probe_mqtt,
    spawn,
    wait_port,
)
from ops.settings import KafkaSettings, Settings

__all__ = [
    "ManagedProcess",
    "MqttTls",
    "PieceStatus",
    "StackStatus",
    "client_settings",
    "down",
    "ensure_postgres",
    "ensure_topics",
    "ensure_topics_async",
    "free_port",
    "prepare_mqtt_auth",
    "render_mosquitto_conf",
    "start_mosquitto",
    "status",
    "up",
    "wait_port",
]

MOSQUITTO_TEMPLATE = Path(__file__).parent / "mosquitto" / "mosquitto.conf.template"
_TOPIC_ALREADY_EXISTS = 36


# --- binaries ------------------------------------------------------------------------------------


def mosquitto_binary(configured: Path | None = None) -> str:
    if configured is not None:
        if os.access(configured, os.X_OK) and configured.is_file():
            return str(configured)
        raise UserError(
            f"mosquitto: {configured} (SCOPEMETER_STACK__MOSQUITTO_BIN) is not an executable file"
        )
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):  # Debian puts it in sbin, often not on PATH
        return "/usr/sbin/mosquitto"
    raise UserError(
        "mosquitto: binary not found on PATH or in /usr/sbin; install it with "
        "`apt-get install mosquitto` (or set SCOPEMETER_STACK__MOSQUITTO_BIN)"
    )


# --- brokers -------------------------------------------------------------------------------------


# Bounds rendered into every config (see the template for why).
MQTT_MESSAGE_SIZE_LIMIT = 8 * 1024 * 1024  # twice the bridge's own limit (ingest.validate.MAX_PAYLOAD_BYTES)
MQTT_MAX_PACKET_SIZE = MQTT_MESSAGE_SIZE_LIMIT + 70_000  # + the largest topic and headers
MQTT_SESSION_EXPIRATION = "30d"  # a bridge down over a long holiday still gets its backlog
MQTT_MIN_CONNECTIONS = 1024


def mosquitto_dynsec_plugin() -> Path:
    """Mosquitto's dynamic-security plugin (Debian: in the mosquitto package, in the multiarch lib dir)."""
    for pattern in ("usr/lib/*/mosquitto_dynamic_security.so", "usr/lib/mosquitto_dynamic_security.so",
                    "usr/local/lib/mosquitto_dynamic_security.so"):
        for found in sorted(Path("/").glob(pattern)):
            return found
    raise UserError("mosquitto: the dynamic-security plugin (mosquitto_dynamic_security.so, Mosquitto >= 2.0)"
                    " is not installed; `apt-get install mosquitto` ships it")  # fmt: skip


@dataclass(frozen=True)
class MqttTls:
    """A TLS listener that requires client certificates (mTLS): the certificate's CN is the user."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def render(self) -> str:
        return "\n".join([
            f"cafile {self.ca_file.resolve()}",
            f"certfile {self.cert_file.resolve()}",
            f"keyfile {self.key_file.resolve()}",
            "require_certificate true",
            "use_identity_as_username true",
        ])


def _mosquitto_access(auth: AuthFiles | None) -> str:
    if auth is None:
        # Tests' open listener only: no credentials, any client id.
        return "allow_anonymous true"
    return "\n".join([
        "allow_anonymous false",
        f"plugin {mosquitto_dynsec_plugin()}",
        f"plugin_opt_config_file {auth.dynsec_file}",
        "use_username_as_clientid true",
    ])


def render_mosquitto_conf(
    host: str, port: int, state_dir: Path, extra_conf: str = "", auth: AuthFiles | None = None,
    tls: MqttTls | None = None,
) -> str:  # fmt: skip
    """The project's Mosquitto config (ops/mosquitto/mosquitto.conf.template) for this listener;
    with ``auth`` the production access control (users and ACLs, client id = user), else an open
    development listener; with ``tls`` the listener requires client certificates."""
    state_dir = state_dir.resolve()
    users = len(auth.credentials()) if auth is not None else 0
    return string.Template(MOSQUITTO_TEMPLATE.read_text()).substitute(
        host=host,
        port=port,
        state_dir=state_dir / "mosquitto",
        log_file=state_dir / "mosquitto.log",
        user=pwd.getpwuid(os.geteuid()).pw_name,
        access=_mosquitto_access(auth),
        tls=tls.render() if tls is not None else "",
        max_connections=max(MQTT_MIN_CONNECTIONS, 2 * users),
        message_size_limit=MQTT_MESSAGE_SIZE_LIMIT,
        max_packet_size=MQTT_MAX_PACKET_SIZE,
        persistent_client_expiration=MQTT_SESSION_EXPIRATION,
        extra=extra_conf,
    )


def start_mosquitto(
    port: int,
    state_dir: Path,
    extra_conf: str = "",
    *,
    host: str = "127.0.0.1",
    binary: Path | None = None,
    timeout: float = 30.0,
    auth: AuthFiles | None = None,
    tls: MqttTls | None = None,
) -> ManagedProcess:
    """Start Mosquitto with the project's config; config, pid file, log and data in ``state_dir``.

    ``auth`` (see :func:`prepare_mqtt_auth`) closes the broker to all but its users; without it the
    listener is open (tests). Starting again on the same ``state_dir`` resumes the persisted
    sessions and queues.
    """
    exe = mosquitto_binary(binary)
    state_dir = state_dir.resolve()
    (state_dir / "mosquitto").mkdir(parents=True, exist_ok=True)
    conf = state_dir / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(host, port, state_dir, extra_conf, auth, tls))
    return spawn(
        "mosquitto",
        [exe, "-c", str(conf)],
        host=host,
        port=port,
        log_path=state_dir / "mosquitto.log",
        pid_path=state_dir / "mosquitto.pid",
        cwd=state_dir,
        timeout=timeout,
    )


def prepare_mqtt_auth(
    settings: Settings, bridge_users: Sequence[str] = (BRIDGE_USER,)
) -> AuthFiles:
    """(Re)generate the broker's users and ACLs from the fleet registry in the DB, in the state dir;
    the stack's own running Mosquitto gets the changes at once (new users, revoked ones)."""
    import psycopg

    files = auth_files(settings.stack.state_dir)
    try:
        with psycopg.connect(settings.db.dsn) as conn:
            grants = gateway_grants(conn)
    except psycopg.Error as exc:
        raise UserError(f"mqtt: cannot read the fleet registry: {str(exc).strip().splitlines()[0]}") from exc
    try:
        plan = write_auth(files, grants, bridge_users)
    except ValueError as exc:
        raise UserError(f"mqtt: {exc}") from None
    broker = _brokers(settings)[0]
    if plan.commands and broker.running() is not None:
        try:
            apply_live(broker.host, broker.port, plan.credentials[ADMIN_USER], plan.commands)
        except (RuntimeError, OSError) as exc:
            raise UserError(f"mqtt: the running Mosquitto did not take the new users ({exc}); restart it"
                            " (`scopemeter stack down && scopemeter stack up`) to load them from "
                            f"{files.dynsec_file}") from exc  # fmt: skip
    return files


def client_settings(settings: Settings, username: str) -> Settings:
    """``settings`` logging in to the stack's Mosquitto as ``username`` (a gateway id or
    ``mqtt_auth.BRIDGE_USER``) with the password ``stack up`` (or ``mqtt acl``) generated in the state
    dir; unchanged when the settings already name a user (set them for an external closed broker) or
    there is no such user. An open broker ignores the credentials."""
    if settings.mqtt.username is not None:
        return settings
    password = auth_files(settings.stack.state_dir).credentials().get(username)
    if password is None:
        return settings
    mqtt = settings.mqtt.model_copy(update={"username": username, "password": password})
    return settings.model_copy(update={"mqtt": mqtt})


def start_embedded_kafka(settings: Settings, host: str, port: int, timeout: float) -> ManagedProcess:
    """The stack's own single-node Kafka, its log directory in ``<state dir>/kafka``."""
    from ops.kafka_broker import start_kafka

    st = settings.stack
    return start_kafka(
        port, st.state_dir.resolve() / "kafka", host=host, controller_port=st.kafka_controller_port,
        heap=st.kafka_heap, java_bin=st.java_bin, cache_dir=st.kafka_cache_dir, timeout=timeout,
    )


def kafka_address(bootstrap: str) -> tuple[str, int]:
    """Host and port of the first bootstrap server."""
    first = bootstrap.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"kafka: bootstrap {bootstrap!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


# --- Kafka topics --------------------------------------------------------------------------------


async def ensure_topics_async(kafka: KafkaSettings, timeout: float = 30.0) -> list[str]:
    """Create the readings, DLQ and committed topics if missing; returns the names created now."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    from ops.kafka_client import client_kwargs

    names = [kafka.readings_topic, kafka.dlq_topic, kafka.committed_topic]
    admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout * 1000), **client_kwargs(kafka))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        # The bridge sends MQTT batches of up to ~8 MiB as one record (KafkaSettings.max_message_bytes);
        # Kafka's default topic limit is 1 MiB.
        configs = {"max.message.bytes": str(kafka.max_message_bytes)}
        replicas = kafka.replication_factor or min(3, len((await admin.describe_cluster())["brokers"]))
        wanted = [NewTopic(n, kafka.partitions, replicas, topic_configs=configs)
                  for n in names if n not in existing]
        if not wanted:
            return []
        try:
            response = await admin.create_topics(wanted, timeout_ms=int(timeout * 1000))
        except TopicAlreadyExistsError:  # raced with another creator
            return []
        created = []
        for topic, code, *rest in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != _TOPIC_ALREADY_EXISTS:
                detail = rest[0] if rest else ""
                raise UserError(f"kafka: cannot create topic {topic} (error {code}: {detail})")
        return created
    except KafkaError as exc:
        raise UserError(f"kafka: cannot create topics at {kafka.bootstrap}: {exc}") from exc
    finally:
        await admin.close()


def kafka_answers(kafka: KafkaSettings, timeout: float = 5.0) -> bool:
    """True when the brokers answer a metadata request made the way every client connects (TLS,
    SASL from the settings): a secured listener does not answer the plaintext port probe."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    from ops.kafka_client import client_kwargs

    async def ask() -> bool:
        admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout * 1000), **client_kwargs(kafka))
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.describe_cluster(), timeout)
            return True
        except (KafkaError, OSError, TimeoutError):
            return False
        finally:
            await admin.close()

    return asyncio.run(ask())


def ensure_topics(kafka: KafkaSettings, timeout: float = 30.0) -> list[str]:
    """Sync wrapper of :func:`ensure_topics_async` (call the async one from inside an event loop)."""
    return asyncio.run(ensure_topics_async(kafka, timeout))


# --- PostgreSQL ----------------------------------------------------------------------------------


def _pg_address(dsn: str) -> tuple[str, int]:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)


def _pg_error(dsn: str, timeout: float = 3.0) -> str | None:
    """None when PostgreSQL accepts a connection with ``dsn``, else the reason."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout))):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def _debian_cluster_for(port: int) -> tuple[str, str, str] | None:
    """(version, cluster, log file) of a stopped local Debian cluster on ``port``, if there is one."""
    if not (shutil.which("pg_lsclusters") and shutil.which("pg_ctlcluster")):
        return None
    try:
        out = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[2] == str(port) and cols[3].startswith("down"):
            return cols[0], cols[1], cols[6] if len(cols) > 6 else ""
    return None


def ensure_postgres(settings: Settings, timeout: float | None = None) -> bool:
    """Make sure PostgreSQL answers on the admin DSN; starts a stopped local Debian cluster on
    that port with ``pg_ctlcluster``. True when it was started here."""
    timeout = settings.stack.start_timeout if timeout is None else timeout
    dsn = settings.db.admin_dsn
    reason = _pg_error(dsn)
    if reason is None:
        return False
    host, port = _pg_address(dsn)
    hint = "start it (`make services`) or point SCOPEMETER_DB__DSN and SCOPEMETER_DB__ADMIN_DSN at one"
    local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("/")
    cluster = _debian_cluster_for(port) if local else None
    if cluster is None:
        raise UserError(f"postgresql: not reachable at {host}:{port} ({reason}); {hint}")
    version, name, log = cluster
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"],
        capture_output=True, timeout=timeout, check=False,
    )
    deadline = time.monotonic() + timeout
    while (reason := _pg_error(dsn)) is not None:
        if time.monotonic() >= deadline:
            raise UserError(
                f"postgresql: started cluster {version}/{name} but it does not answer at {host}:{port} "
                f"({reason}); log: {log or 'see pg_lsclusters'}"
            )
        time.sleep(0.5)
    return True


def prepare_database(settings: Settings) -> list[int]:
    """Create the database if missing and apply migrations; returns the versions applied now."""
    import psycopg

    from ingest.db import MigrationError, ensure_database, migrate

    try:
        ensure_database(settings.db.dsn, settings.db.admin_dsn)
        return migrate(settings.db.dsn)
    except (psycopg.Error, MigrationError) as exc:
        raise UserError(f"postgresql: cannot prepare database: {str(exc).strip().splitlines()[0]}") from exc


# --- the stack -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PieceStatus:
    name: str
    host: str
    port: int
    reachable: bool
    pid: int | None  # set when the stack started it and it still runs
    started_by_stack: bool
    log_path: Path | None


@dataclass(frozen=True)
class StackStatus:
    pieces: list[PieceStatus]
    state_dir: Path
    started: list[str] = field(default_factory=list)  # pieces this ``up`` call started
    topics_created: list[str] = field(default_factory=list)
    migrations_applied: list[int] = field(default_factory=list)

    def piece(self, name: str) -> PieceStatus:
        for p in self.pieces:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def ok(self) -> bool:
        return all(p.reachable for p in self.pieces)

    def table(self) -> str:
        rows = [("PIECE", "ADDRESS", "REACHABLE", "PID", "STARTED BY", "LOG")]
        for p in self.pieces:
            rows.append((
                p.name,
                f"{p.host}:{p.port}",
                "yes" if p.reachable else "no",
                str(p.pid) if p.pid else "-",
                "stack" if p.started_by_stack else "external" if p.reachable else "-",
                str(p.log_path) if p.log_path and p.started_by_stack else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@dataclass(frozen=True)
class _Broker:
    name: str
    host: str
    port: int
    probe: Callable[[str, int], PortState]
    protocol: str
    port_setting: str
    # Where the piece keeps its pid file and log, and what its command line must contain.
    home: Path
    cmdline_mark: str

    @property
    def pid_path(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.name}.log"

    def running(self) -> ManagedProcess | None:
        return ManagedProcess.from_pid_file(
            self.name, self.pid_path, self.host, self.port, self.log_path, expect_in_cmdline=self.cmdline_mark
        )


def _brokers(settings: Settings) -> list[_Broker]:
    state = settings.stack.state_dir.resolve()
    khost, kport = kafka_address(settings.kafka.bootstrap)
    return [
        _Broker("mosquitto", settings.mqtt.host, settings.mqtt.port, probe_mqtt, "MQTT",
                "SCOPEMETER_MQTT__PORT", state, "mosquitto"),
        _Broker("kafka", khost, kport, probe_kafka, "Kafka", "SCOPEMETER_KAFKA__BOOTSTRAP", state / "kafka",
                "kafka.Kafka"),
    ]


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per state dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "stack.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure_broker(b: _Broker, start: Callable[[], ManagedProcess], timeout: float) -> bool:
    """True when started now; False when it already answered (ours or external)."""
    ours = b.running()
    if ours is not None:
        if wait_port(b.host, b.port, timeout, ours) and b.probe(b.host, b.port) is PortState.SPEAKS:
            return False
        if ours.alive():
            raise UserError(
                f"{b.name}: pid {ours.pid} (from {b.pid_path}) does not answer {b.protocol} "
                f"on {b.host}:{b.port}; log: {b.log_path}. Run `scopemeter stack down` and retry"
            )
    state = b.probe(b.host, b.port)
    if state is PortState.SPEAKS:
        return False  # someone else's broker: use it, never stop it
    if state is PortState.OTHER:
        raise UserError(
            f"{b.name}: port {b.host}:{b.port} is in use by a process that does not speak {b.protocol}; "
            f"stop it or choose another port ({b.port_setting})"
        )
    start()
    return True


def up(settings: Settings | None = None, timeout: float | None = None) -> StackStatus:
    """Create the database and migrate, generate the broker's users and ACL from the fleet registry,
    start whatever is not reachable yet (our running Mosquitto re-reads its users), create topics."""
    settings = settings or Settings()
    timeout = settings.stack.start_timeout if timeout is None else timeout
    state = settings.stack.state_dir.resolve()
    started: list[str] = []
    with _locked(state):
        if ensure_postgres(settings, timeout):
            started.append("postgresql")
        applied = prepare_database(settings)  # first: the broker's ACL comes from the registry
        auth = prepare_mqtt_auth(settings)
        mqtt, kafka = _brokers(settings)
        if _ensure_broker(
            mqtt,
            lambda: start_mosquitto(mqtt.port, state, host=mqtt.host, binary=settings.stack.mosquitto_bin,
                                    timeout=timeout, auth=auth),
            timeout,
        ):
            started.append("mosquitto")
        if _ensure_broker(
            kafka,
            lambda: start_embedded_kafka(settings, kafka.host, kafka.port, max(timeout, 60.0)),
            timeout,
        ):
            started.append("kafka")
        created = ensure_topics(settings.kafka, timeout)
    current = status(settings)
    return StackStatus(current.pieces, state, started, created, applied)


def down(settings: Settings | None = None, timeout: float = 10.0) -> list[str]:
    """Stop the brokers this stack started (by pid file); returns their names. PostgreSQL is a
    system service and keeps running. Kafka gets time for its controlled shutdown."""
    settings = settings or Settings()
    state = settings.stack.state_dir.resolve()
    stopped = []
    with _locked(state):
        for b in _brokers(settings):
            proc = b.running()
            if proc is not None:
                proc.stop(max(timeout, 30.0) if b.name == "kafka" else timeout)
                stopped.append(b.name)
    return stopped


def status(settings: Settings | None = None) -> StackStatus:
    settings = settings or Settings()
    state = settings.stack.state_dir.resolve()
    pieces = []
    for b in _brokers(settings):
        proc = b.running()
        if b.name == "kafka" and settings.kafka.security_protocol != "PLAINTEXT":
            speaks = kafka_answers(settings.kafka)
        else:
            speaks = b.probe(b.host, b.port) is PortState.SPEAKS
        pieces.append(PieceStatus(
            b.name, b.host, b.port, speaks, proc.pid if proc else None, proc is not None, b.log_path,
        ))
    pg_host, pg_port = _pg_address(settings.db.admin_dsn)
    pieces.append(PieceStatus(
        "postgresql", pg_host, pg_port, _pg_error(settings.db.admin_dsn) is None, None, False, None
    ))
    return StackStatus(pieces, state)

