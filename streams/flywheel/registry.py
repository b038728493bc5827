"""The stored definitions on Kafka: read them, write changes, and which set is in force (docs/design.md §13).

The definitions topic (`FLYWHEEL_TOPIC_DEFINITIONS`, one partition, compacted) is the store; its records
are metrics/store.py's `Change`s. **The stored set wins**: workers, the UI and every command use it. The
metrics file (FLYWHEEL_METRICS) is the code path into it: it seeds an empty store (a first start, an
upgrade from a release without a store), and afterwards goes in only through `flywheel metrics import`,
which records who and when like an edit in the UI. A file that differs from the store is reported (the
worker's log, the UI), never applied behind anyone's back.

Synchronous (kafka-python): commands and start-up use it; a running worker follows the topic with
runtime/definitions.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics, MetricsError, parse_metrics, read_metrics_file
from flywheel.metrics.store import Change, Stored, applied, diff
from flywheel.model.clock import wall_ms

log = logging.getLogger(__name__)

READ_SECONDS = 30.0


class StoreUnavailable(RuntimeError):
    pass


def read(settings: Settings, *, timeout: float = READ_SECONDS) -> Stored:
    """Every record of the definitions topic up to its end, folded. An absent topic is an empty store."""
    from kafka.errors import KafkaError

    from kafka import KafkaConsumer, TopicPartition

    topic = settings.topics.definitions
    _reachable(settings.kafka_bootstrap)
    try:
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                 request_timeout_ms=int(timeout * 1000) + 1000, consumer_timeout_ms=1000,
                                 client_id=f"{settings.app_id}-definitions")
    except KafkaError as exc:
        raise StoreUnavailable(f"cannot reach Kafka at {settings.kafka_bootstrap} to read the stored definitions "
                               f"({exc}): start Kafka (make run starts a local one) or set FLYWHEEL_KAFKA_BOOTSTRAP"
                               ) from None
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return Stored()
        if len(partitions) != 1:  # offsets of several partitions order nothing: no revision
            raise MetricsError(f"the definitions topic {topic} has {len(partitions)} partitions; it needs exactly one "
                               "(and cleanup.policy=compact): recreate it, then `flywheel metrics import` an export")
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        stored = Stored()
        deadline = time.monotonic() + timeout
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"could not read {topic} to its end ({end}) within {timeout:.0f}s")
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    if r.value is not None:
                        stored.fold(r.offset, Change.from_bytes(r.value))
        return stored
    finally:
        consumer.close()


def _reachable(bootstrap: str, timeout: float = 3.0) -> None:
    """Fail at once when no bootstrap server accepts a connection (kafka-python would retry for long)."""
    import socket

    errors = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port or 9092)), timeout=timeout).close()
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    raise StoreUnavailable(f"cannot reach Kafka at {bootstrap} to read the stored definitions ({'; '.join(errors)}):"
                           " start Kafka (make run starts a local one) or set FLYWHEEL_KAFKA_BOOTSTRAP")


def write(settings: Settings, changes: list[Change]) -> int:
    """Append `changes` to the definitions topic (created if missing); the revision of the last one."""
    from flywheel.runtime.topics import ensure_topics
    from kafka import KafkaProducer

    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                             client_id=f"{settings.app_id}-definitions-writer")
    try:
        futures = [producer.send(settings.topics.definitions, key=c.key.encode(), value=c.to_bytes(), partition=0)
                   for c in changes]
        producer.flush()
        return max(f.get(timeout=30).offset for f in futures) if futures else -1
    finally:
        producer.close()


def check(settings: Settings, mapping: dict[str, Any], *, source: str) -> Metrics:
    """The set `mapping` would put in force, compiled — or MetricsError saying what is wrong with it."""
    from flywheel.web.webhooks import problems

    metrics = parse_metrics(mapping, source=source)
    wrong = problems(metrics.alerts, settings.alert_webhooks)
    if wrong:
        raise MetricsError(f"{source}: alerts cannot notify:\n  " + "\n  ".join(wrong))
    return metrics


@dataclass
class InForce:
    """The definitions in force and where they come from (the UI shows it)."""

    metrics: Metrics
    stored: Stored
    source: str  # "stored" | "file" (nothing stored yet)
    file_differs: list[str] = field(default_factory=list)  # keys where FLYWHEEL_METRICS says otherwise
    broken: str = ""  # why the newest stored revision is not the one in force (it does not compile here)

    def describe(self) -> str:
        if self.source == "file":
            return "the metrics file (nothing stored yet)"
        last = self.stored.last
        when = f", last change by {last.author} via {last.via}" if last is not None else ""
        return f"stored definitions, revision {self.stored.revision}{when}" + (
            f" — NOT the newest, which does not compile here: {self.broken}" if self.broken else "")


def in_force(settings: Settings, *, stored: Stored | None = None, fallback: bool = False) -> InForce:
    """The stored set if there is one, else the metrics file's. With `fallback`, a store that cannot be read
    (Kafka down) gives the file's too, with a warning — for commands that only read definitions."""
    if stored is None:
        try:
            stored = read(settings)
        except StoreUnavailable as exc:
            if not fallback:
                raise
            log.warning("%s; using the metrics file %s instead, which may differ from what the workers use",
                        exc, settings.metrics)
            return InForce(check(settings, read_metrics_file(settings.metrics), source=str(settings.metrics)), Stored(),
                           "file")
    if stored.empty:
        file = read_metrics_file(settings.metrics)
        return InForce(check(settings, file, source=str(settings.metrics)), stored, "file")
    try:
        differs = [c.key for c in diff(stored.mapping(), read_metrics_file(settings.metrics), author="-", via="file",
                                       at=0)]
    except MetricsError as exc:  # not in force: said, not fatal
        differs = [f"(unreadable: {exc})"]
    metrics, usable, broken = newest_valid(settings, stored)
    return InForce(metrics, usable, "stored", differs, broken)


def metrics_in_force(settings: Settings) -> Metrics:
    """in_force's metrics for a process that only reads definitions (a command, a collector's assignment)."""
    return in_force(settings, fallback=True).metrics


def file_changes(settings: Settings, *, author: str, comment: str) -> list[Change]:
    """The metrics file as changes onto an empty store (via "file"): what a first store holds."""
    return diff({}, read_metrics_file(settings.metrics), author=author, via="file", at=wall_ms(), comment=comment)


def newest_valid(settings: Settings, stored: Stored) -> tuple[Metrics, Stored, str]:
    """The newest revision of the stored set that compiles here, the set at it, and why newer ones do not
    (""). Writers check before they write, but what compiles also depends on a process's environment (its
    webhook allowlist and secrets): one process refusing a set keeps the last it can run, and says so."""
    try:
        return check(settings, stored.mapping(), source=f"{settings.topics.definitions}@{stored.revision}"), stored, ""
    except MetricsError as exc:
        broken = str(exc)
    for offset, _ in reversed(stored.records[:-1]):
        earlier = stored.upto(offset)
        try:
            metrics = check(settings, earlier.mapping(), source=f"{settings.topics.definitions}@{offset}")
        except MetricsError:
            continue
        log.error("definitions revision %d does not compile here (%s): revision %d stays in force", stored.revision,
                  broken, offset)
        return metrics, earlier, broken
    raise MetricsError(f"no revision of {settings.topics.definitions} compiles here; the newest: {broken}")


def checked(settings: Settings, old: dict[str, Any], changes: list[Change], *, source: str) -> Metrics:
    """What `changes` on `old` would put in force — as the store will give them back (a value JSON cannot
    carry, say NaN, would not survive it) — compiled, or MetricsError."""
    return check(settings, applied(old, [Change.from_bytes(c.to_bytes()) for c in changes]), source=source)


def seed(settings: Settings, *, audited: int = 0) -> InForce:
    """At a worker's start: an empty store takes the metrics file (one change per definition, via "file");
    otherwise the stored set stays in force and a differing file is logged. `audited`: the changes ClickHouse's
    audit trail holds — an empty store beside a trail was lost (a topic recreated, another cluster), and taking
    the file then would silently undo every edit: refused."""
    stored = read(settings)
    if stored.empty and audited:
        raise MetricsError(f"the definitions topic {settings.topics.definitions} is empty, but "
                           f"flywheel.definition_changes records {audited} changes: the stored definitions were lost "
                           "(a topic deleted or recreated, another Kafka?). Put them back with `flywheel metrics "
                           "import FILE` (an export, or rebuild one from definition_changes), then start again")
    if stored.empty:
        check(settings, read_metrics_file(settings.metrics), source=str(settings.metrics))
        changes = file_changes(settings, author="flywheel worker", comment=f"first start: {settings.metrics}")
        if changes:
            write(settings, changes)
            stored = read(settings)
            log.info("definitions stored from %s: %d (revision %d)", settings.metrics, len(changes), stored.revision)
    state = in_force(settings, stored=stored)
    if state.file_differs:
        log.warning("%s differs from the stored definitions in %s: the stored ones are in force (`flywheel metrics "
                    "import %s` applies the file, `flywheel metrics export` shows what is stored)",
                    settings.metrics, ", ".join(state.file_differs), settings.metrics)
    return state


def changes_for(settings: Settings, new: dict[str, Any], *, author: str, via: str, comment: str = "",
                stored: Stored | None = None, keep_others: bool = False) -> tuple[Stored, list[Change]]:
    """The changes that put `new` in force — deleting what it leaves out, unless `keep_others` —, checked:
    MetricsError if the result would be invalid."""
    stored = read(settings) if stored is None else stored
    old = stored.mapping()
    changes = diff(old, new, author=author, via=via, at=wall_ms(), comment=comment)
    if keep_others:
        changes = [c for c in changes if c.spec is not None]
    checked(settings, old, changes, source="the changed definitions")
    return stored, changes

