"""The aggregates stage: person state, merge hand-off and partition partials on events.identified.

Thin wiring around the pure parts (DESIGN §4): metrics/person.py decides what an event does to a
person, metrics/partials.py what a person change does to the partition's cells. Per batch of
events.identified records (one consumer, several partitions):

1. each record is applied to its person's state, read from the `persons` table, in partition order:
   an event (unless late: its row is stored with late=1 and it touches no state), a merge marker
   (the anonymous person's state is handed to its user, keyed by the user, and forgotten), or a
   handed-over state (joined into the user's);
2. handed-over states are sent, and acknowledged, before the states they leave are forgotten;
3. the batch's rows go to flywheel.events (with their late flag);
4. the new person states are written to the table: changelog records first (awaited), then the store;
   with them, per partition, the watermark, the cells' version and the cells this batch takes to 0;
5. only then are the changed cells published to metrics.* (absolute values with that version).

Every step is awaited until Kafka or ClickHouse acknowledged it. A crash or failure before step 4
replays the batch from the old states (redelivery, or batches.py's retry); the replay may take another
path (a redelivered event can arrive under its user by then), which is why no cell is published before
the states that explain it are written: published cells always derive from the table. A crash between
steps 4 and 5 is covered by the rebuild: when the first batch after an assignment (or a failed batch)
needs them, the partials of every owned partition are rebuilt from the table, and every counted cell —
plus the recorded zeros, which counting cannot find — is published again. Re-publication is harmless
(absolute values, higher version, ReplacingMergeTree), and so is a second hand-off (join is idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import orjson
from aiokafka.partitioner import murmur2

from flywheel import observability as obs
from flywheel.batches import enter_partition
from flywheel.clickhouse.rows import event_row
from flywheel.metrics.definitions import Metrics
from flywheel.metrics.partials import Partials, record_key, records
from flywheel.metrics.person import PersonState, apply, is_late, join
from flywheel.outbox import Outbox, changelog, remember_offsets

if TYPE_CHECKING:
    from faust.types import Message

log = logging.getLogger(__name__)

META_PREFIX = b"\x00partition\x00"  # per-partition bookkeeping in the persons table: watermark, last version


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, like the Java client) gives a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class AggregateStage:
    def __init__(self, *, metrics: Metrics, persons, partitions, owned: Callable[[], set[int]], sink,
                 outbox: Callable[[Sequence[str]], Awaitable[Outbox]], topics):
        self.metrics = metrics
        self.persons = persons  # Faust Table: person id → PersonState JSON
        self.partitions = partitions  # () -> partition count of events.identified
        self.owned = owned  # () -> the partitions of events.identified assigned to this worker
        self.sink = sink
        self.outbox = outbox  # async (topics) -> an Outbox for them
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
            zeros = [tuple(k) for k in m.get("zeros", ())]
            self.partials.rebuild(p, states[p], int(m.get("watermark", -1)), zeros)
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
    async def process(self, messages: Sequence[Message]) -> None:
        batch = [(m.partition, orjson.loads(m.value)) for m in messages]
        partitions = {p for p, _ in batch}
        if partitions - self.partials.parts.keys():
            # Every owned partition at once (one scan of the table either way): one that gets no record
            # for a while must still re-publish what a crash may have left unpublished (the zeros).
            self.rebuild((partitions | self.owned()) - self.partials.parts.keys())
        try:
            await self._process(batch)
        except BaseException:
            # The partials count this batch; the table may not, or its cells may be unpublished: the
            # retry (batches.py) starts from partials rebuilt from the table.
            self.partials.forget(partitions)
            raise

    async def _process(self, batch: list[tuple[int, dict]]) -> None:
        store = self.persons.data
        touched: dict[tuple[int, bytes], list] = {}  # (partition, key) → [old, new]

        def state_of(part: int, key: bytes) -> list:
            slot = touched.get((part, key))
            if slot is None:
                enter_partition(part)  # the store of the person's partition
                raw = store.get(key)
                old = PersonState.from_json(orjson.loads(raw), self.metrics) if raw is not None else None
                new = old.copy() if old is not None else PersonState.empty(self.metrics)
                slot = touched[(part, key)] = [old, new]
            return slot

        rows, handoffs = [], []
        for part, rec in batch:
            kind = rec.get("type")
            if kind == "merge":
                slot = state_of(part, rec["from"].encode())
                if slot[1] is not None and slot[1].newest >= 0:
                    handoffs.append({"type": "state", "person": rec["into"], "from": rec["from"],
                                     "messageId": rec["messageId"], "state": slot[1].to_json()})
                slot[1] = None  # forgotten here once the hand-off is acknowledged
            elif kind == "state":
                slot = state_of(part, rec["person"].encode())
                incoming = PersonState.from_json(rec["state"], self.metrics)
                current = slot[1] if slot[1] is not None else PersonState.empty(self.metrics)
                slot[1] = join(current, incoming, self.metrics)
                self.partials.advance(part, slot[1].newest)
            else:
                slot = state_of(part, rec["personId"].encode())
                state = slot[1] if slot[1] is not None else PersonState.empty(self.metrics)
                slot[1] = state
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

        topics = self.topics
        # 2. hand-offs, acknowledged before the states they leave are forgotten (step 4)
        if handoffs:
            out = await self.outbox((topics.identified,))
            for h in handoffs:
                out.add(topics.identified, h["person"].encode(), orjson.dumps(h))
            await out.send()
            obs.PERSON_HANDOFFS.inc(len(handoffs))
        # The partials, and the cells to publish in step 5, taken now: the partials may be forgotten (a
        # rebalance) while this batch awaits Kafka and ClickHouse below.
        for (part, _key), (old, new) in touched.items():
            self.partials.update(part, old, new)
        # The touched partitions, and any just rebuilt (their cells are all to publish again).
        parts = sorted({part for part, _key in touched} | {p for p, pp in self.partials.parts.items() if pp.dirty})
        cells: dict[int, tuple[int, list]] = {}
        meta: dict[int, dict] = {}
        for part in parts:
            drained = self.partials.drain(part)
            if drained:
                cells[part] = (self._version(part), drained)
            meta[part] = {"watermark": self.partials.parts[part].watermark, "version": self.versions.get(part, 0),
                          "zeros": [list(k) for k, v in drained if v == 0]}
        # 3. rows
        await self.sink.write("flywheel.events", rows)
        # 4. state: the changelog first, then the store (a failure before that retries from the old states)
        writes: list[tuple[int, bytes, bytes | None]] = []
        for (part, key), (old, new) in touched.items():
            if new is None:
                if old is not None:
                    writes.append((part, key, None))
            elif old is None or new.to_json() != old.to_json():
                writes.append((part, key, orjson.dumps(new.to_json())))
        writes += [(part, META_PREFIX + str(part).encode(), orjson.dumps(meta[part])) for part in parts]
        table_log = await self.outbox(())
        name = changelog(self.persons)
        for part, key, value in writes:
            table_log.add(name, key, value, partition=part)
        offsets = await table_log.send()
        for part, key, value in writes:
            enter_partition(part)
            if value is None:
                store.pop(key, None)
            else:
                store[key] = value
        remember_offsets((self.persons,), offsets)
        # 5. the changed cells
        if cells:
            published = await self.outbox((topics.funnels, topics.retention, topics.active_users))
            for part, (version, drained) in cells.items():
                for kind, recs in records(drained, part, version).items():
                    topic = getattr(topics, kind)
                    for r in recs:
                        published.add(topic, record_key(kind, r), orjson.dumps(r))
                    if recs:
                        obs.PARTIALS_PUBLISHED.labels(kind).inc(len(recs))
            await published.send()
