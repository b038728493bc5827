"""The aggregates stage: person state, merge hand-off and partition partials on events.identified.

Thin wiring around the pure parts (DESIGN §4): metrics/person.py decides what an event does to a
person, metrics/partials.py what a person change does to the partition's cells. Per batch of
events.identified records (one consumer, several partitions):

1. each record is applied to its person's state, read from the `persons` table, in partition order:
   an event (unless late: its row is stored with late=1 and it touches no state), a merge marker
   (the anonymous person's state is handed to its user, keyed by the user, and forgotten), or a
   handed-over state (joined into the user's);
2. the changed persons' contributions update the partials; the changed cells are published to
   metrics.* as absolute values with a version; handed-over states are sent on;
3. the batch's rows go to flywheel.events (with their late flag);
4. only then are the new person states written to the table.

Steps 2–3 are awaited until Kafka and ClickHouse acknowledged them, so whatever the table says was
already published: a crash after step 4 loses nothing, a crash before it replays the batch from the old
states (redelivery), and re-publication is harmless (absolute values, idempotent join, ReplacingMergeTree).
Partials of a partition are rebuilt from the table when it is first seen after an assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable
from contextlib import contextmanager

import orjson
from aiokafka.partitioner import murmur2

from flywheel import observability as obs
from flywheel.clickhouse.rows import event_row
from flywheel.metrics.definitions import Metrics
from flywheel.metrics.partials import Partials, record_key, records
from flywheel.metrics.person import PersonState, apply, is_late, join

log = logging.getLogger(__name__)

META_PREFIX = b"\x00partition\x00"  # per-partition bookkeeping in the persons table: watermark, last version


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, like the Java client) gives a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@contextmanager
def as_event(event):
    """Faust tables write to the partition of the *current* event (a context variable). A batch holds
    events of several partitions, so each table access is made as of an event of the right partition.
    faust.streams._current_event is private API; the alternative is one event per loop, 4× slower."""
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class AggregateStage:
    def __init__(self, *, metrics: Metrics, persons, partitions, sink, producer_send, topics):
        self.metrics = metrics
        self.persons = persons  # Faust Table: person id → PersonState JSON
        self.partitions = partitions  # () -> partition count of events.identified
        self.sink = sink
        self.send = producer_send  # async (topic, key, value) -> awaitable delivery
        self.topics = topics
        self.partials = Partials(metrics)
        self.versions: dict[int, int] = {}

    # ---- rebuild ------------------------------------------------------------------------------------
    def rebuild(self, wanted: set[int]) -> None:
        n_partitions = self.partitions()
        states: dict[int, list[PersonState]] = {p: [] for p in wanted}
        meta: dict[int, dict] = {}
        for key, value in self.persons.items():
            if value is None:
                continue
            if key.startswith(META_PREFIX):
                p = int(key[len(META_PREFIX):])
                if p in wanted:
                    meta[p] = orjson.loads(value)
                continue
            p = partition_of(key, n_partitions)
            if p in wanted:
                states[p].append(PersonState.from_json(orjson.loads(value), self.metrics))
        for p in wanted:
            m = meta.get(p, {})
            self.partials.rebuild(p, states[p], int(m.get("watermark", -1)))
            self.versions[p] = int(m.get("version", 0))
            obs.PARTIAL_REBUILDS.inc()
        log.info("partials rebuilt from the person table for partitions %s", sorted(wanted))

    def forget(self) -> None:
        self.partials.forget()

    async def _counted(self, message_ids: list[str]) -> set[str]:
        ids = ", ".join("'" + m.replace("\\", "\\\\").replace("'", "\\'") + "'" for m in message_ids)
        sql = f"SELECT DISTINCT message_id FROM flywheel.events WHERE late = 0 AND message_id IN ({ids})"
        loop = asyncio.get_running_loop()
        try:
            _, found = await loop.run_in_executor(self.sink.executor, self.sink.ch.rows, sql)
        except Exception as exc:  # ClickHouse down: the insert below waits for it; the flags stay as judged
            log.warning("could not check %d late-looking events against stored rows: %s", len(message_ids), exc)
            return set()
        return {r[0] for r in found}

    def _version(self, partition: int) -> int:
        v = max(time.time_ns(), self.versions.get(partition, 0) + 1)
        self.versions[partition] = v
        return v

    # ---- one batch ----------------------------------------------------------------------------------
    async def process(self, events: Iterable) -> None:
        batch = [(e, orjson.loads(e.value)) for e in events]
        missing = {e.message.partition for e, _ in batch} - {p for p in self.partials.parts}
        if missing:
            self.rebuild(missing)
        touched: dict[tuple[int, bytes], list] = {}  # (partition, key) → [event, old, new]

        def state_of(event, key: bytes) -> list:
            slot = touched.get((event.message.partition, key))
            if slot is None:
                with as_event(event):
                    raw = self.persons.get(key)
                old = PersonState.from_json(orjson.loads(raw), self.metrics) if raw is not None else None
                new = old.copy() if old is not None else PersonState.empty(self.metrics)
                slot = touched[(event.message.partition, key)] = [event, old, new]
            slot[0] = event
            return slot

        rows, handoffs = [], []
        for event, rec in batch:
            part = event.message.partition
            kind = rec.get("type")
            if kind == "merge":
                slot = state_of(event, rec["from"].encode())
                if slot[2] is not None and slot[2].newest >= 0:
                    handoffs.append({"type": "state", "person": rec["into"], "from": rec["from"],
                                     "messageId": rec["messageId"], "state": slot[2].to_json()})
                    obs.PERSON_HANDOFFS.inc()
                slot[2] = None  # forgotten here once the hand-off is acknowledged
            elif kind == "state":
                slot = state_of(event, rec["person"].encode())
                incoming = PersonState.from_json(rec["state"], self.metrics)
                current = slot[2] if slot[2] is not None else PersonState.empty(self.metrics)
                slot[2] = join(current, incoming, self.metrics)
                self.partials.advance(part, slot[2].newest)
            else:
                slot = state_of(event, rec["personId"].encode())
                state = slot[2] if slot[2] is not None else PersonState.empty(self.metrics)
                slot[2] = state
                ts, mid = rec["timestamp"], rec["messageId"]
                late = None
                if state.has_applied(mid):
                    pass  # applied before (a redelivery): not late, nothing to do
                elif is_late(state, ts, self.metrics):
                    late = "person"
                else:
                    if self.partials.touches_closed(part, ts):
                        # rare: a silent person's old event, after this partition's cells of that time closed
                        obs.CLOSED_CELL_UPDATES.inc()
                        log.warning("event %s (%d ms) changes cells already closed on partition %d: "
                                    "their published values stay as they are", mid, ts, part)
                    apply(state, mid, ts, self.metrics.mask(rec.get("event", ""), rec.get("properties") or {}),
                          self.metrics)
                    self.partials.advance(part, ts)
                if late:
                    obs.LATE_EVENTS.labels(late).inc()
                rec["late"] = bool(late)
                rows.append(event_row(rec))

        # A redelivered event can arrive under another person than the one that applied it (its
        # anonymous id got linked in between: the identity stage now keys it by the user, whose state
        # has not joined the anonymous one yet) and look late there. A row already stored as counted
        # proves it was applied to some person, whose state carries it: keep the row counted.
        suspects = [r["message_id"] for r in rows if r["late"]]
        if suspects:
            counted = await self._counted(suspects)
            for r in rows:
                if r["late"] and r["message_id"] in counted:
                    r["late"] = 0

        # 2. partials and hand-offs, acknowledged before the state that explains them is written
        for (part, _key), (_event, old, new) in touched.items():
            self.partials.update(part, old, new)
        deliveries = [self.send(self.topics.identified, h["person"].encode(), orjson.dumps(h)) for h in handoffs]
        last_event: dict[int, object] = {}
        for (part, _key), (event, _old, _new) in touched.items():
            last_event[part] = event
        for part in sorted(last_event):
            cells = self.partials.drain(part)
            if not cells:
                continue
            version = self._version(part)
            for kind, recs in records(cells, part, version).items():
                topic = getattr(self.topics, kind)
                for r in recs:
                    deliveries.append(self.send(topic, record_key(kind, r), orjson.dumps(r)))
                if recs:
                    obs.PARTIALS_PUBLISHED.labels(kind).inc(len(recs))
        # What the table's per-partition record will say, taken now: the partials may be forgotten (a
        # rebalance) while this batch awaits Kafka and ClickHouse below.
        meta = {part: {"watermark": self.partials.parts[part].watermark, "version": self.versions.get(part, 0)}
                for part in last_event}
        if deliveries:
            await asyncio.gather(*deliveries)
        # 3. rows
        await self.sink.write("flywheel.events", rows)
        # 4. state
        for (_part, key), (event, old, new) in touched.items():
            with as_event(event):
                if new is None:
                    if old is not None:
                        del self.persons[key]
                elif old is None or new.to_json() != old.to_json():
                    self.persons[key] = orjson.dumps(new.to_json())
        for part, event in last_event.items():
            with as_event(event):
                self.persons[META_PREFIX + str(part).encode()] = orjson.dumps(meta[part])
