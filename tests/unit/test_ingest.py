"""stages/ingest.py over a batch, with in-memory stand-ins for the tables and the producer (behind the real
Outbox): dedup, identity, merge-marker order, redelivery, and a failed send that leaves the tables as
they were (a failed batch is retried as one: tests/unit/test_delivery.py)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from flywheel.config import Settings, Topics
from flywheel.metrics.definitions import parse_metrics
from flywheel.model.envelope import (
    HEADER_FORGET,
    HEADER_RECEIVED_AT,
    HEADER_REPLAY_OF,
    HEADER_SOURCE,
    HEADER_TICK,
    Limits,
)
from flywheel.model.plan import load_plan
from flywheel.runtime.outbox import Outbox
from flywheel.stages.dedup import clock_key, entry_key
from flywheel.stages.ingest import REPLAY, Ingest
from flywheel.stages.tables import MemoryTable

TOPICS = Topics(raw="raw", invalid="invalid", identified="identified", identity_changes="changes")
PARTITIONS = list(range(8))


class Producer:
    def __init__(self):
        self.records: dict[tuple[str, int], list[tuple[bytes, bytes]]] = defaultdict(list)
        self.failures = 0  # the next n batches fail

    async def partitions_for(self, topic: str) -> set[int]:
        return set(PARTITIONS)

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(16384, 0, is_transactional=0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.failures:
            self.failures -= 1
            future.set_exception(KafkaTimeoutError())
            return future
        base = len(self.records[(topic, partition)])
        records = MemoryRecords(bytes(batch._build())).next_batch()
        self.records[(topic, partition)] += [(r.key, r.value) for r in records]
        future.set_result(type("Meta", (), {"offset": base})())
        return future

    def values(self, topic: str) -> list[dict]:
        return [orjson.loads(v) for (t, _), records in sorted(self.records.items()) if t == topic for _, v in records]

    def on_partition_of(self, topic: str, key: bytes) -> list[dict]:
        partition = DefaultPartitioner()(key, PARTITIONS, PARTITIONS)
        return [orjson.loads(v) for k, v in self.records[(topic, partition)] if k == key]


class Message:
    def __init__(self, value: bytes, key: bytes, partition: int, offset: int):
        self.value, self.key, self.partition, self.offset, self.topic = value, key, partition, offset, "raw"
        self.timestamp = 1_700_000_000.0
        self.headers = [(HEADER_SOURCE, b"test"), (HEADER_RECEIVED_AT, b"1700000000000")]


def batch(messages: list[dict | bytes]) -> list[Message]:
    out = []
    for offset, m in enumerate(messages):
        value = m if isinstance(m, bytes) else orjson.dumps(m)
        key = (m.get("anonymousId") or m.get("previousId") or m.get("userId") or "").encode() if isinstance(
            m, dict) else b"junk"
        out.append(Message(value, key, partition=3, offset=100 + offset))
    return out


class Stage:
    """The stage, its tables, and the producer its outboxes send through (swap it to change Kafka)."""

    def __init__(self, alerts=()):
        self.first_seen, self.linked = MemoryTable("message-ids-changelog"), MemoryTable("identity-changelog")
        self.producer = Producer()

        async def outbox():
            return Outbox(self.producer, {t: PARTITIONS for t in TOPICS.model_dump().values()})

        self.ingest = Ingest(plan=load_plan(Settings().tracking_plan), limits=Limits(max_future=timedelta(days=3650)),
                             topics=TOPICS, first_seen=self.first_seen, linked_users=self.linked, outbox=outbox,
                             alerts=alerts)

    def handle(self, messages, producer: Producer) -> None:
        self.producer = producer
        asyncio.run(self.ingest.handle(messages))


RECEIVED_DAY = 1_700_000_000_000 // 86_400_000  # every Message's receivedAt


def entry(mid: bytes) -> bytes:
    """Where the dedup table keeps a messageId received on RECEIVED_DAY (7-day generations)."""
    return entry_key(RECEIVED_DAY - RECEIVED_DAY % 7, mid)


def viewed(anon: str, mid: str) -> dict:
    return {"type": "track", "event": "Product Viewed", "anonymousId": anon, "messageId": mid,
            "properties": {"product_id": "p1"}, "timestamp": "2026-11-10T09:00:00Z"}


JOURNEY = [
    viewed("anon-a", "m1"),
    viewed("anon-a", "m2"),
    {"type": "identify", "anonymousId": "anon-a", "userId": "user-1", "messageId": "m3",
     "timestamp": "2026-11-10T09:01:00Z"},
    viewed("anon-a", "m2"),  # an SDK retry of m2: another record, same messageId
    b"{not json",
    viewed("anon-a", "m4"),
]


def test_a_batch_dedups_resolves_and_orders_the_merge_marker_after_the_anonymous_events():
    s = Stage()
    producer = Producer()
    s.handle(batch(JOURNEY), producer)
    first_seen, linked = s.first_seen, s.linked

    identified = producer.values("identified")
    assert sorted(e["messageId"] for e in identified if e["type"] != "merge") == ["m1", "m2", "m3", "m4"]
    # Keyed by the anonymous id, the marker follows that id's events on their partition.
    on_anon = producer.on_partition_of("identified", b"anon-a")
    assert [e["messageId"] for e in on_anon] == ["m1", "m2", "m3"] and on_anon[-1]["type"] == "merge"
    assert {e["messageId"]: e["personId"] for e in identified if e["type"] != "merge"} == {
        "m1": "anon-a", "m2": "anon-a", "m3": "user-1", "m4": "user-1"}
    assert [c["type"] for c in producer.values("changes")] == ["link"]
    assert [i["origin"] for i in producer.values("invalid")] == ["raw/3@104"]

    assert first_seen.data[3][entry(b"m2")] == b"raw/3@101"  # the record that first carried it
    assert linked.data[3][b"anon-a"] == b"user-1\x00raw/3@102"
    changelog = producer.records[("message-ids-changelog", 3)]  # the record's own partition
    assert [k for k, _ in changelog] == [entry(b"m1"), entry(b"m2"), entry(b"m3"), entry(b"m4"), clock_key(3)]
    assert first_seen.persisted == {3: 4}  # the changelog offset the store now holds
    assert producer.records[("identity-changelog", 3)] == [(b"anon-a", b"user-1\x00raw/3@102")]


def test_a_redelivered_batch_is_forwarded_again_with_its_link():
    s = Stage()
    first, again = Producer(), Producer()
    s.handle(batch(JOURNEY), first)
    s.handle(batch(JOURNEY), again)  # same records, same offsets: after a crash
    # Every record forwarded again (the retry still dropped), the link re-emitted; the person ids of the
    # events before the link may now name the user: the table is ahead of what was published.
    def ids(producer):
        return sorted((e["messageId"], e["type"]) for e in producer.values("identified"))

    assert ids(again) == ids(first)
    assert again.values("changes") == first.values("changes")
    assert [e["type"] for e in again.on_partition_of("identified", b"anon-a")][-1] == "merge"


def test_a_failed_send_leaves_nothing_a_retry_cannot_redo():
    """The outputs and changelog records are sent at the end, and the stores written only once Kafka
    holds them: a failed send leaves the stores as they were, and the retry does the batch again."""
    s = Stage()
    failing, retry = Producer(), Producer()
    failing.failures = 99
    with pytest.raises(KafkaTimeoutError):  # the send failed: handle must raise
        s.handle(batch(JOURNEY), failing)
    assert s.first_seen.data == {} and s.linked.data == {}
    s.handle(batch(JOURNEY), retry)
    ids = [e["messageId"] for e in retry.values("identified") if e["type"] != "merge"]
    assert sorted(ids) == ["m1", "m2", "m3", "m4"]
    assert [c["type"] for c in retry.values("changes")] == ["link"]
    assert [k for k, _ in retry.records[("message-ids-changelog", 3)]] == [
        entry(b"m1"), entry(b"m2"), entry(b"m3"), entry(b"m4"), clock_key(3)]
    assert retry.records[("identity-changelog", 3)] == [(b"anon-a", b"user-1\x00raw/3@102")]


def replayed(message: dict | bytes, of: str, offset: int) -> Message:
    """A record `flywheel dlq replay` sent: the rejected bytes again, naming the record first rejected."""
    record = batch([message])[0]
    record.offset = offset
    record.headers = [*record.headers, (HEADER_REPLAY_OF, of.encode())]
    return record


def test_a_replayed_dlq_record_passes_once_however_often_it_is_replayed():
    s = Stage()
    event = viewed("anon-r", "m9")
    first = Producer()
    s.handle([replayed(event, "raw/3@7", offset=200)], first)
    assert [e["messageId"] for e in first.values("identified")] == ["m9"]
    assert s.first_seen.data[3][REPLAY + b"raw/3@7"] == b"raw/3@200"

    # The same replay record again (a crash before its offset was committed): forwarded again, as any record.
    again = Producer()
    s.handle([replayed(event, "raw/3@7", offset=200)], again)
    assert [e["messageId"] for e in again.values("identified")] == ["m9"]

    # A second replay run: another record, dropped — also once the messageId has left the dedup table.
    del s.first_seen.data[3][entry(b"m9")]
    second = Producer()
    s.handle([replayed(event, "raw/3@7", offset=300)], second)
    assert second.values("identified") == []

    # Another rejected record with that messageId (an SDK retry of the bad event): while the messageId is in
    # the dedup table it is a retry, dropped; past the table's reach only the messageId could tell them apart.
    s.first_seen.data[3][entry(b"m9")] = b"raw/3@200"
    retry = Producer()
    s.handle([replayed(event, "raw/3@8", offset=301)], retry)
    assert retry.values("identified") == []


def test_a_replay_rejected_again_names_the_original_and_may_be_replayed_later():
    s = Stage()
    producer = Producer()
    s.handle([replayed(b"{still not json", "raw/3@7", offset=200)], producer)
    [dead] = producer.values("invalid")
    assert dead["origin"] == "raw/3@200" and dead["replayOf"] == "raw/3@7"
    assert REPLAY + b"raw/3@7" not in s.first_seen.data[3]
    later = Producer()
    s.handle([replayed(viewed("anon-r", "m9"), "raw/3@7", offset=201)], later)
    assert [e["messageId"] for e in later.values("identified")] == ["m9"]


def forget_request(request: dict, offset: int) -> Message:
    m = Message(orjson.dumps(request), b"anon-a", partition=3, offset=offset)
    m.headers = [*m.headers, (HEADER_FORGET, b"req-1")]
    return m


def test_a_forget_request_deletes_the_persons_links_and_dedup_entries_and_nothing_else():
    s = Stage()
    s.handle(batch(JOURNEY), Producer())
    # anon-b belongs to another user: named in the request (say, a refused link), its link stays.
    s.linked.data[3][b"anon-b"] = b"user-2\x00raw/3@90"
    producer = Producer()
    s.handle([forget_request({"requestId": "req-1", "person": "user-1", "ids": ["anon-a", "anon-b"],
                              "messageIds": ["m1", "m2", "m3", "m4", "m-unknown"]}, offset=200)], producer)
    assert b"anon-a" not in s.linked.data[3] and s.linked.data[3][b"anon-b"] == b"user-2\x00raw/3@90"
    assert [k for k in s.first_seen.data[3] if k.startswith(b"\x01")] == []
    # with tombstones on the changelogs, and nothing forwarded: a request is not an event
    assert producer.records[("identity-changelog", 3)] == [(b"anon-a", None)]
    assert sorted(k for k, v in producer.records[("message-ids-changelog", 3)] if v is None) == sorted(
        entry(m) for m in (b"m1", b"m2", b"m3", b"m4"))
    assert producer.values("identified") == [] and producer.values("invalid") == []

    # An SDK retry of m2 now is a new event, and anon-a may link to another user
    after = Producer()
    s.handle(batch([viewed("anon-a", "m2"), {"type": "identify", "anonymousId": "anon-a", "userId": "user-3",
                                             "messageId": "m5", "timestamp": "2026-11-10T09:05:00Z"}]), after)
    assert {e["messageId"]: e["personId"] for e in after.values("identified") if e["type"] != "merge"} == {
        "m2": "anon-a", "m5": "user-3"}
    assert [c["type"] for c in after.values("changes")] == ["link"]


def test_a_malformed_forget_request_is_skipped_not_fatal():
    s = Stage()
    s.handle(batch(JOURNEY), Producer())
    bad = Message(b"{not json", b"anon-a", partition=3, offset=200)
    bad.headers = [*bad.headers, (HEADER_FORGET, b"req-2")]
    producer = Producer()
    s.handle([bad], producer)
    assert s.linked.data[3][b"anon-a"] == b"user-1\x00raw/3@102"
    assert producer.values("identified") == [] and producer.values("invalid") == []


def test_a_receivedat_days_ahead_of_our_clock_does_not_expire_the_dedup_table():
    """A producer whose clock is 30 days fast: its arrival counts as tomorrow (ours), so the generation
    holding today's messageIds survives, and a retry of today's event is still dropped."""
    s = Stage()
    s.ingest.clock = lambda: 1_700_000_000.0  # the Messages' receivedAt
    s.handle(batch([viewed("anon-a", "m1")]), Producer())
    fast = batch([viewed("anon-z", "m-fast")])[0]
    fast.headers = [(HEADER_SOURCE, b"test"), (HEADER_RECEIVED_AT, str(1_700_000_000_000 + 30 * 86_400_000).encode())]
    s.handle([fast], Producer())
    retry = Producer()
    s.handle(batch([viewed("anon-a", "m1")] * 2)[1:], retry)  # another record (offset 101) with m1
    assert retry.values("identified") == []
    assert s.first_seen.data[3][clock_key(3)].split()[0] == str(RECEIVED_DAY + 1).encode()


# ---- alert rules' counts and progress markers (docs/design.md §10) ----------------------------------

ALERTING = parse_metrics({"alerts": [
    {"name": "views", "series": {"events": "Product Viewed", "period": "hour"}, "rule": {"threshold": {"below": 1}}},
    {"name": "bad", "series": {"invalid_rate": True, "source": "any"}, "rule": {"threshold": {"above": 0.5}}},
    {"name": "web_only", "series": {"events": "any", "source": "writekey:web"}, "rule": {"threshold": {"below": 1}}},
]}).alerts
TICK_AT = 1_700_000_123_000


def tick(offset: int) -> Message:
    m = Message(b"", b"", partition=3, offset=offset)
    m.headers = [(HEADER_TICK, str(TICK_AT).encode())]
    return m


def shares(producer: Producer) -> dict[str, dict]:
    """rule → the newest share (by version) sent, per period."""
    out: dict[str, dict] = {}
    for r in producer.values(TOPICS.alert_series):
        if r["t"] == "share":
            for period, values in r["periods"].items():
                out.setdefault(r["rule"], {})[int(period)] = {**values, "src": r["src"]}
    return out


def test_alert_counts_are_exact_across_a_redelivery_and_markers_go_on():
    s = Stage(alerts=ALERTING)
    producer = Producer()
    records = [*batch(JOURNEY), tick(106)]
    s.handle(records, producer)
    got = shares(producer)
    hour = datetime(2026, 11, 10, 9, tzinfo=UTC).timestamp() * 1000
    # m1, m2, m4 (the SDK retry of m2 is no event); the identify is no Product Viewed
    assert {p: (r["v"], r["src"]) for p, r in got["views"].items()} == {hour: (3, "i3")}
    arrival = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000  # invalid rates go by arrival
    assert {p: (r["v"], r["b"]) for p, r in got["bad"].items()} == {arrival: (1, 5)}
    assert "web_only" not in got  # the records came from source "test"
    # the marker: passed on to every events.identified partition, behind this batch's events there ...
    ticks = [(p, orjson.loads(v)) for (t, p), recs in producer.records.items() if t == "identified"
             for _, v in recs if orjson.loads(v).get("type") == "tick"]
    assert sorted(p for p, _ in ticks) == PARTITIONS
    assert {(r["from"], r["of"], r["at"]) for _, r in ticks} == {(3, 8, TICK_AT)}
    assert all(orjson.loads(recs[-1][1]).get("type") == "tick"
               for (t, _), recs in producer.records.items() if t == "identified")
    # ... and reported, after the counts, to every evaluator partition
    progress = [(p, orjson.loads(v)) for (t, p), recs in producer.records.items() if t == TOPICS.alert_series
                for _, v in recs if orjson.loads(v)["t"] == "progress"]
    assert sorted(p for p, _ in progress) == PARTITIONS
    assert {(r["stage"], r["partition"], r["through"]) for _, r in progress} == {("ingest", 3, TICK_AT)}

    # a crash before the commit: the same records again, on a worker that restored the table — counted once
    again = Stage(alerts=ALERTING)
    again.first_seen, again.ingest.first_seen = s.first_seen, s.first_seen
    again.ingest.dedup = s.ingest.dedup
    producer = Producer()
    again.handle(records, producer)
    got = shares(producer)
    assert got["views"][hour]["v"] == 3 and (got["bad"][arrival]["v"], got["bad"][arrival]["b"]) == (1, 5)
