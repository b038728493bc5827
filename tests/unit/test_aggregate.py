"""stages/aggregate.py over an in-memory Kafka and table: what is published, and when, relative to the
person table; what a retry costs; how partials come back at assignment (checkpoint, or a count of the
states when the checkpoint is torn or absent). On a real broker with real kills:
tests/integration/test_metrics_stream.py."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import orjson
import pytest
from flywheel.config import Topics
from flywheel.metrics.definitions import Retention, parse_metrics
from flywheel.model.clock import DAY_MS, day_text
from flywheel.runtime.partitioner import partition_of
from flywheel.stages.aggregate import BEGIN, END, AggregateStage, owner_of
from flywheel.stages.tables import MemoryTable
from helpers import MemoryKafka as Kafka

METRICS = parse_metrics({
    "lateness": "7d",
    "funnels": [{"name": "f", "window": "1d", "steps": [{"event": "Page Viewed"}, {"event": "Buy"}]}],
    "retention": [{"name": "daily", "cohort_event": "any", "return_event": "any", "period": "day", "horizon": 3}],
})
PARTITIONS = 4
TOPICS = Topics()
CHANGELOG = "persons-changelog"
DAY0 = 20_000  # a day number


class Table(MemoryTable):
    """The persons table, restored from the changelog like Faust's recovery; counts the person states
    scans read (what a rebuild costs)."""

    def __init__(self, kafka: Kafka) -> None:
        super().__init__(CHANGELOG)
        for p, k, v in kafka.log[CHANGELOG]:
            self.write(p, {k: v}, None)
        self.person_reads = 0

    def scan(self, partition, prefix=b"", start=b""):
        for k, v in super().scan(partition, prefix, start):
            if not k.startswith(b"\x00"):
                self.person_reads += 1
            yield k, v


class ClickHouse:
    """Rows inserted; `down` makes inserts fail as an unreachable server would."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.down = 0  # inserts still to fail

    async def write(self, table: str, rows: list[dict]) -> None:
        if self.down:
            self.down -= 1
            raise ConnectionError("ClickHouse is unreachable")
        self.rows += rows

    async def counted(self, message_ids) -> set[str]:
        return set()


async def retry_forever(attempt, name, size):
    while True:
        try:
            return await attempt()
        except ConnectionError:
            await asyncio.sleep(0)


def stage(table: Table, kafka: Kafka, ch: ClickHouse | None = None, metrics=METRICS) -> AggregateStage:
    return AggregateStage(metrics=metrics, persons=table, sink=ch or ClickHouse(), outbox=kafka.outbox,
                          topics=TOPICS, retry=retry_forever)


class Record:
    def __init__(self, value: dict):
        # Its key, as Kafka partitioned it: the person, a merge marker's anonymous id, a hand-off's user.
        # A partition's switch report goes to the leader partition (stages/backfill.py).
        key = {"merge": "from", "state": "person", "forget": "person"}.get(value["type"], "personId")
        self.partition = 0 if value["type"] == "switched" else partition_of(value[key].encode(), PARTITIONS)
        self.value = orjson.dumps(value)


def event(person: str, mid: str, day: int, name: str = "Page Viewed") -> Record:
    return Record({"type": "track", "event": name, "messageId": mid, "personId": person,
                   "anonymousId": person, "userId": "", "previousId": "", "groupId": "",
                   "timestamp": (DAY0 + day) * DAY_MS + 3_600_000, "receivedAt": 0, "properties": {},
                   "traits": {}, "context": {}, "source": "test"})


def merge(anon: str, user: str) -> Record:
    return Record({"type": "merge", "from": anon, "into": user, "messageId": f"link-{anon}", "timestamp": 0})


def final_cells(kafka: Kafka, topic: str = TOPICS.retention) -> dict[tuple, int]:
    """What ClickHouse's view would sum: per cell, the highest version per partition (one version of each
    definition here: the key leaves it out)."""
    latest: dict[tuple, tuple[int, int]] = {}
    for r in kafka.cells(topic):
        key = tuple(v for k, v in r.items() if k not in ("persons", "version", "correction", "definitionVersion"))
        if key not in latest or r["version"] > latest[key][0]:
            latest[key] = (r["version"], r["persons"])
    out: dict[tuple, int] = defaultdict(int)
    for key, (_v, persons) in latest.items():
        out[key[:-1]] += persons  # summed over partitions (the key's last field)
    return {k: v for k, v in out.items() if v}


def run(coro):
    return asyncio.run(coro)


async def repair(s: AggregateStage, partitions=range(PARTITIONS)) -> None:
    s.assigned(partitions)
    await asyncio.gather(*s._repairs.values())


def test_cells_are_published_only_after_the_states_that_explain_them_are_written():
    kafka = Kafka()
    table = Table(kafka)

    async def go():
        s = stage(table, kafka)
        kafka.fail_on = {TOPICS.retention}
        with pytest.raises(ConnectionError):
            await s.process([event("anon-1", "m1", 0), event("anon-1", "m2", 1)])
        assert table.get(partition_of(b"anon-1", PARTITIONS), b"anon-1") is not None  # before the publication
        assert kafka.cells(TOPICS.retention) == []
        kafka.fail_on = set()
        await s.process([event("anon-1", "m1", 0), event("anon-1", "m2", 1)])  # the retry publishes them
    run(go())
    assert final_cells(kafka) == {("daily", day_text(DAY0), 0): 1, ("daily", day_text(DAY0), 1): 1}


def test_the_states_land_only_once_the_batchs_rows_are_in_clickhouse():
    """A batch's states and cells are sent only once its rows are in ClickHouse: a row stored as counted is
    what proves a redelivered event was applied (AggregateStage._run)."""
    kafka = Kafka()
    table = Table(kafka)

    class SlowClickHouse(ClickHouse):
        def __init__(self) -> None:
            super().__init__()
            self.inserted = asyncio.Event()

        async def write(self, table_: str, rows: list[dict]) -> None:
            await self.inserted.wait()
            await super().write(table_, rows)

    async def go():
        ch = SlowClickHouse()
        s = stage(table, kafka, ch)
        await repair(s)
        changelog = len(kafka.log[CHANGELOG])
        batch = asyncio.ensure_future(s.process([event("anon-1", "m1", 0), event("anon-2", "m2", 1)]))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not batch.done()
        assert len(kafka.log[CHANGELOG]) == changelog and kafka.cells(TOPICS.active_users) == []
        ch.inserted.set()
        await batch
        assert len(ch.rows) == 2 and len(kafka.log[CHANGELOG]) > changelog and kafka.cells(TOPICS.active_users)
    run(go())


async def clean_run(*batches) -> Kafka:
    kafka = Kafka()
    s = stage(Table(kafka), kafka)
    for batch in batches:
        await s.process(batch)
    return kafka


def test_a_retry_redoes_the_batch_and_nothing_more():
    """ClickHouse down for five attempts of a batch: each retry redoes only the batch — no person state
    is read by a scan — and the result is what one clean attempt gives."""
    first = [event(f"p{i}", f"m{i}", i % 3) for i in range(40)]
    second = [event(f"p{i}", f"n{i}", 3, "Buy") for i in range(40)]
    kafka = Kafka()
    table = Table(kafka)
    ch = ClickHouse()

    async def go():
        s = stage(table, kafka, ch)
        await repair(s)
        await s.process(first)
        reads = table.person_reads
        ch.down = 5
        for _ in range(5):
            with pytest.raises(ConnectionError):
                await s.process(second)
        await s.process(second)
        assert table.person_reads == reads  # nothing O(persons) on a retry
        return await clean_run(first, second)
    clean = run(go())
    for topic in (TOPICS.retention, TOPICS.funnels, TOPICS.active_users):
        assert final_cells(kafka, topic) == final_cells(clean, topic)


def test_a_crash_before_publishing_a_cell_taken_to_zero_is_repaired_at_assignment():
    """anon-1's cells are published; a merge hands its state to user-7 (another partition) and takes its
    partition's cells to 0; the worker dies after writing the states, before publishing. The replay
    takes another path (the redelivered events now arrive under user-7), so nothing would touch those
    cells again: the restarted stage must publish them as 0 at assignment, from its checkpoint alone."""
    anon, user = "anon-1", "user-7"
    anon_partition = partition_of(anon.encode(), PARTITIONS)
    assert anon_partition != partition_of(user.encode(), PARTITIONS)
    kafka = Kafka()

    async def before_the_crash():
        first = stage(Table(kafka), kafka)
        await first.process([event(anon, "m1", 0), event(anon, "m2", 1)])
        kafka.fail_on = {TOPICS.retention}  # dies before step 5: the hand-off and the states are written
        with pytest.raises(ConnectionError):
            await first.process([merge(anon, user)])
    run(before_the_crash())
    kafka.fail_on = set()
    assert final_cells(kafka) == {("daily", day_text(DAY0), 0): 1, ("daily", day_text(DAY0), 1): 1}

    table = Table(kafka)  # a new process: the store as the changelog restores it
    assert table.get(anon_partition, anon.encode()) is None

    async def restart():
        restarted = stage(table, kafka)
        await repair(restarted)  # no traffic yet
        assert table.person_reads == 0  # loaded from the checkpoint
        by_partition = {(r["cohortDay"], r["period"], r["partition"]): r["persons"]
                        for r in sorted(kafka.cells(TOPICS.retention), key=lambda r: r["version"])}
        assert by_partition[(day_text(DAY0), 0, anon_partition)] == 0
        assert by_partition[(day_text(DAY0), 1, anon_partition)] == 0
        handoff = [rec for _, _, v in kafka.log[TOPICS.identified] if (rec := orjson.loads(v))["type"] == "state"][-1]
        await restarted.process([Record(handoff)])
    run(restart())
    assert final_cells(kafka) == {("daily", day_text(DAY0), 0): 1, ("daily", day_text(DAY0), 1): 1}


def test_assignment_loads_the_checkpoint_and_republishes_every_cell():
    kafka = Kafka()

    async def go():
        s = stage(Table(kafka), kafka)
        await s.process([event(f"p{i}", f"m{i}", i % 5, "Buy" if i % 4 else "Page Viewed") for i in range(60)])
        before = {t: final_cells(kafka, t) for t in (TOPICS.retention, TOPICS.funnels, TOPICS.active_users)}
        published = len(kafka.cells(TOPICS.retention))
        table = Table(kafka)
        restarted = stage(table, kafka)
        await repair(restarted)
        assert table.person_reads == 0
        counted = sum(isinstance(c[0], Retention) for part in s.partials.parts.values() for c in part.counts)
        assert len(kafka.cells(TOPICS.retention)) - published == counted  # every counted cell once more
        assert {t: final_cells(kafka, t) for t in before} == before
        for p in range(PARTITIONS):
            assert restarted.partials.parts[p].counts == s.partials.parts[p].counts
    run(go())


def test_a_torn_checkpoint_is_counted_from_the_states():
    """A crash while a batch's states were landing: its `begin` mark and some states are in the changelog,
    its `end` mark is not. The restarted stage must not trust the checkpoint: it counts the states, and
    the batch's replay then gives exactly the clean result."""
    first = [event(f"p{i}", f"m{i}", 0) for i in range(30)]
    second = [event(f"p{i}", f"n{i}", 2, "Buy") for i in range(30)]
    kafka = Kafka()

    async def crash():
        s = stage(Table(kafka), kafka)
        await s.process(first)
        kafka.land = 5  # the persons' writes (the first outbox of the batch) are cut after 5 records
        with pytest.raises(ConnectionError):
            await s.process(second)
    run(crash())
    assert any(k.startswith(BEGIN) for _, k, _ in kafka.log[CHANGELOG][-5:])
    table = Table(kafka)

    async def restart():
        restarted = stage(table, kafka)
        await repair(restarted)
        assert table.person_reads > 0  # counted
        await restarted.process(second)
        return await clean_run(first, second)
    clean = run(restart())
    for topic in (TOPICS.retention, TOPICS.funnels, TOPICS.active_users):
        assert final_cells(kafka, topic) == final_cells(clean, topic)
    again = Table(kafka)  # and the count left a whole checkpoint: the next start loads it
    run(repair(stage(again, kafka)))
    assert again.person_reads == 0


def test_a_table_of_the_first_release_is_counted_once_then_checkpointed():
    """7ae8eae wrote per-partition records {watermark, version, zeros} without a sequence number."""
    kafka = run(clean_run([event(f"p{i}", f"m{i}", i % 4) for i in range(20)]))
    cells = final_cells(kafka)
    old_kafka = Kafka()  # the same states, with bookkeeping as the first release wrote it
    for p, k, v in kafka.log[CHANGELOG]:
        if k.startswith(END):
            v = orjson.dumps({key: val for key, val in orjson.loads(v).items() if key in ("watermark", "version")}
                             | {"zeros": []})
        elif k.startswith(b"\x00"):
            continue
        old_kafka.log[CHANGELOG].append((p, k, v))
    table = Table(old_kafka)
    run(repair(stage(table, old_kafka)))
    assert table.person_reads == 2 * 20  # two passes: the newest event time, then the counts
    assert final_cells(old_kafka) == cells
    again = Table(old_kafka)
    run(repair(stage(again, old_kafka)))
    assert again.person_reads == 0


def test_owner_of_a_bookkeeping_key_is_the_partition_it_names():
    assert owner_of(END + b"3", lambda k: 0) == 3
    assert owner_of(b"\x00cell\x002\x00f|x@1|3|1", lambda k: 0) == 2
    assert owner_of(b"user-1", lambda k: 1) == 1


def identify(person: str, mid: str, day: int, traits: dict | None = None) -> Record:
    return Record({"type": "identify", "event": "", "messageId": mid, "personId": person, "anonymousId": "",
                   "userId": person, "previousId": "", "groupId": "", "timestamp": (DAY0 + day) * DAY_MS,
                   "receivedAt": 0, "properties": {}, "traits": {"plan": "pro"} if traits is None else traits,
                   "context": {}, "source": "crm"})


def test_a_burst_of_trait_sync_identifies_changes_no_active_count():
    """A nightly CRM sync identifies every customer: no one becomes active, no cohort is made — and a refused
    identify (its anonymous id belongs to someone else: the ingest stage keys it by the refused user) is
    no activity either."""
    kafka = Kafka()
    table = Table(kafka)

    async def go():
        s = stage(table, kafka)
        await s.process([event("p1", "m1", 0)])
        before = {t: final_cells(kafka, t) for t in (TOPICS.retention, TOPICS.active_users)}
        published = {t: len(kafka.cells(t)) for t in before}
        await s.process([identify(f"p{i}", f"sync-{i}", 1) for i in range(1, 50)])
        assert {t: final_cells(kafka, t) for t in before} == before
        assert {t: len(kafka.cells(t)) for t in before} == published  # not even re-published
        assert all(table.get(partition_of(f"p{i}".encode(), PARTITIONS), f"p{i}".encode()) is None
                   for i in range(2, 50))  # persons that only synced traits have no state
    run(go())


class Published(ClickHouse):
    """closed_values over what the stage published, as ClickHouse would hold it once the metrics sink
    caught up — or, with `lag`, before the sink has the last `lag` records of each metrics topic."""

    def __init__(self, kafka: Kafka) -> None:
        super().__init__()
        self.kafka = kafka
        self.lag = 0

    async def closed_values(self, partition, cells, request):
        from flywheel.metrics.cells import record as cell_record

        out = {}
        for cell in cells:
            kind, key, _ = cell_record(cell, partition, 0, 0)
            log = self.kafka.log[getattr(TOPICS, kind.name)]
            rows = [orjson.loads(v) for _, k, v in log[:len(log) - self.lag] if k == key]
            others = [r for r in rows if r.get("correction") != request]
            if rows:
                latest = max(others, key=lambda r: r["version"]) if others else {"persons": 0, "version": 0}
                out[cell] = (latest["persons"], latest["version"], len(others) < len(rows))
        return out


def forget(person: str, request: str, cells=(), primary: bool = True) -> Record:
    from flywheel.metrics.cells import cell_id

    rec = {"type": "forget", "person": person, "requestId": request, "at": 1_000_000_000,
           "cells": [cell_id(c) for c in cells]}
    return Record(rec | ({"primary": True, "ids": [person]} if primary else {}))


def corrections(kafka: Kafka, request: str) -> list[dict]:
    return [r for r in kafka.cells(TOPICS.funnels) if r.get("correction") == request]


def test_forgetting_a_person_takes_them_out_of_open_and_closed_cells_once():
    """p and q are active on day 0 and day 80 (lateness 7 d: horizon 7 + 30 + 29 + 1 = 67 days — so day 80
    closes day 0). Forgetting p: its state goes, open cells lose it through the delta, the closed cells it
    is listed in are republished one lower, marked with the request — the same records again on a
    redelivery, none on a second request (the command run again: no state left) — and services are told."""
    f, daily = METRICS.funnels[0], METRICS.retention[0]
    kafka = Kafka()
    table = Table(kafka)
    ch = Published(kafka)
    p_part = partition_of(b"p", PARTITIONS)
    q = next(f"q{i}" for i in range(100) if partition_of(f"q{i}".encode(), PARTITIONS) == p_part)  # p's partition

    async def go():
        s = stage(table, kafka, ch)
        await repair(s)
        await s.process([event("p", "p1", 0), event(q, "q1", 0)])
        await s.process([event("p", "p2", 80), event(q, "q2", 80)])  # day 0's cells close on p's partition
        assert final_cells(kafka, TOPICS.funnels)[("f", day_text(DAY0), 1)] == 2
        assert final_cells(kafka, TOPICS.funnels)[("f", day_text(DAY0 + 80), 1)] == 2
        cells = [(f, DAY0, 1), (f, DAY0 + 80, 1), (daily, DAY0, 0)]
        await s.process([forget("p", "r1", cells)])
        assert table.get(p_part, b"p") is None
        funnels = final_cells(kafka, TOPICS.funnels)
        assert funnels[("f", day_text(DAY0), 1)] == 1  # closed: republished one lower
        assert funnels[("f", day_text(DAY0 + 80), 1)] == 1  # open: through p's state
        assert final_cells(kafka)[("daily", day_text(DAY0), 0)] == 1  # a cohort size is always open
        assert [r["persons"] for r in corrections(kafka, "r1")] == [1]
        told = [orjson.loads(v) for _, _, v in kafka.log[TOPICS.identity_changes]]
        assert told == [{"type": "forgotten", "person": "p", "ids": ["p"], "requestId": "r1", "timestamp": 1000}]

        await s.process([forget("p", "r1", cells)])  # redelivered
        await s.process([forget("p", "r2", cells)])  # the command run again
        assert final_cells(kafka, TOPICS.funnels) == funnels
        assert corrections(kafka, "r2") == [] and len(told) + 2 == len(kafka.log[TOPICS.identity_changes])
    run(go())


def test_two_persons_forgotten_while_the_sink_lags_are_both_taken_out_of_a_closed_cell():
    f = METRICS.funnels[0]
    kafka = Kafka()
    ch = Published(kafka)
    part = partition_of(b"p0", PARTITIONS)
    people = [f"p{i}" for i in range(200) if partition_of(f"p{i}".encode(), PARTITIONS) == part][:3]

    async def go():
        s = stage(Table(kafka), kafka, ch)
        await repair(s)
        await s.process([event(p, f"{p}-1", 0) for p in people])
        await s.process([event(p, f"{p}-2", 80) for p in people])
        assert final_cells(kafka, TOPICS.funnels)[("f", day_text(DAY0), 1)] == 3
        await s.process([forget(people[0], "r1", [(f, DAY0, 1)])])
        ch.lag = 10**6  # ClickHouse has none of it yet: the worker remembers its own correction
        await s.process([forget(people[1], "r2", [(f, DAY0, 1)]), forget(people[2], "r3", [(f, DAY0, 1)])])
        assert final_cells(kafka, TOPICS.funnels).get(("f", day_text(DAY0), 1), 0) == 0
    run(go())


# ---- segments (docs/design.md §9) ------------------------------------------------------------------
SEGMENTS = parse_metrics({
    "lateness": "7d",
    "segments": [
        {"name": "viewers", "all": [{"performed": "Page Viewed", "count": {"gte": 2}, "within": "2d"}]},
        {"name": "pro", "all": [{"trait": {"plan": "pro"}}]},
    ],
})


class Clock:
    def __init__(self, ms: int):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def segment_stage(table: Table, kafka: Kafka, clock: Clock) -> AggregateStage:
    return AggregateStage(metrics=SEGMENTS, persons=table, sink=ClickHouse(), outbox=kafka.outbox,
                          topics=TOPICS, retry=retry_forever, clock=clock)


def handoff(kafka: Kafka) -> list[Record]:
    """The hand-offs the stage sent to events.identified, as the records its next batch reads."""
    return [Record(orjson.loads(v)) for _, _, v in kafka.log[TOPICS.identified]]


def audiences(kafka: Kafka) -> list[tuple[str, str, str]]:
    return [(r["event"].split()[1], r["properties"]["segment"], r["properties"]["person_id"])
            for r in kafka.cells(TOPICS.segments)]


def members(kafka: Kafka) -> set[tuple[str, str]]:
    """What the compacted topic replays into: per segment|person key, the latest record is an entry."""
    latest = {}
    for _, key, value in kafka.log[TOPICS.segments]:
        latest[key] = orjson.loads(value)
    return {tuple(k.decode().split("|")) for k, r in latest.items() if r["event"] == "Audience Entered"}


def test_a_stitched_person_enters_once_and_the_anonymous_one_leaves():
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS)

    async def go():
        s = segment_stage(Table(kafka), kafka, clock)
        await repair(s)
        await s.process([event("anon", "v1", 0), event("anon", "v2", 0)])
        assert audiences(kafka) == [("Entered", "viewers", "anon")]
        await s.process([merge("anon", "user")])  # the anonymous state leaves for its user...
        await s.process(handoff(kafka))  # ...who joins it
        await s.process([event("user", "v3", 1)])  # nothing new: already a member
    run(go())
    assert audiences(kafka) == [("Entered", "viewers", "anon"), ("Exited", "viewers", "anon"),
                                ("Entered", "viewers", "user")]
    user_entry = kafka.cells(TOPICS.segments)[2]
    assert user_entry["userId"] == "user" and user_entry["anonymousId"] is None
    assert kafka.cells(TOPICS.segments)[0]["anonymousId"] == "anon"
    assert members(kafka) == {("viewers", "user")}


def test_time_passing_makes_a_member_exit_through_the_sweep_without_a_scan():
    kafka = Kafka()
    table = Table(kafka)
    clock = Clock((DAY0 + 1) * DAY_MS + 7_200_000)  # day 1, 02:00
    others = [event(f"o{i}", f"o{i}", 0) for i in range(30)]  # one view each: never members

    async def go():
        s = segment_stage(table, kafka, clock)
        await repair(s)
        await s.process([event("p", "v1", 0), event("p", "v2", 1), *others])
        assert members(kafka) == {("viewers", "p")}
        clock.ms = (DAY0 + 2) * DAY_MS + 3_600_000  # v1 (day 0, 01:00) has just left the 2-day window
        reads = table.person_reads
        assert await s.sweep() == 31  # p and the 30 others, whose views left the window too: nobody else
        assert table.person_reads == reads  # the due index, not a scan of the persons
        assert members(kafka) == set()
        assert await s.sweep() == 0  # nothing is due any more
    run(go())
    assert audiences(kafka) == [("Entered", "viewers", "p"), ("Exited", "viewers", "p")]
    exit_ = kafka.cells(TOPICS.segments)[1]
    assert exit_["timestamp"] == "2024-10-06T01:00:00.000Z"
    assert exit_["properties"]["since"] == "2024-10-05T02:00:00.000Z"
    # what is left in the index: p's next change (v2 leaves the window on day 3), and nobody else's
    due = sorted(k for part in table.data.values() for k in part if k.startswith(b"\x00due\x00"))
    assert due == [b"\x00due\x00%d\x00%013d\x00p" % (partition_of(b"p", PARTITIONS), (DAY0 + 3) * DAY_MS + 3_600_000)]


def test_traits_take_the_latest_identify():
    kafka = Kafka()
    clock = Clock((DAY0 + 5) * DAY_MS)

    async def go():
        s = segment_stage(Table(kafka), kafka, clock)
        await repair(s)
        await s.process([identify("u", "i1", 1, {"plan": "pro"})])
        await s.process([identify("u", "i0", 0, {"plan": "free"})])  # older: changes nothing
        assert members(kafka) == {("pro", "u")}
        await s.process([identify("u", "i2", 2, {"plan": "free"})])
    run(go())
    assert audiences(kafka) == [("Entered", "pro", "u"), ("Exited", "pro", "u")]


def test_a_change_whose_publication_was_cut_is_published_at_assignment():
    """The state with its new membership landed, the Audience Entered did not (a crash): the next owner
    publishes it from the table — the same record, the same messageId."""
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS)

    async def go():
        s = segment_stage(Table(kafka), kafka, clock)
        await repair(s)
        kafka.fail_on = {TOPICS.segments}
        with pytest.raises(ConnectionError):
            await s.process([event("p", "v1", 0), event("p", "v2", 0)])
        assert audiences(kafka) == []
        kafka.fail_on = set()
        again = segment_stage(Table(kafka), kafka, clock)  # a new owner, from the changelog
        await repair(again)
        assert audiences(kafka) == [("Entered", "viewers", "p")]
        assert kafka.log[TOPICS.segments][0][1] == b"viewers|p"
        await again.process([event("p", "v3", 1)])
        assert audiences(kafka) == [("Entered", "viewers", "p")]  # nothing new for p
        third = segment_stage(Table(kafka), kafka, clock)
        await repair(third)  # published and since cleared from the table: not again
    run(go())
    assert audiences(kafka) == [("Entered", "viewers", "p")]


def test_a_retried_batch_publishes_the_change_it_decided():
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS)

    async def go():
        s = segment_stage(Table(kafka), kafka, clock)
        await repair(s)
        kafka.fail_on = {TOPICS.segments}
        with pytest.raises(ConnectionError):
            await s.process([event("p", "v1", 0), event("p", "v2", 0)])
        kafka.fail_on = set()
        await s.process([event("p", "v1", 0), event("p", "v2", 0)])  # the retry: the state has it already
    run(go())
    assert audiences(kafka) == [("Entered", "viewers", "p")]


def test_a_forgotten_person_leaves_every_segment():
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS)

    async def go():
        s = segment_stage(Table(kafka), kafka, clock)
        await repair(s)
        await s.process([event("p", "v1", 0), event("p", "v2", 0), identify("p", "i1", 0, {"plan": "pro"})])
        await s.process([forget("p", "r1", [])])
    run(go())
    assert sorted(audiences(kafka)) == [("Entered", "pro", "p"), ("Entered", "viewers", "p"),
                                        ("Exited", "pro", "p"), ("Exited", "viewers", "p")]
    assert members(kafka) == set()


def test_changed_segments_evaluate_every_person_once():
    """The metrics file changes: `viewers` needs 2 views instead of 3, `gone` is removed. At assignment,
    every person of the partition is evaluated under the new definitions (in the background) with the
    history its state holds; the end mark records the versions, so the next owner does not do it again."""
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS)
    viewers = [f"p{i}" for i in range(12)]
    old = parse_metrics({"segments": [
        {"name": "viewers", "all": [{"performed": "Page Viewed", "count": {"gte": 3}, "within": "2d"}]},
        {"name": "gone", "all": [{"performed": "Page Viewed", "within": "2d"}]}]})

    async def go():
        before = AggregateStage(metrics=old, persons=Table(kafka), sink=ClickHouse(), outbox=kafka.outbox,
                                topics=TOPICS, retry=retry_forever, clock=clock)
        await repair(before)
        await before.process([event(p, f"{p}-{n}", 0) for p in viewers for n in (1, 2)] + [event("q", "q1", 0)])
        assert members(kafka) == {("gone", p) for p in [*viewers, "q"]}
        s = segment_stage(Table(kafka), kafka, clock)
        await repair(s)
        await asyncio.gather(*s._reevaluations.values())
        assert members(kafka) == {("viewers", p) for p in viewers}
        table = Table(kafka)
        again = segment_stage(table, kafka, clock)
        await repair(again)
        assert again._reevaluations == {} and table.person_reads == 0
    run(go())
    published = kafka.cells(TOPICS.segments)
    # 13 entries into `gone`, then 13 exits and 12 entries into the new `viewers`; the 13 entries once more:
    # the old owner stopped before its next batch could mark them published (at least once, same messageIds)
    assert len({r["messageId"] for r in published}) == 38 and len(published) == 38 + 13


def test_a_rebalance_waits_for_the_sweep_batch_in_hand_and_stops_the_sweep():
    """The sweep is not a Faust batch, which a rebalance waits for: handing partitions over lets the sweep's
    batch in hand land (its states and exits), then stops the sweep — nothing is written after."""
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS + 7_200_000)
    gate = asyncio.Event()
    sending = asyncio.Event()
    outbox = kafka.outbox

    async def gated_outbox():
        box = await outbox()
        send = box.send

        async def slow_send():
            if any(t == TOPICS.segments for t, *_ in box.records):
                sending.set()
                await gate.wait()
            return await send()
        box.send = slow_send
        return box

    async def go():
        s = AggregateStage(metrics=SEGMENTS, persons=Table(kafka), sink=ClickHouse(), outbox=gated_outbox,
                           topics=TOPICS, retry=retry_forever, clock=clock, sweep_seconds=0.01)
        await repair(s)
        gate.set()
        await s.process([event("p", "v1", 0), event("p", "v2", 1)])
        gate.clear()
        sending.clear()
        clock.ms = (DAY0 + 3) * DAY_MS + 7_200_000  # both views have left the window: an exit is due
        await asyncio.wait_for(sending.wait(), 5)  # the sweeper's batch is publishing the exit
        handover = asyncio.ensure_future(s.handing_over(range(PARTITIONS)))
        await asyncio.sleep(0.05)
        assert not handover.done()  # waiting for the batch in hand
        gate.set()
        await asyncio.wait_for(handover, 5)
        assert s._sweeper is None
        written = len(kafka.log[CHANGELOG])
        await asyncio.sleep(0.05)
        assert len(kafka.log[CHANGELOG]) == written  # nothing after the hand-over
    run(go())
    assert audiences(kafka) == [("Entered", "viewers", "p"), ("Exited", "viewers", "p")]


# ---- RFM summaries (docs/design.md §9) ---------------------------------------------------------------
RFM = parse_metrics({"rfm": {"event": "Buy", "monetary": "revenue", "window": "2d"}})


def order(person: str, mid: str, day: int, revenue) -> Record:
    rec = orjson.loads(event(person, mid, day, "Buy").value)
    rec["properties"] = {"revenue": revenue}
    return Record(rec)


def test_a_persons_rfm_summary_is_published_when_it_changes_and_when_orders_leave_the_window():
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS + 7_200_000)

    async def go():
        s = AggregateStage(metrics=RFM, persons=Table(kafka), sink=ClickHouse(), outbox=kafka.outbox,
                           topics=TOPICS, retry=retry_forever, clock=clock)
        await repair(s)
        await s.process([order("p", "o1", 0, 10.0)])
        await s.process([order("p", "o2", 1, 2.5), event("p", "v1", 1)])  # a view changes no summary
        await s.process([event("p", "v2", 1)])
        clock.ms = (DAY0 + 2) * DAY_MS + 3_600_000  # o1 (day 0, 01:00) has left the 2-day window
        assert await s.sweep() == 1
        clock.ms = (DAY0 + 3) * DAY_MS + 3_600_000  # and o2
        assert await s.sweep() == 1
        assert await s.sweep() == 0
    run(go())
    published = [(r["frequency"], r["monetary"], r["lastOrder"]) for r in kafka.cells(TOPICS.rfm)]
    assert published == [(1, 10.0, "2024-10-04T01:00:00.000Z"), (2, 12.5, "2024-10-05T01:00:00.000Z"),
                         (1, 2.5, "2024-10-05T01:00:00.000Z"), (0, 0.0, None)]
    assert {k for _, k, _ in kafka.log[TOPICS.rfm]} == {b"p"}



class Scores(ClickHouse):
    """ClickHouse answering the leader's scoring query with `scored` rows (person, recency, F, M, r, f, m, user)."""

    def __init__(self) -> None:
        super().__init__()
        self.scored: list[tuple] = []
        self.queries: list[str] = []

    async def query(self, sql: str) -> list[tuple]:
        self.queries.append(sql)
        return list(self.scored)


def test_the_leader_publishes_rfm_memberships_as_scores_change():
    kafka = Kafka()
    clock = Clock((DAY0 + 1) * DAY_MS)
    ch = Scores()

    async def go():
        leader = AggregateStage(metrics=RFM, persons=Table(kafka), sink=ch, outbox=kafka.outbox, topics=TOPICS,
                                retry=retry_forever, clock=clock)
        await repair(leader)
        ch.scored = [("u1", 0, 9, 90.0, 5, 5, 5, 1), ("a2", 40, 1, 5.0, 1, 1, 1, 0)]
        assert await leader.refresh_rfm() == 2
        assert await leader.refresh_rfm() == 0  # the same scores: nothing to say
        ch.scored = [("u1", 30, 9, 90.0, 3, 3, 3, 1)]  # u1 moves on, a2 has no order in the window any more
        assert await leader.refresh_rfm() == 2
        follower = AggregateStage(metrics=RFM, persons=Table(kafka), sink=ch, outbox=kafka.outbox, topics=TOPICS,
                                  retry=retry_forever, clock=clock)
        await repair(follower, partitions=[1, 2, 3])
        asked = len(ch.queries)
        assert await follower.refresh_rfm() == 0 and len(ch.queries) == asked  # only the leader asks
        again = AggregateStage(metrics=RFM, persons=Table(kafka), sink=ch, outbox=kafka.outbox, topics=TOPICS,
                               retry=retry_forever, clock=clock)
        await repair(again)  # a new leader, from the changelog: its decisions are the old leader's
        assert await again.refresh_rfm() == 0
    run(go())
    # the new leader published the last refresh's changes once more at its assignment (same messageIds)
    seen, once = set(), []
    for r in kafka.cells(TOPICS.segments):
        if r["messageId"] not in seen:
            seen.add(r["messageId"])
            once.append((r["event"].split()[1], r["properties"]["segment"], r["properties"]["person_id"]))
    assert once == [("Entered", "rfm_hibernating", "a2"), ("Entered", "rfm_champions", "u1"),
                    ("Exited", "rfm_hibernating", "a2"), ("Exited", "rfm_champions", "u1"),
                    ("Entered", "rfm_need_attention", "u1")]
    assert len(kafka.cells(TOPICS.segments)) == 5 + 3
    assert members(kafka) == {("rfm_need_attention", "u1")}
    first = kafka.cells(TOPICS.segments)[1]
    assert first["userId"] == "u1" and kafka.cells(TOPICS.segments)[0]["anonymousId"] == "a2"


# ---- alert rules' shares and progress (docs/design.md §10) ------------------------------------------

ALERTING = parse_metrics({
    "funnels": [{"name": "f", "window": "1d", "steps": [{"event": "Page Viewed"}, {"event": "Buy"}]}],
    "alerts": [{"name": "conversion", "series": {"funnel": "f", "step": 2, "rate": True},
                "rule": {"threshold": {"below": 0.1}}},
               {"name": "daily", "series": {"active": "dau"}, "rule": {"threshold": {"below": 1}}}],
})


class Tick:
    def __init__(self, partition: int, source: int, at: int):
        self.partition = partition
        self.value = orjson.dumps({"type": "tick", "from": source, "of": 2, "at": at})


def test_cells_feed_alert_rules_and_markers_close_their_periods():
    kafka = Kafka()
    s = AggregateStage(metrics=ALERTING, persons=Table(kafka), sink=ClickHouse(), outbox=kafka.outbox, topics=TOPICS,
                       retry=retry_forever)
    records = [event("p1", "a", 0), event("p1", "b", 0, "Buy"), event("p2", "c", 0), event("p3", "d", 0)]

    async def go():
        await repair(s)
        await s.process(records)
        # a marker from events.raw partition 0 only: no progress yet (partition 1's events may be queued)
        await s.process([Tick(p, 0, 111) for p in range(PARTITIONS)])
        assert [r for r in kafka.cells(TOPICS.alert_series) if r["t"] == "progress"] == []
        await s.process([Tick(p, 1, 99) for p in range(PARTITIONS)])
    run(go())
    series = kafka.cells(TOPICS.alert_series)
    newest: dict[tuple, float] = {}  # (rule, src, period, role) → the latest value
    for r in series:
        if r["t"] == "share":
            for period, values in r["periods"].items():
                for role, value in values.items():
                    newest[(r["rule"], r["src"], int(period), role)] = value
    day = DAY0 * DAY_MS

    def total(rule: str, role: str) -> int:
        return sum(v for (name, _, period, rl), v in newest.items() if (name, period, rl) == (rule, day, role))
    assert (total("conversion", "v"), total("conversion", "b")) == (1, 3)  # 1 of 3 persons bought
    assert total("daily", "v") == 3
    progress = [r for r in series if r["t"] == "progress"]
    assert {(r["stage"], r["partition"], r["of"], r["through"]) for r in progress} == {
        ("aggregate", p, PARTITIONS, 99) for p in range(PARTITIONS)}  # the oldest of the newest markers
    assert len(progress) == PARTITIONS * PARTITIONS  # each to every evaluator partition
    assert series.index(progress[0]) > max(i for i, r in enumerate(series) if r["t"] == "share")  # after the shares


SIZED = parse_metrics({
    "segments": [{"name": "buyers", "all": [{"performed": "Buy", "within": "30d"}]}],
    "alerts": [{"name": "buyers_size", "series": {"segment": "buyers"}, "rule": {"threshold": {"below": 1}}}],
})


def test_segment_sizes_feed_alert_rules_and_survive_a_restart():
    kafka = Kafka()
    clock = [(DAY0 + 1) * DAY_MS]

    def sized_stage() -> AggregateStage:
        return AggregateStage(metrics=SIZED, persons=Table(kafka), sink=ClickHouse(), outbox=kafka.outbox,
                              topics=TOPICS, retry=retry_forever, clock=lambda: clock[0])

    def sizes() -> dict[str, int]:
        newest: dict[str, dict] = {}
        for r in kafka.cells(TOPICS.alert_series):
            if r["src"] not in newest or r["ver"] >= newest[r["src"]]["ver"]:
                newest[r["src"]] = r
        return {src: r["periods"]["0"]["v"] for src, r in newest.items()}

    async def restarted() -> AggregateStage:
        s = sized_stage()
        await repair(s)
        s.stop()
        return s

    async def go():
        s = await restarted()
        await s.process([event("p1", "a", 0, "Buy"), event("p2", "b", 0, "Buy"), event("p3", "c", 0)])
        members = {partition_of(p.encode(), PARTITIONS) for p in ("p1", "p2")}
        assert sum(sizes().values()) == 2 and {int(src[1:]) for src, v in sizes().items() if v} == members
        # a restart: the sizes come back from the table and are sent again
        kafka.log[TOPICS.alert_series].clear()
        await restarted()
        assert sum(sizes().values()) == 2 and len(sizes()) == PARTITIONS
        # a table without sizes (written before this release): counted from the person states
        for p, k, _ in list(kafka.log[CHANGELOG]):
            if k.startswith(b"\x00sizes\x00"):
                kafka.log[CHANGELOG].append((p, k, None))
        kafka.log[TOPICS.alert_series].clear()
        await restarted()
        assert sum(sizes().values()) == 2
        # the members' window passes: the sweep lets them go, and the size follows
        clock[0] = (DAY0 + 40) * DAY_MS
        s = await restarted()
        await s.sweep()
        assert sum(sizes().values()) == 0
    run(go())


# ---- experiments --------------------------------------------------------------------------------------------

def experiment_metrics(within: str = "2d", control: str = "control"):
    return parse_metrics({"lateness": "7d", "experiments": [{
        "name": "button", "exposure": {"experiment_id": "button"}, "variations": {"control": 0.5, "green": 0.5},
        "control": control, "metrics": [
            {"name": "bought", "conversion": {"event": "Buy", "within": within}},
            {"name": "revenue", "sum": {"event": "Buy", "property": "revenue", "within": within}}]}]})


def track(person: str, mid: str, hours: int, name: str, **properties) -> Record:
    rec = orjson.loads(event(person, mid, 0, name).value)
    rec.update(timestamp=DAY0 * DAY_MS + hours * 3_600_000, properties=properties)
    return Record(rec)


def exposed(person: str, mid: str, hours: int, variation: str) -> Record:
    return track(person, mid, hours, "Experiment Viewed", experiment_id="button", variation_id=variation)


def experiment_cells(kafka: Kafka) -> dict[tuple, tuple]:
    """What experiment_stats would show: per (experiment, variation, metric) the latest record per partition,
    summed."""
    latest: dict[tuple, dict] = {}
    for r in kafka.cells(TOPICS.experiments):
        key = (r["experiment"], r["variation"], r["metric"], r["partition"])
        if key not in latest or r["version"] > latest[key]["version"]:
            latest[key] = r
    out: dict[tuple, list] = {}
    for key, r in latest.items():
        sums = out.setdefault(key[:3], [0] * 6)
        for i, name in enumerate(("n", "sy", "syy", "sx", "sxx", "sxy")):  # (no CUPED here)
            sums[i] += int(r[name])
    return {k: tuple(v) for k, v in out.items() if v[0]}


STITCHED = [
    exposed("anon-1", "x1", 0, "green"), merge("anon-1", "user-1"),  # seen anonymously, then signs up
    track("user-1", "b1", 5, "Buy", revenue=10**7),  # buys as the user: 10 million (its square needs 94 bits)
    exposed("user-2", "x2", 1, "control"), track("user-2", "b2", 80, "Buy", revenue=3),  # too late: 0
    exposed("user-3", "x3", 1, "control"), exposed("user-3", "x4", 2, "green"),  # both: excluded
]


def test_experiment_statistics_are_stitched_grouped_and_restored_from_the_checkpoint():
    kafka = Kafka()
    metrics = experiment_metrics()
    M = 10**6  # sums are in millionths

    async def go():
        s = stage(Table(kafka), kafka, metrics=metrics)
        await s.process(STITCHED[:2])  # the merge marker hands anon-1's state over ...
        await s.process([Record(orjson.loads(v)) for _, _, v in kafka.log[TOPICS.identified]])
        await s.process(STITCHED[2:])  # ... before the user buys
        want = {("button", "green", "bought"): (1, 1, 1, 0, 0, 0),
                ("button", "green", "revenue"): (1, 10**7 * M, (10**7 * M) ** 2, 0, 0, 0),
                ("button", "control", "bought"): (1, 0, 0, 0, 0, 0),
                ("button", "control", "revenue"): (1, 0, 0, 0, 0, 0),
                ("button", "", ""): (1, 0, 0, 0, 0, 0)}
        assert experiment_cells(kafka) == want
        records = kafka.cells(TOPICS.experiments)
        assert records and all(isinstance(r["syy"], str) for r in records)
        table = Table(kafka)
        restarted = stage(table, kafka, metrics=metrics)
        await repair(restarted)
        assert table.person_reads == 0  # from the checkpoint
        assert experiment_cells(kafka) == want
        # the control, a guardrail or min_sample changed: the statistics' version is the same: the checkpoint
        table = Table(kafka)
        await repair(stage(table, kafka, metrics=experiment_metrics(control="green")))
        assert table.person_reads == 0
        # a window changed: new cells, counted from the person states, which kept what they need
        table = Table(kafka)
        await repair(stage(table, kafka, metrics=experiment_metrics(within="4d")))
        assert table.person_reads > 0
        assert experiment_cells(kafka)[("button", "control", "revenue")] == (1, 3 * M, 9 * M * M, 0, 0, 0)
    run(go())
