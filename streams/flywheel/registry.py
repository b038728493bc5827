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
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics, MetricsError, parse_metrics
from flywheel.metrics.store import Change, Stored, applied, diff, key_of, split
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
        if not consumer.partitions_for_topic(topic):
            return Stored()
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


def file_mapping(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such metrics file (FLYWHEEL_METRICS)") from None
    except yaml.YAMLError as exc:
        raise MetricsError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MetricsError(f"{path}: expected a mapping with `funnels:` and/or `retention:`")
    return raw


@dataclass
class InForce:
    """The definitions in force and where they come from (the UI shows it)."""

    metrics: Metrics
    stored: Stored
    source: str  # "stored" | "file" (nothing stored yet)
    file_differs: list[str] = field(default_factory=list)  # keys where FLYWHEEL_METRICS says otherwise

    def describe(self) -> str:
        if self.source == "file":
            return "the metrics file (nothing stored yet)"
        last = self.stored.last
        when = f", last change by {last.author} via {last.via}" if last is not None else ""
        return f"stored definitions, revision {self.stored.revision}{when}"


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
            return InForce(check(settings, file_mapping(settings.metrics), source=str(settings.metrics)), Stored(),
                           "file")
    if stored.empty:
        file = file_mapping(settings.metrics)
        return InForce(check(settings, file, source=str(settings.metrics)), stored, "file")
    mapping = stored.mapping()
    try:
        differs = [c.key for c in diff(mapping, file_mapping(settings.metrics), author="-", via="file", at=0)]
    except MetricsError as exc:  # not in force: said, not fatal
        differs = [f"(unreadable: {exc})"]
    return InForce(check(settings, mapping, source=f"{settings.topics.definitions}@{stored.revision}"), stored,
                   "stored", differs)


def seed(settings: Settings) -> InForce:
    """At a worker's start: an empty store takes the metrics file (one change per definition, via "file");
    otherwise the stored set stays in force and a differing file is logged."""
    stored = read(settings)
    if stored.empty:
        file = file_mapping(settings.metrics)
        check(settings, file, source=str(settings.metrics))
        changes = diff({}, file, author="flywheel worker", via="file", at=wall_ms(),
                       comment=f"first start: {settings.metrics}")
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
    check(settings, applied(old, changes), source="the changed definitions")
    return stored, changes


__all__ = ["Change", "InForce", "StoreUnavailable", "changes_for", "check", "file_mapping", "in_force", "key_of",
           "read", "seed", "split", "write"]
