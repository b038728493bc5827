"""Test harness: real services (Kafka, ClickHouse server) and Flywheel worker processes.

Nothing here mocks Kafka or ClickHouse. A service that cannot be started or reached makes the test
fail with the reason (never skip): a skipped integration test in CI is a hidden failure.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from flywheel import query
from flywheel.config import Settings, Topics

REPO = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def service_missing(name: str, why: str) -> None:
    """A test needs `name` and it is not there: fail, naming what to do."""
    pytest.fail(f"{name} is required and unavailable: {why}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    value: Any = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the service may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what} (last value: {value!r}, last error: {last_exc})"
    )


def terminate(proc: subprocess.Popen | None, *, grace: float = 60.0) -> None:
    """Stop a child cleanly (SIGTERM), SIGKILL it if it is still there after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def tail(path: Path, n: int, what: str) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {what} log)"


def unique_settings(kafka_bootstrap: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for one isolated pipeline: own app id (consumer group), topics, data dir and port."""
    tag = f"t{os.getpid()}x{next(_counter)}x{uuid.uuid4().hex[:6]}"
    topics = Topics.prefixed(f"{tag}.")
    values: dict[str, Any] = {
        "kafka_bootstrap": kafka_bootstrap, "data_dir": data_dir, "http_port": free_port(), "admin_port": free_port(),
        "app_id": f"flywheel-{tag}", "partitions": 4, "topics": topics, "sink_flush_seconds": 0.5,
        "sink_max_backoff_seconds": 2.0,
        # a killed worker's partitions move after 10 s, not a minute: every kill -9 test waits for that
        "session_timeout_seconds": 10.0,
        # every recovery with anything to read goes through the bulk restore (runtime/faust_seams.py §7)
        "restore_bulk_min_records": 1,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as FLYWHEEL_* environment variables, for a child process."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")} | settings.as_env()


class WorkerProcess:
    """`flywheel worker` (or `flywheel store`: command="store") as a child process (so it can be SIGKILLed
    like a real one)."""

    READY = {"worker": "Worker ready", "store": "store ready"}

    def __init__(self, settings: Settings, *, extra_env: dict[str, str] | None = None, command: str = "worker"):
        self.settings = settings
        self.env = settings_env(settings) | (extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.command = command
        self.log_path = settings.data_dir / f"{command}.log"
        self.starts = 0

    def start(self, *, wait_ready: bool = True) -> WorkerProcess:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", self.command],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
        )
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.command} exited with {self.proc.returncode}:\n{self.log_tail()}")
            log = self.log_path.read_text(errors="replace").rsplit("===== start", 1)[-1]
            return self.READY[self.command] in log

        try:
            wait_until(ready, timeout=timeout, what=f"the {self.command} to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def get(self, path: str) -> bytes:
        """GET from the worker's admin listener (/health, /metrics)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.admin_port}{path}", timeout=10) as r:
            return r.read()

    def ready(self, *, public: bool = False) -> dict:
        """/health/ready of the admin listener (or the public one), 200 or 503 alike."""
        import orjson

        port = self.settings.http_port if public else self.settings.admin_port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=30) as r:
                return orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            return orjson.loads(exc.read())

    def metric(self, name: str, **labels: str) -> float:
        """Value of one Prometheus sample from /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics").decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def sql(self, sql: str) -> list[list]:
        return query.run(self.settings, sql)[1]

    def scalar(self, sql: str) -> Any:
        return self.sql(sql)[0][0]

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final commit, nothing flushed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        terminate(self.proc)

    def log_tail(self, n: int = 60) -> str:
        return tail(self.log_path, n, self.command)


CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/error.log</errorlog></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{tcp_port}</tcp_port>
  <http_port>{http_port}</http_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>536870912</mark_cache_size>
</yandex>
"""

CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"""


def clickhouse_server_binary() -> str | None:
    explicit = os.environ.get("FLYWHEEL_TEST_CLICKHOUSE_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for candidate in ("clickhouse-server", "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"):
        if os.path.isabs(candidate) and os.access(candidate, os.X_OK):
            return candidate
        found = __import__("shutil").which(candidate)
        if found:
            return found
    return None


class ClickHouseServer:
    """A real clickhouse-server on loopback, in its own directory; can be stopped and started again."""

    def __init__(self, directory: Path):
        binary = clickhouse_server_binary()
        if binary is None:
            service_missing(
                "clickhouse-server", "install Debian's package (make test does: scripts/ensure-clickhouse-server)"
            )
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tcp_port = free_port()
        self.http_port = free_port()
        (self.dir / "config.xml").write_text(
            CLICKHOUSE_CONFIG.format(dir=self.dir, tcp_port=self.tcp_port, http_port=self.http_port)
        )
        (self.dir / "users.xml").write_text(CLICKHOUSE_USERS)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"clickhouse://default@127.0.0.1:{self.tcp_port}/default"

    def start(self, timeout: float = 60.0) -> None:
        out = open(self.dir / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config-file={self.dir / 'config.xml'}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
        )
        out.close()

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"clickhouse-server exited: {(self.dir / 'error.log').read_text()[-2000:]}")
            from flywheel.clickhouse.server import ServerClickHouse

            ch = ServerClickHouse(self.url)
            try:
                return ch.rows("SELECT 1")[1] == [(1,)]
            finally:
                ch.close()

        wait_until(answers, timeout=timeout, what=f"clickhouse-server on port {self.tcp_port}")

    def stop(self) -> None:
        terminate(self.proc)


class CollectorProcess:
    """`flywheel collector` (the standalone Segment HTTP collector) as a child process."""

    def __init__(self, settings: Settings, *, port: int | None = None,
                 extra_env: dict[str, str] | None = None):
        self.settings = settings
        self.port = port or free_port()
        self.admin_port = free_port()  # each collector has its own admin listener (/metrics)
        self.env = settings_env(settings) | {"FLYWHEEL_ADMIN_PORT": str(self.admin_port)} | (extra_env or {})
        self.log_path = settings.data_dir / f"collector-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> CollectorProcess:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.cli", "collector", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"collector exited with {self.proc.returncode}:\n{self.log_tail()}")
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200

        wait_until(ready, timeout=timeout, what="the collector to answer /health", interval=0.2)
        return self

    def stop(self) -> None:
        terminate(self.proc, grace=30)

    def log_tail(self, n: int = 40) -> str:
        return tail(self.log_path, n, "collector")


def read_topic(bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted") -> list:
    """Every record of `topic` now (to its end offsets), with a real consumer: ConsumerRecords.

    read_uncommitted (the default) also shows records of open or aborted transactions: the strictest
    check that nothing of a request was written at all.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation_level,
                             enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end offsets {end}")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


# ---- consumer groups (multi-worker tests) ----------------------------------------------------------

def group_assignment(bootstrap: str, group: str) -> list[dict[str, list[int]]] | None:
    """Each member's partitions per topic in a Stable consumer group (None while it rebalances)."""
    from kafka import KafkaAdminClient

    # kafka-python cannot decode Faust's member metadata (it says so at length, per member): not needed.
    logging.getLogger("kafka.admin").setLevel(logging.ERROR)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        group_info = admin.describe_groups([group])[group]
    finally:
        admin.close()
    if group_info["group_state"] != "Stable":
        return None
    members = []
    for member in group_info["members"]:
        assignment = member["member_assignment"] or {"assigned_partitions": []}
        members.append({tp["topic"]: sorted(tp["partitions"]) for tp in assignment["assigned_partitions"]})
    return members


def committed_through(bootstrap: str, group: str, topic: str) -> bool:
    """Whether the group has committed every record of `topic` (nothing would be delivered again). Every
    partition holding records counts, also one the group has no offset for yet — the broker lists only
    committed partitions, and a partition whose first records are not committed yet is the one to wait for."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        committed = {tp: meta.offset for tp, meta in admin.list_group_offsets(group)[group].items()
                     if tp.topic == topic}
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        starts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
    finally:
        admin.close()
        consumer.close()
    return bool(committed) and all(committed.get(tp, -1) >= end for tp, end in ends.items() if end > starts[tp])


def changelog_topics(bootstrap: str, app_id: str) -> list[str]:
    """The changelog topics Faust created for the app's tables ({app id}-{table}-changelog)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        return sorted(t for t in admin.list_topics() if t.startswith(f"{app_id}-") and t.endswith("-changelog"))
    finally:
        admin.close()


def settled(bootstrap: str, settings, n_workers: int) -> dict[str, list[list[int]]] | None:
    """Partitions of events.raw and of each table changelog per worker, once all n workers are in the
    group and every partition of events.raw is owned (else None)."""
    members = group_assignment(bootstrap, settings.app_id)
    if members is None or len(members) != n_workers:
        return None
    raw = [m.get(settings.topics.raw, []) for m in members]
    if not all(raw) or sorted(p for ps in raw for p in ps) != list(range(settings.partitions)):
        return None
    topics = [settings.topics.raw, *changelog_topics(bootstrap, settings.app_id)]
    return {t: [m.get(t, []) for m in members] for t in topics}


def load_stream(ch, rows: list[dict]) -> None:
    """Rows of `flywheel.events` into a store, replacing what it held, and identity_map linking every
    anonymous id `u<n>-d<m>` to its user `u<n>` (the property tests' naming): events_resolved then resolves
    them as the stream joins the devices' states."""
    ch.command("TRUNCATE TABLE flywheel.events")
    ch.command("TRUNCATE TABLE flywheel.identity_map")
    ch.insert("flywheel.events", rows)
    links = {r["anonymous_id"] for r in rows if r["anonymous_id"]}
    ch.insert("flywheel.identity_map", [
        {"distinct_id": a, "person_id": a.split("-")[0], "version": 1, "message_id": f"link-{a}",
         "linked_at": datetime(2026, 1, 1, tzinfo=UTC)} for a in sorted(links)])


class MemoryKafka:
    """Every record a stage's outboxes sent, in order, by topic (unit tests). An outbox whose records include
    a `fail_on` topic raises and lands nothing; with `land` set, only that many records land, then it raises."""

    def __init__(self, partitions: int = 4) -> None:
        self.partitions = partitions
        self.log: dict[str, list[tuple[int, bytes, bytes | None]]] = defaultdict(list)
        self.headers: dict[str, list] = defaultdict(list)  # beside log: each record's headers (or None)
        self.fail_on: set[str] = set()
        self.land: int | None = None

    async def outbox(self):
        kafka = self
        from flywheel.runtime.partitioner import partition_of

        class Outbox:
            def __init__(self) -> None:
                self.records: list[tuple[str, int, bytes, bytes | None]] = []
                self.headers: list = []

            def add(self, topic, key, value, *, partition=None, headers=None) -> None:
                p = partition if partition is not None else partition_of(key, kafka.partitions)
                self.records.append((topic, p, key, value))
                self.headers.append(headers)

            def partitions(self, topic: str) -> list[int]:
                return list(range(kafka.partitions))

            async def send(self):
                if any(t in kafka.fail_on for t, *_ in self.records):
                    raise ConnectionError("the broker went away")  # nothing of this outbox landed
                records = self.records if kafka.land is None else self.records[:kafka.land]
                last = {}
                for (t, p, k, v), h in zip(records, self.headers, strict=False):
                    kafka.log[t].append((p, k, v))
                    kafka.headers[t].append(h)
                    last[(t, p)] = len(kafka.log[t]) - 1
                if kafka.land is not None:
                    kafka.land = None
                    raise ConnectionError("killed while sending")
                return last

        return Outbox()

    def cells(self, topic: str) -> list[dict]:
        return [orjson.loads(v) for _, _, v in self.log[topic]]
