"""A local single-node Apache Kafka (KRaft) from Maven Central jars: no Docker, no tarball.

Used by `make run`, the tests and CI. Everything is idempotent: `start` on a running broker returns
its pid, `stop` on a stopped one does nothing. The broker's files (storage, config, log, pid) live in
one directory; the jars are cached once per Kafka version under ~/.cache/flywheel.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from flywheel import paths


class KafkaError(RuntimeError):
    """The local broker could not be fetched, started or reached; the message says what to do."""


def kafka_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", paths.kafka_pom().read_text())
    if not match:
        raise KafkaError(f"no <kafka.version> in {paths.kafka_pom()}")
    return match.group(1)


def jars_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "flywheel" / f"kafka-{kafka_version()}" / "libs"


def ensure_jars() -> Path:
    """Download the broker classpath with Maven once; later calls return the cached folder."""
    target = jars_dir()
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise KafkaError("Maven (mvn) is needed to fetch the Kafka broker jars: install it (apt-get install maven)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Stage next to the target so the final rename is atomic (same filesystem).
    staging = Path(tempfile.mkdtemp(prefix="libs-staging-", dir=target.parent))
    cmd = [
        "mvn", "-q", "-B", "-f", str(paths.kafka_pom()), "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaError(f"fetching Kafka jars failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (staging / ".complete").touch()
    try:
        staging.rename(target)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Broker:
    """Where a local broker lives and listens."""

    data_dir: Path
    port: int = 9092
    controller_port: int | None = None
    host: str = "127.0.0.1"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ctrl_port(self) -> int:
        return self.controller_port or self.port + 1

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "kafka.log"

    def properties(self) -> str:
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{self.host}:{self.ctrl_port}",
            f"listeners=PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.ctrl_port}",
            f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.data_dir / 'logs'}",
            "num.partitions=8",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            # Without this every consumer-group join waits 3 s.
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "log.retention.hours=168",
            "",
        ])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def running_pid(broker: Broker) -> int | None:
    try:
        pid = int(broker.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_ready(bootstrap: str, timeout: float = 60.0, pid: int | None = None) -> None:
    """Wait until a real metadata request succeeds (an open port is not a ready broker)."""
    from kafka.errors import KafkaError as ClientError

    from kafka import KafkaAdminClient

    host, port = bootstrap.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if pid is not None and not _pid_alive(pid):
            raise KafkaError("the Kafka broker exited during start-up")
        if _port_open(host, int(port)):
            try:
                admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
                try:
                    if admin.describe_cluster().get("brokers"):
                        return
                finally:
                    admin.close()
            except ClientError as exc:  # not ready yet
                last = exc
        time.sleep(0.3)
    raise KafkaError(f"Kafka at {bootstrap} did not answer a metadata request within {timeout:.0f}s ({last})")


def start(broker: Broker, *, timeout: float = 90.0) -> int:
    """Start the broker unless it already runs; return its pid once it answers metadata requests."""
    pid = running_pid(broker)
    if pid is not None:
        wait_ready(broker.bootstrap, timeout, pid)
        return pid
    if _port_open(broker.host, broker.port):
        raise KafkaError(
            f"port {broker.port} is taken by another process: stop it, or choose another port "
            "(FLYWHEEL_KAFKA_BOOTSTRAP / --port)"
        )
    if shutil.which("java") is None:
        raise KafkaError(
            "Java 17+ is needed to run the local Kafka broker: install a JDK (apt-get install default-jdk)"
        )
    libs = ensure_jars()
    broker.data_dir.mkdir(parents=True, exist_ok=True)
    props = broker.data_dir / "server.properties"
    props.write_text(broker.properties())
    log4j = broker.data_dir / "log4j.properties"
    log4j.write_text(
        "log4j.rootLogger=WARN, stdout\n"
        "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
        "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        "log4j.logger.kafka.server.KafkaServer=INFO\n"
        "log4j.logger.kafka.server.BrokerServer=INFO\n"
    )
    classpath = f"{libs}/*"
    java = ["java", "-Xms256m", "-Xmx1g", f"-Dlog4j.configuration=file:{log4j}", "-cp", classpath]
    if not (broker.data_dir / "logs" / "meta.properties").exists():
        cluster_id = str(uuid.uuid4())
        fmt = subprocess.run(
            # "--cluster-id=…" in one argument: a base64 id may start with "-" (1 in 64), which the tool's
            # argument parser would take for an option
            [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={_kafka_uuid(cluster_id)}", "-c", str(props)],
            capture_output=True, text=True,
        )
        if fmt.returncode != 0:
            raise KafkaError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
    with open(broker.log_file, "ab") as log:
        proc = subprocess.Popen(
            [*java, "kafka.Kafka", str(props)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the shell that started it, like a service
        )
    broker.pid_file.write_text(str(proc.pid))
    try:
        wait_ready(broker.bootstrap, timeout, proc.pid)
    except KafkaError as exc:
        raise KafkaError(f"{exc}; see {broker.log_file}") from exc
    return proc.pid


def _kafka_uuid(seed: str) -> str:
    """Kafka cluster ids are 16 bytes in URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.UUID(seed).bytes).decode().rstrip("=")


def stop(broker: Broker, *, timeout: float = 30.0) -> bool:
    """Stop the broker cleanly (SIGTERM, then SIGKILL after `timeout`). True if one was running."""
    pid = running_pid(broker)
    if pid is None:
        broker.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        _reap(pid)
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    broker.pid_file.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
