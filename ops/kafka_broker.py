"""Apache Kafka (KRaft) on this machine: jars from Maven Central, run with ``java``.

The broker is the same engine production runs. ``ops/kafka/pom.xml`` pins every version;
:func:`kafka_libs` copies the resolved jars into a cache directory once, and refuses any jar whose
sha256 differs from ``ops/kafka/jars.lock``. :func:`start_kafka` formats the log directory on first
start (it lives in the state dir, so a restart keeps every record and committed offset) and runs one
combined broker + controller; :func:`start_kafka_cluster` runs several, each a voter of the quorum,
for replication tests.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ops import maven_jars
from ops.errors import UserError
from ops.procs import ManagedProcess, launch, wait_listening

KAFKA_DIR = Path(__file__).parent / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOCK = KAFKA_DIR / "jars.lock"
LOG4J = KAFKA_DIR / "log4j2.properties"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scopemeter" / "kafka"


def kafka_version() -> str:
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not found:
        raise UserError(f"kafka: no <kafka.version> in {POM}")
    return found.group(1).strip()


# --- jars ----------------------------------------------------------------------------------------


def read_lock(lock: Path = LOCK) -> dict[str, str]:
    """jar file name → sha256, from ``sha256sum``-style lines."""
    return maven_jars.read_lock(lock, "kafka")


def kafka_libs(cache_dir: Path | None = None, *, mvn: str | None = None) -> Path:
    """The directory of the broker's verified jars; fetched with Maven the first time.

    Keyed by the pom and the lock, so changing either fetches afresh; concurrent callers (parallel
    tests, two stacks) wait for one fetch."""
    cache = (cache_dir or default_cache_dir()).expanduser()
    key = hashlib.sha256(POM.read_bytes() + LOCK.read_bytes()).hexdigest()[:12]
    return maven_jars.verified_jars(POM, LOCK, cache / f"{kafka_version()}-{key}" / "libs", "kafka", mvn=mvn)


def write_lock(cache_dir: Path | None = None, *, mvn: str | None = None) -> Path:
    """Fetch the jars the pom resolves to and record them in ``jars.lock`` (after a version change)."""
    cache = (cache_dir or default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lock-", dir=cache) as tmp:
        maven_jars.mvn_copy(POM, Path(tmp), "kafka", mvn)
        lines = maven_jars.lock_lines(Path(tmp))
    header = (f"# Jars of Apache Kafka {kafka_version()} as ops/kafka/pom.xml resolves them (sha256  file).\n"
              "# Regenerate after changing the pom: scopemeter stack kafka-lock\n")
    LOCK.write_text(header + "\n".join(lines) + "\n")
    return LOCK


# --- brokers -------------------------------------------------------------------------------------


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (Kafka's Uuid format). Like
    Kafka's own ``Uuid.randomUuid`` it never starts with '-', which the storage tool reads as an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@dataclass(frozen=True)
class SaslListener:
    """An extra SASL_PLAINTEXT listener with the PLAIN mechanism and these users (name → password)."""

    port: int
    users: Mapping[str, str]


@dataclass(frozen=True)
class TlsListener:
    """An extra SSL listener: the broker's PEM key + certificate chain in one file (``keystore``, an
    unencrypted PKCS#8 key), the CA bundle that signs client certificates (``truststore``), and
    whether a client must present one (mutual TLS, the way a production cluster fences clients)."""

    port: int
    keystore: Path
    truststore: Path
    client_auth: bool = True


def server_properties(
    *,
    node_id: int,
    host: str,
    port: int,
    controller_port: int,
    voters: Mapping[int, int],
    data_dir: Path,
    replication: int = 1,
    sasl: SaslListener | None = None,
    tls: TlsListener | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """server.properties of one combined broker + controller node of a static KRaft quorum."""
    listeners = [f"PLAINTEXT://{host}:{port}", f"CONTROLLER://{host}:{controller_port}"]
    advertised = [f"PLAINTEXT://{host}:{port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": ",".join(f"{n}@{host}:{p}" for n, p in sorted(voters.items())),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Internal topics follow the cluster's size: one node is a development stack, three replicate.
        "offsets.topic.replication.factor": str(replication),
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min(2, replication)),
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min(2, replication)),
        "num.partitions": "4",
        # Auto-created topics accept what the bridge produces (KafkaSettings.max_message_bytes).
        "message.max.bytes": str(8 * 1024 * 1024),
        # A consumer group forms at once; the default 3 s delay only slows tests and the demo.
        "group.initial.rebalance.delay.ms": "0",
        "unclean.leader.election.enable": "false",
    }
    if sasl is not None:
        listeners.append(f"SASL://{host}:{sasl.port}")
        advertised.append(f"SASL://{host}:{sasl.port}")
        protocols.append("SASL:SASL_PLAINTEXT")
        users = " ".join(f'user_{name}="{pw}"' for name, pw in sasl.users.items())
        props["sasl.enabled.mechanisms"] = "PLAIN"
        props["listener.name.sasl.plain.sasl.jaas.config"] = (
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
        )
    if tls is not None:
        listeners.append(f"SSL://{host}:{tls.port}")
        advertised.append(f"SSL://{host}:{tls.port}")
        protocols.append("SSL:SSL")
        props.update({
            "listener.name.ssl.ssl.keystore.type": "PEM",
            "listener.name.ssl.ssl.keystore.location": str(tls.keystore),
            "listener.name.ssl.ssl.truststore.type": "PEM",
            "listener.name.ssl.ssl.truststore.location": str(tls.truststore),
            "listener.name.ssl.ssl.client.auth": "required" if tls.client_auth else "none",
        })
    props["listeners"] = ",".join(listeners)
    props["advertised.listeners"] = ",".join(advertised)
    props["listener.security.protocol.map"] = ",".join(protocols)
    props.update(extra or {})
    return props


def _java(java_bin: Path | None) -> str:
    if java_bin is not None:
        if os.access(java_bin, os.X_OK) and java_bin.is_file():
            return str(java_bin)
        raise UserError(f"kafka: {java_bin} (SCOPEMETER_STACK__JAVA_BIN) is not an executable file")
    found = shutil.which("java")
    if found is None:
        raise UserError("kafka: java not found; install Java 17 (`apt-get install openjdk-17-jre-headless`)")
    return found


@dataclass(frozen=True)
class KafkaNode:
    """Everything needed to (re)start one node on the same ports and log directory."""

    node_id: int
    host: str
    port: int
    controller_port: int
    state_dir: Path
    argv: tuple[str, ...]

    @property
    def log_path(self) -> Path:
        return self.state_dir / "kafka.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "kafka.pid"


def prepare_node(
    port: int,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    controller_port: int,
    node_id: int = 1,
    voters: Mapping[int, int] | None = None,
    cluster_id: str | None = None,
    replication: int = 1,
    sasl: SaslListener | None = None,
    tls: TlsListener | None = None,
    extra: Mapping[str, str] | None = None,
    heap: str = "512m",
    java_bin: Path | None = None,
    cache_dir: Path | None = None,
) -> KafkaNode:
    """Write server.properties into ``state_dir`` and format its log directory if new."""
    java = _java(java_bin)
    libs = kafka_libs(cache_dir)
    state_dir = state_dir.resolve()
    data = state_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    props = server_properties(
        node_id=node_id, host=host, port=port, controller_port=controller_port,
        voters=voters or {node_id: controller_port}, data_dir=data, replication=replication,
        sasl=sasl, tls=tls, extra=extra,
    )
    conf = state_dir / "server.properties"
    conf.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    classpath = f"{libs}/*"
    jvm = [java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
           "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={LOG4J}", "-cp", classpath]
    if not (data / "meta.properties").exists():
        id_file = state_dir / "cluster.id"
        cid = cluster_id or (id_file.read_text().strip() if id_file.exists() else new_cluster_id())
        id_file.write_text(cid + "\n")
        fmt = subprocess.run(
            [*jvm, STORAGE_TOOL, "format", "--ignore-formatted", "-t", cid, "-c", str(conf)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if fmt.returncode != 0:
            tail = (fmt.stdout + fmt.stderr).strip().splitlines()[-3:]
            raise UserError(f"kafka: cannot format {data}: {' | '.join(tail)}")
    return KafkaNode(node_id, host, port, controller_port, state_dir, (*jvm, MAIN_CLASS, str(conf)))


def launch_node(node: KafkaNode) -> ManagedProcess:
    return launch("kafka", node.argv, host=node.host, port=node.port, log_path=node.log_path,
                  pid_path=node.pid_path, cwd=node.state_dir)


def start_kafka(
    port: int,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    controller_port: int,
    sasl: SaslListener | None = None,
    tls: TlsListener | None = None,
    heap: str = "512m",
    java_bin: Path | None = None,
    cache_dir: Path | None = None,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start one broker + controller on ``host:port``; its log directory stays in ``state_dir``,
    so starting again on the same directory resumes every topic, record and committed offset."""
    node = prepare_node(port, state_dir, host=host, controller_port=controller_port, sasl=sasl, tls=tls,
                        heap=heap, java_bin=java_bin, cache_dir=cache_dir)  # fmt: skip
    proc = launch_node(node)
    wait_listening(proc, timeout)
    return proc


@dataclass
class KafkaCluster:
    """Several KRaft nodes on this machine, each broker and controller (a voter)."""

    nodes: list[KafkaNode]
    procs: dict[int, ManagedProcess]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def kill(self, node_id: int) -> None:
        self.procs[node_id].kill()

    def restart(self, node_id: int, timeout: float = 60.0) -> ManagedProcess:
        proc = launch_node(self.node(node_id))
        self.procs[node_id] = proc
        wait_listening(proc, timeout)
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop(30.0)


def start_kafka_cluster(
    ports: Sequence[tuple[int, int]],
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    heap: str = "384m",
    timeout: float = 90.0,
    cache_dir: Path | None = None,
) -> KafkaCluster:
    """Start ``len(ports)`` nodes ((broker port, controller port) each) with replication factor and
    ``min.insync.replicas`` of a real cluster (3 and 2 for three nodes). All are launched before
    any is waited for: a broker opens its port only once a quorum of controllers has formed."""
    voters = {i + 1: cport for i, (_, cport) in enumerate(ports)}
    cid = new_cluster_id()
    nodes = [
        prepare_node(port, state_dir / f"node{nid}", host=host, controller_port=voters[nid], node_id=nid,
                     voters=voters, cluster_id=cid, replication=min(3, len(ports)), heap=heap,
                     cache_dir=cache_dir)
        for nid, (port, _) in zip(voters, ports, strict=True)
    ]
    procs = {n.node_id: launch_node(n) for n in nodes}
    cluster = KafkaCluster(nodes, procs)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs.values():
            wait_listening(proc, max(1.0, deadline - time.monotonic()))
    except UserError:
        cluster.stop()
        raise
    return cluster
