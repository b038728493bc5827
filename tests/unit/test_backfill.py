"""stages/backfill.py: a new condition gets its history exactly once (docs/design.md §13).

The law, at the person level (hypothesis): events applied under the old definitions, the rest under the
new ones, then a backfill of any superset of the first part, in any order, give the state — and the
contributions — of every event applied under the new definitions from the start.

The wiring, in process: ingest and aggregate over an in-memory Kafka and embedded ClickHouse (the events
the aggregate stage inserts are what the job reads back, through its real SQL); definitions change while
running; events arrive before, during and after the job; an anonymous id linked before the change has its
events sent to its user. The cells equal a pipeline that had the new definitions from the start — also
when the job dies mid-page and a new one resumes. Without the job they do not (the test is not vacuous).
On a real broker with kill -9: tests/integration/test_definitions_stream.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from flywheel.config import Settings, Topics
from flywheel.metrics.definitions import parse_metrics
from flywheel.metrics.person import PersonState, apply, contributions, histories
from flywheel.model.clock import DAY_MS
from flywheel.model.envelope import HEADER_RECEIVED_AT, HEADER_SOURCE, Limits
from flywheel.model.plan import load_plan
from flywheel.runtime.partitioner import partition_of
from flywheel.stages.aggregate import BACKFILL, LEADER, AggregateStage
from flywheel.stages.backfill import Book
from flywheel.stages.ingest import Ingest
from flywheel.stages.tables import MemoryTable
from helpers import MemoryKafka as Kafka
from hypothesis import given, settings
from hypothesis import strategies as st

OLD = {
    "lateness": "7d",
    "funnels": [{"name": "view_buy", "window": "1d", "steps": [{"event": "Page Viewed"}, {"event": "Buy"}]}],
    "retention": [{"name": "daily", "cohort_event": "any", "return_event": "any", "period": "day", "horizon": 3}],
}
NEW = {
    **OLD,
    "funnels": [*OLD["funnels"],  # a new condition (Signed Up) and two known ones
                {"name": "signup_buy", "window": "2d",
                 "steps": [{"event": "Signed Up"}, {"event": "Page Viewed"}, {"event": "Buy"}]}],
    "retention": [*OLD["retention"],
                  {"name": "signup_return", "cohort_event": "Signed Up", "return_event": "Buy", "period": "day",
                   "horizon": 3}],
}
PARTITIONS = 4
TOPICS = Topics()
DAY0 = datetime(2026, 11, 2, tzinfo=UTC)


# ---- the law, per person --------------------------------------------------------------------------
NAMES = ["Page Viewed", "Buy", "Signed Up", "Other"]


@st.composite
def event_lists(draw):
    n = draw(st.integers(1, 12))
    start = int(DAY0.timestamp() * 1000)
    events = [(f"m{i}", start + draw(st.integers(0, 5 * 24)) * 3_600_000, draw(st.sampled_from(NAMES)))
              for i in range(n)]
    cut = draw(st.integers(0, n))
    extra = draw(st.integers(0, n - cut))  # events after the switch the backfill reads too
    order = draw(st.permutations(range(cut + extra)))
    return events, cut, [events[i] for i in order]


@settings(max_examples=300, deadline=None)
@given(event_lists())
def test_old_then_new_then_backfill_equals_new_from_the_start(case):
    events, cut, backfilled = case
    old, new = parse_metrics(OLD), parse_metrics(NEW)
    known = histories(old)
    fresh = {pid for h, pid in histories(new).items() if h not in known}

    def one(state, metrics, mid, ts, name, only=None):
        matched = [p for p in metrics.matching(name, {}, "track") if only is None or p.pid in only]
        if matched or metrics.activity.matches("track", name):
            apply(state, mid, int(ts), matched, metrics, active=metrics.activity.matches("track", name))

    switched = PersonState()
    for mid, ts, name in events[:cut]:
        one(switched, old, mid, ts, name)
    switched = PersonState.from_json(orjson.loads(orjson.dumps(switched.to_json())), new)  # as the stage reads it
    for mid, ts, name in events[cut:]:
        one(switched, new, mid, ts, name)
    for mid, ts, name in backfilled:
        one(switched, new, mid, ts, name, only=fresh)
    reference = PersonState()
    for mid, ts, name in events:
        one(reference, new, mid, ts, name)
    # Same contributions; the state too (as stored: the legend sorted, the funnel bits united)
    assert contributions(switched, new, 0) == contributions(reference, new, 0)
    assert switched.to_json() == reference.to_json()


# ---- the wiring -----------------------------------------------------------------------------------
def at(day: int, hour: int = 9) -> datetime:
    return DAY0 + timedelta(days=day, hours=hour)


def track(mid: str, name: str, when: datetime, *, anon: str | None = None, user: str | None = None) -> dict:
    return {"type": "track", "event": name, "messageId": mid, "anonymousId": anon, "userId": user,
            "properties": {}, "timestamp": when.isoformat()}


def identify(mid: str, anon: str, user: str, when: datetime) -> dict:
    return {"type": "identify", "messageId": mid, "anonymousId": anon, "userId": user, "traits": {},
            "timestamp": when.isoformat()}


BEFORE = [  # before the definitions change
    track("a1", "Signed Up", at(0), anon="anon-a"), track("a2", "Page Viewed", at(0, 10), anon="anon-a"),
    identify("a3", "anon-a", "user-1", at(0, 11)),
    track("a4", "Buy", at(1), anon="anon-a", user="user-1"),
    track("b1", "Signed Up", at(0), user="user-2"), track("b2", "Page Viewed", at(1), user="user-2"),
    track("c1", "Signed Up", at(1), anon="anon-c"), track("c2", "Page Viewed", at(1, 12), anon="anon-c"),
    track("d1", "Signed Up", at(1), anon="anon-d"),
]
DURING = [  # after the change, before the job reads
    track("b3", "Buy", at(2), user="user-2"), track("c3", "Buy", at(2), anon="anon-c"),
    identify("d2", "anon-d", "user-4", at(2)),  # linked after the change: its history follows it
]
AFTER = [  # after the job sent its events, before they are applied
    track("a5", "Page Viewed", at(2), user="user-1"), track("d3", "Page Viewed", at(2, 10), user="user-4"),
    track("d4", "Buy", at(3), user="user-4"), track("e1", "Signed Up", at(3), anon="anon-e"),
]


class Sink:
    """The aggregate stage's ClickHouse: embedded, for real."""

    def __init__(self, ch):
        self.ch = ch

    async def write(self, table: str, rows: list[dict]) -> None:
        self.ch.insert(table, rows)

    async def query(self, sql: str) -> list[tuple]:
        return self.ch.rows(sql)[1]

    async def counted(self, message_ids) -> set[str]:
        return set()


async def retry_forever(attempt, name, size):
    return await attempt()


class Record:
    def __init__(self, topic: str, partition: int, offset: int, key, value, headers):
        self.topic, self.partition, self.offset, self.key, self.value = topic, partition, offset, key, value
        self.headers = headers or [(HEADER_SOURCE, b"test"), (HEADER_RECEIVED_AT, b"1790000000000")]
        self.timestamp = 1_790_000_000.0


class Pipeline:
    """Ingest and aggregate over one in-memory Kafka, records moved by `pump` as a worker's fetch loop would."""

    def __init__(self, ch, definitions: dict, revision: int = 0):
        self.kafka = Kafka(PARTITIONS)
        self.ingest = Ingest(plan=load_plan(Settings().tracking_plan), limits=Limits(max_future=timedelta(days=3650)),
                             topics=TOPICS, first_seen=MemoryTable("message-ids-changelog"),
                             linked_users=MemoryTable("identity-changelog"), outbox=self.kafka.outbox)
        self.persons = MemoryTable("persons-changelog")
        self.aggregate = AggregateStage(metrics=parse_metrics(definitions), persons=self.persons, sink=Sink(ch),
                                        outbox=self.kafka.outbox, topics=TOPICS, retry=retry_forever,
                                        revision=revision)
        self.read: dict[str, int] = defaultdict(int)

    async def start(self) -> None:
        self.aggregate.assigned(range(PARTITIONS))
        self.aggregate.stop()  # the job is stepped by the test (the sweep and refresher have nothing to do)
        await self.aggregate._ready(range(PARTITIONS))

    def send(self, events: list[dict]) -> None:
        for e in events:
            key = (e["anonymousId"] or e["userId"]).encode()
            self.kafka.log[TOPICS.raw].append((partition_of(key, PARTITIONS), key, orjson.dumps(e)))
            self.kafka.headers[TOPICS.raw].append(None)

    def _new(self, topic: str) -> list[Record]:
        log, start = self.kafka.log[topic], self.read[topic]
        self.read[topic] = len(log)
        return [Record(topic, p, start + i, k, v, self.kafka.headers[topic][start + i])
                for i, (p, k, v) in enumerate(log[start:])]

    async def pump(self) -> None:
        while True:
            raw, identified = self._new(TOPICS.raw), []
            if raw:
                await self.ingest.handle(raw)
            identified = self._new(TOPICS.identified)
            if identified:
                await self.aggregate.process(identified)
            if not raw and not identified:
                return

    def cells(self) -> dict[str, dict[tuple, int]]:
        """Each metric topic's cells: the latest value per partition, summed (as the views do)."""
        out = {}
        for topic in (TOPICS.funnels, TOPICS.retention, TOPICS.active_users):
            latest: dict[tuple, tuple[int, int]] = {}
            for _, _, v in self.kafka.log[topic]:
                rec = orjson.loads(v)
                value = rec.pop("persons")
                key = tuple(sorted((k, str(x)) for k, x in rec.items()
                                   if k not in ("version", "publishedAt", "definitionVersion")))
                if key not in latest or rec["version"] > latest[key][0]:
                    latest[key] = (rec["version"], value)
            summed: dict[tuple, int] = defaultdict(int)
            for key, (_, value) in latest.items():
                summed[tuple(kv for kv in key if kv[0] != "partition")] += value
            out[topic] = {k: v for k, v in summed.items() if v}
        return out


def reference_cells(ch) -> dict:
    async def go():
        ref = Pipeline(ch, NEW)
        await ref.start()
        for batch in (BEFORE, DURING, AFTER):
            ref.send(batch)
            await ref.pump()
        return ref.cells()
    return asyncio.run(go())


@pytest.fixture()
def clean(ch):
    ch.command("TRUNCATE TABLE IF EXISTS flywheel.events")
    ch.command("TRUNCATE TABLE IF EXISTS flywheel.definition_backfills")
    return ch


def switched_run(ch, *, crash_at_page: int | None = None, run_job: bool = True) -> tuple[Pipeline, dict]:
    async def go():
        pipe = Pipeline(ch, OLD)
        await pipe.start()
        pipe.send(BEFORE)
        await pipe.pump()
        await pipe.aggregate.use(parse_metrics(NEW), 1)  # a new revision, while running
        pipe.aggregate.stop()
        await pipe.aggregate._ready(range(PARTITIONS))
        pipe.send(DURING)
        await pipe.pump()  # the leader takes the switch reports in, with DURING's events
        book = Book.from_json(pipe.persons.get(LEADER, BACKFILL + b"%d" % LEADER))
        assert book.switched == {p: 1 for p in range(PARTITIONS)} and book.pending
        if run_job:
            job = pipe.aggregate._backfill_job()
            job.page = 2  # several pages, cursor written after each
            if crash_at_page is not None:
                sent = {"pages": 0}
                real = pipe.kafka.outbox

                async def dying_outbox():
                    out = await real()
                    send = out.send

                    async def maybe_die():
                        if any(t == TOPICS.raw for t, *_ in out.records):
                            sent["pages"] += 1
                            if sent["pages"] == crash_at_page:
                                pipe.kafka.land = 1  # one record of the page lands, then the process is gone
                        return await send()
                    out.send = maybe_die
                    return out
                job.outbox = dying_outbox
                with pytest.raises(ConnectionError):
                    await job.step()
                job = pipe.aggregate._backfill_job()  # a new owner of the leader: from the written cursor
                job.page = 2
            assert await job.step()
        pipe.send(AFTER)
        await pipe.pump()
        return pipe, pipe.cells()
    return asyncio.run(go())


def test_definitions_added_while_running_equal_having_had_them_from_the_start(clean):
    pipe, cells = switched_run(clean)
    reference = reference_cells(clean)
    assert cells == reference
    # not vacuous: the new funnel has history from before the change (day 0: user-1 and user-2 signed up)
    signup_buy = {k: v for k, v in cells[TOPICS.funnels].items() if ("funnel", "signup_buy") in k}
    assert signup_buy[(("day", "2026-11-02"), ("funnel", "signup_buy"), ("step", "1"))] == 2
    book = Book.from_json(pipe.persons.get(LEADER, BACKFILL + b"%d" % LEADER))
    assert book.job is None and book.done[-1]["rows"] >= 5 and not book.pending
    assert clean.rows("SELECT revision, events FROM flywheel.definition_backfills")[1] == [(1, book.done[-1]["rows"])]


def test_a_job_that_dies_mid_page_is_resumed_by_the_next_owner_with_the_same_result(clean):
    _, cells = switched_run(clean, crash_at_page=2)
    assert cells == reference_cells(clean)


def test_without_the_backfill_the_new_definitions_miss_their_history(clean):
    _, cells = switched_run(clean, run_job=False)
    assert cells != reference_cells(clean)


def test_a_book_starts_a_job_only_once_every_partition_and_the_leader_switched():
    new = parse_metrics(NEW)
    book = Book()
    book.report(0, 3, ["x1"])
    book.report(1, 3, [])
    assert not book.ready(3, 3)
    book.report(2, 2, [])  # still on an older revision
    assert not book.ready(3, 3)
    book.report(2, 3, [])
    assert book.ready(3, 3) and not book.ready(3, 2)  # the leader itself must know the conditions
    book.report(2, 2, [])  # taken over by a worker still on revision 2: the last report counts
    assert not book.ready(3, 3)
    book.report(2, 3, [])
    assert book.start(new, newest_ms=10 * DAY_MS, now_ms=0) is None  # x1 is no condition of the set: nothing
    pid = next(p.pid for p in new.predicates if p.event == "Signed Up")
    book.report(1, 4, [pid])
    assert not book.ready(3, 4)
    for p in range(3):
        book.report(p, 4, [])
    assert book.ready(3, 4)
    job = book.start(new, newest_ms=10 * DAY_MS, now_ms=0)
    assert job["pids"] == [pid] and job["events"] == ["Signed Up"] and job["revision"] == 4
    assert job["from_ms"] == (10 - new.horizon_days) * DAY_MS
    assert Book.from_json(book.to_json()) == book


def test_random_interleavings_of_the_backfill_give_the_same_cells(clean):
    """Pages sent, switch reports and live events in random order (seeded): always the reference."""
    reference = reference_cells(clean)
    for seed in range(3):
        clean.command("TRUNCATE TABLE IF EXISTS flywheel.events")
        rng = random.Random(seed)

        async def go(rng=rng):
            pipe = Pipeline(clean, OLD)
            await pipe.start()
            pipe.send(BEFORE)
            await pipe.pump()
            await pipe.aggregate.use(parse_metrics(NEW), 1)
            pipe.aggregate.stop()
            await pipe.aggregate._ready(range(PARTITIONS))
            late = DURING + AFTER
            rng.shuffle(late)
            k = rng.randint(0, len(late))
            pipe.send(late[:k])
            await pipe.pump()
            job = pipe.aggregate._backfill_job()
            job.page = rng.randint(1, 4)
            assert await job.step()
            pipe.send(late[k:])
            await pipe.pump()
            return pipe.cells()
        assert asyncio.run(go()) == reference, seed
