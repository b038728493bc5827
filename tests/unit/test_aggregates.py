"""aggregates.AggregateStage over fake Kafka and ClickHouse: what is published, and when, relative to
the person table — above all across a crash whose replay takes another path (kill -9 mid-batch).
(On a real broker with real kills: tests/integration/test_metrics_stream.py.)"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import orjson
import pytest
from flywheel.aggregates import AggregateStage, partition_of
from flywheel.config import Topics
from flywheel.metrics.definitions import DAY_MS, parse_metrics

METRICS = parse_metrics({
    "lateness": "7d",
    "retention": [{"name": "daily", "cohort_event": "any", "return_event": "any", "period": "day", "horizon": 3}],
})
PARTITIONS = 4
TOPICS = Topics()
DAY0 = 20_000  # a day number


class Store(dict):
    def set_persisted_offset(self, tp, offset: int) -> None:
        pass


class Changelog:
    def get_topic_name(self) -> str:
        return "persons-changelog"


class Table:
    """The persons table as the stage uses it: .data (one dict for every partition), .items()."""

    changelog_topic = Changelog()

    def __init__(self) -> None:
        self.data = Store()

    def items(self):
        return self.data.items()


class Kafka:
    """Every record the stage's outboxes sent, in order, by topic; `fail_on` topics raise on send."""

    def __init__(self) -> None:
        self.sent: dict[str, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        self.fail_on: set[str] = set()

    async def outbox(self, topics):
        kafka = self

        class Outbox:
            def __init__(self) -> None:
                self.records: list[tuple[str, bytes, bytes | None]] = []

            def add(self, topic, key, value, *, partition=None) -> None:
                self.records.append((topic, key, value))

            async def send(self):
                if any(t in kafka.fail_on for t, _, _ in self.records):
                    raise ConnectionError("the broker went away")  # nothing of this outbox landed
                for t, k, v in self.records:
                    kafka.sent[t].append((k, v))
                return {}

        return Outbox()

    def retention(self) -> list[dict]:
        return [orjson.loads(v) for _, v in self.sent[TOPICS.retention]]


class ClickHouse:
    executor = None

    class ch:
        @staticmethod
        def rows(sql):
            return [], []

    def __init__(self) -> None:
        self.rows: list[dict] = []

    async def write(self, table: str, rows: list[dict]) -> None:
        self.rows += rows


def stage(table: Table, kafka: Kafka) -> AggregateStage:
    return AggregateStage(metrics=METRICS, persons=table, partitions=lambda: PARTITIONS,
                          owned=lambda: set(range(PARTITIONS)), sink=ClickHouse(), outbox=kafka.outbox, topics=TOPICS)


class Message:
    def __init__(self, value: dict):
        # Its key, as Kafka partitioned it: the person, a merge marker's anonymous id, a hand-off's user.
        key = {"merge": "from", "state": "person"}.get(value["type"], "personId")
        key = value[key]
        self.partition = partition_of(key.encode(), PARTITIONS)
        self.value = orjson.dumps(value)


def event(person: str, mid: str, day: int) -> Message:
    return Message({"type": "track", "event": "Page Viewed", "messageId": mid, "personId": person,
                    "anonymousId": person, "userId": "", "previousId": "", "groupId": "",
                    "timestamp": (DAY0 + day) * DAY_MS + 3_600_000, "receivedAt": 0, "properties": {},
                    "traits": {}, "context": {}, "source": "test"})


def merge(anon: str, user: str) -> Message:
    return Message({"type": "merge", "from": anon, "into": user, "messageId": f"link-{anon}", "timestamp": 0})


def final_cells(kafka: Kafka) -> dict[tuple, int]:
    """What ClickHouse's retention view would sum: per cell, the highest version per partition."""
    latest: dict[tuple, tuple[int, int]] = {}
    for r in kafka.retention():
        key = (r["cohortDay"], r["period"], r["partition"])
        if key not in latest or r["version"] > latest[key][0]:
            latest[key] = (r["version"], r["persons"])
    out: dict[tuple, int] = defaultdict(int)
    for (cohort, period, _p), (_v, persons) in latest.items():
        out[(cohort, period)] += persons
    return {k: v for k, v in out.items() if v}


def test_cells_are_published_only_after_the_states_that_explain_them_are_written():
    table, kafka = Table(), Kafka()
    s = stage(table, kafka)
    kafka.fail_on = {TOPICS.retention}
    with pytest.raises(ConnectionError):
        asyncio.run(s.process([event("anon-1", "m1", 0), event("anon-1", "m2", 1)]))
    assert b"anon-1" in table.data  # written before the (failed) publication, not after it
    assert kafka.retention() == []


def test_a_crash_before_publishing_a_cell_taken_to_zero_is_repaired_by_the_rebuild():
    """anon-1's cells are published; a merge hands its state to user-1 (another partition) and takes its
    partition's cells to 0; the worker dies after writing the states, before publishing. The replay
    takes another path (the redelivered events now arrive under user-1), so nothing would touch those
    cells again: the restarted stage must publish them as 0 from the table alone."""
    anon, user = "anon-1", "user-7"
    assert partition_of(anon.encode(), PARTITIONS) != partition_of(user.encode(), PARTITIONS)
    table, kafka = Table(), Kafka()
    first = stage(table, kafka)
    asyncio.run(first.process([event(anon, "m1", 0), event(anon, "m2", 1)]))
    assert final_cells(kafka) == {(f"{_day(0)}", 0): 1, (f"{_day(0)}", 1): 1}
    kafka.fail_on = {TOPICS.retention}  # dies before step 5: the hand-off and the states are written
    with pytest.raises(ConnectionError):
        asyncio.run(first.process([merge(anon, user)]))
    assert anon.encode() not in table.data
    kafka.fail_on = set()

    restarted = stage(table, kafka)  # a new process: partials rebuilt from the table
    handoff = orjson.loads(kafka.sent[TOPICS.identified][-1][1])
    asyncio.run(restarted.process([Message(handoff)]))
    # user-1 owns the person now; anon-1's partition counts nobody.
    assert final_cells(kafka) == {(f"{_day(0)}", 0): 1, (f"{_day(0)}", 1): 1}
    by_partition = {(r["cohortDay"], r["period"], r["partition"]): r["persons"] for r in
                    sorted(kafka.retention(), key=lambda r: r["version"])}
    anon_partition = partition_of(anon.encode(), PARTITIONS)
    assert by_partition[(_day(0), 0, anon_partition)] == 0
    assert by_partition[(_day(0), 1, anon_partition)] == 0


def _day(n: int) -> str:
    from flywheel.metrics.partials import day_text

    return day_text(DAY0 + n)
