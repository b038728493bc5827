"""`flywheel persons forget`: erase a person — an erasure request (docs/design.md §3, "Forgetting").

1. Find them in ClickHouse: the person an id belongs to (a linked anonymous id names its user), every id
   of theirs (the user id, the anonymous ids linked to it or only ever used by them, aliases), their
   events — and every metric cell they count in, by the oracle's queries over their events alone.
2. Ask the stream to forget them, through the topics the state lives on:
   - events.raw, one request per partition that keeps some of it (header `flywheel-forget`): their
     links in the identity table and their messageIds in the dedup table are deleted (stages/ingest.py);
   - events.identified, one request per id: a state kept under it is deleted, and the closed cells of
     the events resolved to that id are corrected (stages/aggregate.py); the person's own request
     answers `forgotten` on identity.changes — what services follow.
3. Wait for that answer, then delete their rows from ClickHouse (events, identity links and conflicts,
   rejected events naming their ids) and wait for the deletions to finish.

Run it again with the same id: it finds what is left (nothing) and says so. Events of theirs still on
their way when it runs arrive after it: forget a person once their traffic has stopped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import orjson

from flywheel.config import Settings
from flywheel.metrics import oracle
from flywheel.metrics.cells import Cell, cell_id
from flywheel.metrics.definitions import ACTIVE_WINDOWS, LIFECYCLE_STATUSES, Metrics
from flywheel.metrics.oracle import quote
from flywheel.model.clock import DAY_MS
from flywheel.model.envelope import HEADER_FORGET, kafka_key
from flywheel.runtime.partitioner import partition_for

Rows = Callable[[str], list]
EPOCH = date(1970, 1, 1).toordinal()
CHUNK = 1000  # ids per DELETE statement (ClickHouse's max_query_size is 256 KiB), messageIds per request


@dataclass
class Person:
    person_id: str
    ids: list[str]  # the person id first
    events: list[tuple[str, str, int]]  # (messageId, events.raw key, receivedAt ms)
    cells: dict[str, list[Cell]] = field(default_factory=dict)  # by the id ClickHouse resolves events to


def day_number(value) -> int:
    return date.fromisoformat(str(value)[:10]).toordinal() - EPOCH


def _in(ids: list[str]) -> str:
    return "(" + ", ".join(quote(i) for i in ids) + ")"


def find(rows: Rows, given: str, metrics: Metrics) -> Person | None:
    """The person `given` names, or None if ClickHouse knows no such id."""
    linked = rows(f"SELECT person_id FROM flywheel.identity_map FINAL WHERE distinct_id = {quote(given)} LIMIT 1")
    person = linked[0][0] if linked else given
    ids = [person]
    # Their ids, to a fixed point: ids linked to any of them (an alias of an alias), and the anonymous ids
    # of their anonymous events. An event with a user id may carry another user's anonymous id (a refused
    # link): that id is not theirs. An id that is a user id of its own (aliased: previousId → userId) has
    # events resolved to it: those are theirs too.
    while True:
        known = _in(ids)
        more = [r[0] for r in rows(f"SELECT DISTINCT distinct_id FROM flywheel.identity_map "
                                   f"WHERE person_id IN {known}")]
        more += [i for r in rows(f"SELECT DISTINCT anonymous_id, previous_id FROM flywheel.events_resolved "
                                 f"WHERE person_id IN {known} AND user_id = ''") for i in r]
        new = sorted({i for i in more if i and i not in ids})
        if not new:
            break
        ids += new
    events = rows("SELECT message_id, any(type), any(anonymous_id), any(user_id), any(previous_id), "
                  "toUInt64(toUnixTimestamp64Milli(max(received_at))) FROM flywheel.events_resolved "
                  f"WHERE person_id IN {_in(ids)} GROUP BY message_id ORDER BY message_id")
    if not events and len(ids) == 1 and not linked:
        return None
    keyed = [(mid, kafka_key({"type": t, "anonymousId": a, "userId": u, "previousId": p}) or "", int(at))
             for mid, t, a, u, p, at in events]
    resolved = {r[0] for r in rows(f"SELECT DISTINCT person_id FROM flywheel.events_resolved WHERE person_id IN "
                                   f"{_in(ids)}")}
    return Person(person, ids, keyed, {i: cells(rows, metrics, i) for i in ids if i in resolved})


def cells(rows: Rows, metrics: Metrics, person: str) -> list[Cell]:
    """Every metric cell the person counts in: the oracle's queries over their events only."""
    source = f"(SELECT * FROM flywheel.events_resolved WHERE person_id = {quote(person)})"
    out: list[Cell] = []
    for f in metrics.funnels:
        out += [(f, day_number(day), int(step)) for _, day, step, _ in rows(oracle.funnel_sql(f, source))]
    for r in metrics.retention:
        out += [(r, day_number(day), int(n)) for _, day, n, _, _ in rows(oracle.retention_sql(r, source))]
        out += [(r, day_number(day), 0) for _, day, _ in rows(oracle.cohort_sizes_sql(r, source))]
    if metrics.lifecycle is not None:
        statuses = {name: i for i, name in enumerate(LIFECYCLE_STATUSES)}
        out += [(metrics.lifecycle, day_number(day), statuses[status])
                for day, status, _ in rows(oracle.lifecycle_sql(metrics.lifecycle, metrics.activity, source))]
    active = rows(f"SELECT DISTINCT toString(toDate(timestamp)) FROM {source} WHERE late = 0 "
                  f"AND {oracle.activity_sql(metrics.activity)}")
    days = sorted(day_number(d) for (d,) in active)
    out += sorted({(w, d + k) for w in ACTIVE_WINDOWS for d in days for k in range(w.days)},
                  key=lambda c: (c[0].days, c[1]))
    return out


def raw_requests(person: Person, request_id: str, partitions: list[int], *,
                 since_ms: int = 0) -> list[tuple[str, bytes]]:
    """(key, value) of the events.raw requests: per partition keeping some of the person's links (an
    anonymous id's, on its own partition) or messageIds (on their event's key's partition) — only those
    received since `since_ms` (the dedup table keeps nothing older), CHUNK to a record."""
    by_partition: dict[int, dict] = {}

    def slot(key: str) -> dict:
        p = partition_for(key.encode(), partitions)
        return by_partition.setdefault(p, {"key": key, "ids": [], "messageIds": []})

    for i in person.ids[1:]:
        slot(i)["ids"].append(i)
    for mid, key, received_ms in person.events:
        if key and received_ms >= since_ms:
            slot(key)["messageIds"].append(mid)
    out = []
    for _, s in sorted(by_partition.items()):
        mids = s["messageIds"]
        for n in range(0, max(len(mids), 1), CHUNK):
            out.append((s["key"], orjson.dumps({"requestId": request_id, "person": person.person_id,
                                                 "ids": s["ids"] if n == 0 else [],
                                                 "messageIds": mids[n:n + CHUNK]})))
    return out


def identified_requests(person: Person, request_id: str, at_ns: int) -> list[tuple[str, bytes]]:
    """(key, value) of the events.identified requests: one per id, with the cells of the events ClickHouse
    resolves to that id (its partition counted them); the person's own is `primary`."""
    out = []
    for i in person.ids:
        rec = {"type": "forget", "person": i, "requestId": request_id, "at": at_ns,
               "cells": [cell_id(c) for c in person.cells.get(i, ())]}
        if i == person.person_id:
            rec |= {"primary": True, "ids": person.ids}
        out.append((i, orjson.dumps(rec)))
    return out


def delete_statements(person: Person) -> list[str]:
    """ClickHouse mutations removing the person's rows (ALTER … DELETE: also on old servers)."""
    out = []
    mids = [m for m, _, _ in person.events]
    ids = _in(person.ids)
    for i in range(0, len(mids), CHUNK):  # a messageId that another person's event reused stays theirs
        out.append("ALTER TABLE flywheel.events DELETE WHERE message_id IN ("
                   + ", ".join(quote(m) for m in mids[i:i + CHUNK])
                   + f") AND (user_id IN {ids} OR (user_id = '' AND (anonymous_id IN {ids} OR previous_id IN {ids})))")
    out.append(f"ALTER TABLE flywheel.identity_map DELETE WHERE person_id IN {ids} OR distinct_id IN {ids}")
    out.append(f"ALTER TABLE flywheel.identity_conflicts DELETE WHERE linked_to IN {ids} OR refused IN {ids}")
    for i in range(0, len(person.ids), CHUNK):
        ids = "(" + ", ".join(quote(x) for x in person.ids[i:i + CHUNK]) + ")"
        out.append("ALTER TABLE flywheel.invalid_events DELETE WHERE "
                   + " OR ".join(f"visitParamExtractString(payload, '{f}') IN {ids}"
                                 for f in ("userId", "anonymousId", "previousId")))
    return out


def request_id() -> str:
    return str(uuid.uuid4())


def send(settings: Settings, person: Person, request: str, *, wait: float,
         on_wait: Callable[[str], None] = lambda _: None) -> bool:
    """Send the requests and wait (up to `wait` s) for the stream's `forgotten`; whether it came."""
    from flywheel.producer import Producer
    from kafka import KafkaConsumer, TopicPartition

    names = settings.topics
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed")
    try:
        tps = [TopicPartition(names.identity_changes, p)
               for p in sorted(consumer.partitions_for_topic(names.identity_changes) or ())]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        for tp in tps:
            consumer.position(tp)  # fixed now: the answer comes after
        at_ns = time.time_ns()
        with Producer(settings.kafka_bootstrap, topic=names.raw, source="flywheel-persons") as raw:
            # the dedup table keeps a messageId one to two horizons of arrival time (a day's slack)
            since = int(time.time() * 1000) - (2 * settings.dedup_horizon_days + 1) * DAY_MS
            raw.confirm([raw.send_raw(value, key=key, headers=[(HEADER_FORGET, request.encode())])
                         for key, value in raw_requests(person, request, raw.partitions(), since_ms=since)])
        with Producer(settings.kafka_bootstrap, topic=names.identified, source="flywheel-persons") as identified:
            identified.confirm([identified.send_raw(value, key=key)
                                for key, value in identified_requests(person, request, at_ns)])
        deadline = time.monotonic() + wait
        on_wait(f"waiting for the worker to confirm on {names.identity_changes} (request {request})")
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    change = orjson.loads(r.value)
                    if change.get("type") == "forgotten" and change.get("requestId") == request:
                        return True
        return False
    finally:
        consumer.close()


def delete(rows: Rows, person: Person, *, wait: float) -> list[str]:
    """Run the deletions and wait for ClickHouse to finish them; the statements still running after
    `wait` seconds (none: all done)."""
    statements = delete_statements(person)
    for sql in statements:
        rows(sql)
    deadline = time.monotonic() + wait
    while True:
        pending = rows("SELECT command FROM system.mutations WHERE database = 'flywheel' AND is_done = 0")
        if not pending or time.monotonic() >= deadline:
            return [r[0] for r in pending]
        time.sleep(0.25)
