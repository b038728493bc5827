"""`flywheel persons forget` end to end on a real broker, worker and embedded ClickHouse: the person's
rows, links, dedup entries and state go, the metric views still equal the oracles cell by cell —
closed cells included — and services are told on identity.changes."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from flywheel.metrics import verify
from flywheel.metrics.definitions import parse_metrics
from flywheel.producer import Producer
from flywheel.runtime.partitioner import partition_for
from helpers import REPO, WorkerProcess, read_topic, settings_env, unique_settings, wait_until

pytestmark = pytest.mark.integration

# horizon = lateness 1 + close_after 1 + reach 29 + 1 = 32 days: day 0's cells close once day 40 is seen.
METRICS_YAML = """
lateness: 1d
close_after: 1d
activity: {types: [track, page, screen]}
funnels:
  - name: checkout
    window: 1h
    steps: [{event: Product Viewed}, {event: Product Added}]
retention:
  - {name: daily, cohort_event: any, return_event: any, period: day, horizon: 7}
"""
D0 = datetime(2026, 9, 1, tzinfo=UTC)


def at(day: int, minute: int) -> str:
    return (D0 + timedelta(days=day, minutes=minute)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def track(mid: str, event: str, day: int, minute: int, *, anon: str | None = None, user: str | None = None) -> dict:
    m = {"type": "track", "event": event, "messageId": mid, "timestamp": at(day, minute),
         "properties": {"product_id": "p1"}}  # the tracking plan requires it
    return m | ({"anonymousId": anon} if anon else {}) | ({"userId": user} if user else {})


def identify(mid: str, anon: str, user: str, day: int, minute: int) -> dict:
    return {"type": "identify", "messageId": mid, "anonymousId": anon, "userId": user, "timestamp": at(day, minute)}


EARLY = [  # U browses anonymously as A, signs up, comes back; V converts too; X never signs up
    track("a1", "Product Viewed", 0, 600, anon="A"), track("a2", "Product Added", 0, 605, anon="A"),
    identify("a3", "A", "U", 0, 610), track("u1", "Product Viewed", 1, 660, anon="A", user="U"),
    track("v1", "Product Viewed", 0, 600, user="V"), track("v2", "Product Added", 0, 620, user="V"),
    track("v3", "Product Viewed", 1, 600, user="V"), track("x1", "Product Viewed", 0, 700, anon="X"),
]
LATE = [track("u2", "Product Viewed", 40, 600, user="U"), track("v4", "Product Viewed", 40, 610, user="V"),
        track("w1", "Product Viewed", 40, 620, user="W")]


def test_a_forgotten_person_leaves_no_trace_and_every_metric_stays_exact(kafka, tmp_path):
    metrics_file = tmp_path / "metrics.yaml"
    metrics_file.write_text(METRICS_YAML)
    metrics = parse_metrics(__import__("yaml").safe_load(METRICS_YAML))
    settings = unique_settings(kafka, tmp_path / "flywheel", metrics=metrics_file)
    worker = WorkerProcess(settings).start()

    def send(messages: list[dict]) -> None:
        with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="test") as p:
            for m in messages:
                p.send(m)

    def events() -> int:
        return worker.scalar("SELECT count() FROM flywheel.events FINAL")

    def checkout(day: int, step: int) -> int:
        found = worker.sql(f"SELECT persons FROM flywheel.funnel_daily WHERE funnel = 'checkout' "
                           f"AND day = toDate('{(D0 + timedelta(days=day)).date()}') AND step = {step}")
        return found[0][0] if found else 0

    def exact(what: str) -> None:
        try:
            wait_until(lambda: verify.compare(worker.sql, metrics) == {}, timeout=120, interval=1,
                       what=f"{what}: views equal to the oracles")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; (view-only, oracle-only): {verify.compare(worker.sql, metrics)}") from None

    try:
        send(EARLY)
        wait_until(lambda: events() == len(EARLY) and checkout(0, 2) == 2, timeout=120, what="day 0 published")
        send(LATE)  # day 40: day 0's cells close on every partition that sees it
        wait_until(lambda: events() == len(EARLY) + len(LATE), timeout=120, what="day 40")
        exact("before")
        assert checkout(0, 2) == 2  # U and V, in a cell now closed on U's partition

        forget = subprocess.run([sys.executable, "-m", "flywheel.cli", "persons", "forget", "A"],
                                env=settings_env(settings), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert forget.returncode == 0, forget.stdout + forget.stderr
        assert "person U (A is one of their ids): 2 ids, 5 events" in forget.stdout, forget.stdout

        # ClickHouse: no row of theirs
        assert worker.scalar("SELECT count() FROM flywheel.events WHERE user_id = 'U' OR anonymous_id = 'A'") == 0
        assert worker.scalar("SELECT count() FROM flywheel.identity_map WHERE person_id = 'U'") == 0
        assert events() == len(EARLY) + len(LATE) - 5
        # metrics: open cells through the state, closed ones republished one lower
        exact("after forgetting U")
        assert checkout(0, 2) == 1
        # services were told
        told = [orjson.loads(r.value) for r in read_topic(settings.kafka_bootstrap, settings.topics.identity_changes)]
        forgotten = [t for t in told if t["type"] == "forgotten"]
        assert [(t["person"], sorted(t["ids"])) for t in forgotten] == [("U", ["A", "U"])]
        assert worker.metric("flywheel_forget_requests_total", stage="aggregate") == 1
        # one request per events.raw partition holding A's link or U's messageIds (keyed A, and u2 keyed U)
        raw_partitions = {partition_for(k.encode(), list(range(settings.partitions))) for k in ("A", "U")}
        assert worker.metric("flywheel_forget_requests_total", stage="ingest") == len(raw_partitions)
        # the closed cell's new row says which request lowered it
        assert worker.scalar("SELECT count() FROM flywheel.funnel_partials WHERE correction != ''") > 0

        # The stream forgot too: A is free to link to another user (no conflict with U), and U's last event
        # sent again is a new event, not a retry the dedup table remembers.
        send([identify("a4", "A", "U2", 41, 0), LATE[0]])
        wait_until(lambda: worker.sql("SELECT person_id FROM flywheel.identity_map FINAL WHERE distinct_id = 'A'")
                   == [["U2"]], timeout=120, what="A linked to U2")
        wait_until(lambda: worker.scalar("SELECT count() FROM flywheel.events FINAL WHERE message_id = 'u2'") == 1,
                   timeout=120, what="u2 stored again")
        assert worker.scalar("SELECT count() FROM flywheel.identity_conflicts") == 0
        assert worker.metric("flywheel_events_duplicate_total", source="test") == 0
        exact("after U came back")

        again = subprocess.run([sys.executable, "-m", "flywheel.cli", "persons", "forget", "nobody"],
                               env=settings_env(settings), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "nothing to forget" in again.stdout, again.stdout + again.stderr
    finally:
        worker.stop()
