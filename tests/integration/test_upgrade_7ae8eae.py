"""A worker of this release starts on the state release 7ae8eae left behind, and carries on exactly.

tests/data/changelog-7ae8eae/ holds what a 7ae8eae worker wrote for a small stream (see its README):
every record of its table changelogs (`message-ids`, `identity`, `persons`: the names make the
changelog topics' names, so they must not change), of its topics, its committed offsets and its
ClickHouse rows. Here they are put back — changelogs and topics into a fresh broker's topics, offsets
committed for the group, rows into embedded ClickHouse — and today's worker starts on them, as after an
upgrade. It must read all three tables:

- `message-ids`: SDK retries of events 7ae8eae saw are dropped;
- `identity`: a new link of an anonymous id 7ae8eae linked is refused as a conflict with its old user;
- `persons` (first-format states, per-partition records without a checkpoint): the partials are counted
  from the old states, and after new events for old persons (a return, an anonymous person signing up,
  a funnel finished) every view equals ClickHouse's own functions over all events, old and new.
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import pytest
import yaml
from flywheel import paths
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.clickhouse.migrate import apply as migrate
from flywheel.metrics import verify
from flywheel.metrics.definitions import parse_metrics
from flywheel.producer import Producer
from flywheel.runtime.topics import ensure_topics
from helpers import WorkerProcess, unique_settings, wait_until

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "changelog-7ae8eae"
FACTS = json.loads((FIXTURE / "facts.json").read_text())
# The metrics 7ae8eae ran with, and the activity rule it applied: every call was activity. (Under the
# default rule the old states' identify days would differ from the oracles until they age out, as the
# README says: here the point is that the state is read exactly.)
METRICS_DOC = yaml.safe_load((FIXTURE / "metrics.yaml").read_text()) | {
    "activity": {"types": ["track", "page", "screen", "identify", "alias", "group"]}}
METRICS = parse_metrics(METRICS_DOC)
TABLES = ("events", "invalid_events", "identity_map", "identity_conflicts", "funnel_partials",
          "retention_partials", "active_user_partials")


def _b64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


def restore(settings) -> None:
    """The fixture's topics, changelogs, committed offsets and ClickHouse rows, under `settings`' names."""
    from kafka.structs import OffsetAndMetadata

    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    ensure_topics(settings)
    names = settings.topics.model_dump()
    changelog = {t: f"{settings.app_id}-{t}-changelog" for t in ("message-ids", "identity", "persons")}
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    for line in (FIXTURE / "changelogs.jsonl").read_text().splitlines():
        r = json.loads(line)
        producer.send(changelog[r["table"]], key=_b64(r["key"]), value=_b64(r["value"]), partition=r["partition"])
    with gzip.open(FIXTURE / "topics.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            headers = [(name, base64.b64decode(v)) for name, v in r["headers"] or []]
            producer.send(names[r["topic"]], key=_b64(r["key"]), value=_b64(r["value"]), partition=r["partition"],
                          headers=headers)
    producer.flush()
    producer.close()
    committed = json.loads((FIXTURE / "offsets.json").read_text())["committed"]
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.app_id,
                             enable_auto_commit=False)
    consumer.commit({TopicPartition(names[role], int(p)): OffsetAndMetadata(offset, "", -1)
                     for role, by_partition in committed.items() for p, offset in by_partition.items()})
    consumer.close()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ch = EmbeddedClickHouse(settings.clickhouse_dir)
    try:
        migrate(ch, paths.sql_dir() / "migrations")
        for table in TABLES:
            rows = (FIXTURE / "clickhouse" / f"{table}.jsonl").read_text()
            ch.command(f"INSERT INTO flywheel.{table} FORMAT JSONEachRow\n{rows}")
    finally:
        ch.close()


def test_a_worker_carries_on_from_the_state_7ae8eae_wrote(kafka, tmp_path):
    metrics_file = tmp_path / "metrics.yaml"
    metrics_file.write_text(yaml.safe_dump(METRICS_DOC))
    settings = unique_settings(kafka, tmp_path / "flywheel", metrics=metrics_file)
    restore(settings)
    worker = WorkerProcess(settings).start()
    try:
        def events() -> int:
            return worker.scalar("SELECT count() FROM flywheel.events FINAL")

        def equal_views():
            v, o = verify.views(worker.sql), verify.oracles(worker.sql, METRICS)
            return v if v == o else None

        assert events() == FACTS["counts"]["events_rows_final"]
        # The old per-partition records carry no checkpoint: each partition was counted from its states,
        # and what it publishes again equals ClickHouse's own functions over 7ae8eae's events.
        wait_until(lambda: worker.metric("flywheel_partials_restored_total", how="count") == settings.partitions,
                   timeout=60, what="the partials counted from the first-format states")
        before = wait_until(equal_views, timeout=120, what="views equal to the oracles over 7ae8eae's events")

        day = 86_400_000
        newest = max(meta["watermark"] for meta in FACTS["persons_meta"].values())
        retries = FACTS["sdk_retries_dropped"]
        anon, user = FACTS["links"][0]["anonymousId"], FACTS["links"][0]["userId"]
        with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="upgrade") as p:
            for r in retries:  # SDK retries of events 7ae8eae stored: new records, same key, same messageId
                p.send({"type": "track", "event": "Retried", "anonymousId": r["key"],
                        "messageId": r["messageId"], "timestamp": _iso(newest)})
            # an anonymous id 7ae8eae linked, now named by another user: refused, it stays where it was
            p.send({"type": "identify", "anonymousId": anon, "userId": "user-upgrade", "messageId": "up-conflict",
                    "timestamp": _iso(newest)})
            # old persons carry on: a return two days on, an anonymous person signing up and buying
            p.send({"type": "track", "event": "Page Viewed", "userId": "user-03", "messageId": "up-return",
                    "timestamp": _iso(newest + 2 * day)})
            p.send({"type": "identify", "anonymousId": "anon-30-a", "userId": "user-30", "messageId": "up-signup",
                    "timestamp": _iso(newest + 1000)})
            p.send({"type": "track", "event": "Order Completed", "userId": "user-30", "messageId": "up-order",
                    "properties": {"order_id": "o-up", "revenue": 10.0}, "timestamp": _iso(newest + 2000)})
        new_events = 4  # the refused identify is an event too
        wait_until(lambda: events() == FACTS["counts"]["events_rows_final"] + new_events, timeout=180,
                   what="the new events and nothing else")
        wait_until(lambda: worker.metric("flywheel_events_duplicate_total", source="upgrade") == len(retries),
                   timeout=60, what="every SDK retry dropped")
        ids = ", ".join(f"'{r['messageId']}'" for r in retries)
        assert worker.scalar(f"SELECT count() FROM flywheel.events FINAL WHERE message_id IN ({ids})") == len(retries)
        wait_until(lambda: worker.sql("SELECT linked_to, refused FROM flywheel.identity_conflicts FINAL "
                                      "WHERE message_id = 'up-conflict'") == [[user, "user-upgrade"]],
                   timeout=120, what="the refused link")
        after = wait_until(equal_views, timeout=180, what="views equal to the oracles over old and new events")
        # user-30, anonymous under 7ae8eae, bought after signing up: one more person of the old anonymous
        # state's cohort returned that day (its first-seen was read from the first-format state)
        cohort_day = min(FACTS["anonymous_person_example"]["state"]["d"])
        period = (newest + 2000) // day - cohort_day
        cell = {c[:3]: c[3] for c in before["retention_daily"]}.get(("daily", _day(cohort_day), str(period)), 0.0)
        assert {c[:3]: c[3] for c in after["retention_daily"]}[("daily", _day(cohort_day), str(period))] == cell + 1
    finally:
        worker.stop()


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _day(day: int) -> str:
    from flywheel.model.clock import day_text

    return day_text(day)
