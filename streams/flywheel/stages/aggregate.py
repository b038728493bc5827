"""The aggregate stage: person state, merge hand-off and partition partials on events.identified.

Thin wiring around the pure parts (docs/design.md §4): metrics/person.py decides what an event does to
a person, metrics/partials.py what a person change does to the partition's cells. Per batch of
events.identified records (one consumer, several partitions):

1. each record is applied to its person's state, read from the `persons` table, in partition order:
   an event that is activity or satisfies a metric's condition (unless late: its row is stored with
   late=1 and it touches no state; identity calls touch no state at all), a merge marker
   (the anonymous person's state is handed to its user, keyed by the user, and forgotten), a
   handed-over state (joined into the user's), or a forget request (the state is deleted; see `_forgotten`);
2. handed-over states are sent, and acknowledged, before the states they leave are forgotten;
3. the batch's rows go to flywheel.events (with their late flag);
4. the batch's effect on the partials is computed (not applied), and the table is written: per
   partition, a `begin` mark, the changed person states, the changed cells' counts and an `end` mark
   (the checkpoint: watermark, version, cells awaiting publication at 0). Once Kafka holds all of it,
   the store is written and the partials take the change, in one step;
5. only then are the changed cells published to metrics.* (absolute values with a growing version).

Every step is awaited until Kafka or ClickHouse acknowledged it. A batch that fails (or a crash)
before step 4 landed is replayed from the old states and the old partials: the retry redoes the batch's
own work, nothing more (runtime/retry.py). A cell stays due for publication until a publication of its
value landed, so a failure in step 5 is made good by the retry, and a crash by the repair below.

Assignment. Each owned partition is repaired before its first batch, and without waiting for one: its
partials are loaded from the checkpoint — O(cells), not O(persons) — when the checkpoint is whole (the
`begin` and `end` marks carry the same sequence number: the outbox lands a partition's records in order,
so a batch cut short by a crash leaves a newer `begin`); otherwise they are counted from the person
states in slices that give the event loop back (a first start on a table of an older release), and a
whole checkpoint is written. Then every counted cell, and every cell due at 0, is published again:
what a crash left unpublished. Re-publication is harmless (absolute values, higher version).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson

from flywheel import observability as obs
from flywheel.config import Topics
from flywheel.metrics import oracle, rfm
from flywheel.metrics.alerts import GAUGE, cell_feeds, cell_index, feed_record, progress_record
from flywheel.metrics.cells import Cell, cell_id, is_open, parse_cell_id, record
from flywheel.metrics.definitions import ACTIVE_WINDOWS, Metrics, ref
from flywheel.metrics.partials import Change, Partials, count
from flywheel.metrics.person import PersonState, apply, experiment_history_cut, histories, is_late, join
from flywheel.metrics.segments import audience_record, decide, memberships, next_change, trim
from flywheel.model.clock import wall_ms
from flywheel.model.envelope import AUDIENCE_ENTERED, AUDIENCE_EXITED
from flywheel.model.rows import event_row
from flywheel.stages.backfill import BackfillJob, Book
from flywheel.stages.ports import ClickHouseWriter, Outbox, Record, Table
from flywheel.stages.tables import Writes

log = logging.getLogger(__name__)

# Per-partition bookkeeping in the persons table, beside the person states (whose ids never start with NUL).
END = b"\x00partition\x00"  # + partition: the checkpoint's end mark (the first release's meta record)
BEGIN = b"\x00begin\x00"  # + partition: the sequence number of the last batch that started writing
CELL = b"\x00cell\x00"  # + partition + NUL + cell id: a cell's count
# Segments (docs/design.md §9): the sweep's index, one key per person with a due time, in time order; and
# the membership changes of the partition's last batches, kept until their publication is known to have landed.
DUE = b"\x00due\x00"  # + partition + NUL + due ms (13 digits) + NUL + person id → b""
# + partition + NUL + topic field (Topics) + NUL + the record's key → [record, ...]: segments.changes'
# audience records (key segment|person), segments.rfm's per-person RFM summaries (key person)
AUDIENCE = b"\x00audience\x00"
SWEEP_MAX = 500  # persons re-evaluated per partition per sweep batch
# RFM memberships need global quintiles: the owner of partition LEADER decides them from ClickHouse's
# rfm_values and keeps its last decision per person (docs/design.md §9).
LEADER = 0
RFM_DECIDED = b"\x00rfm\x00"  # + LEADER + NUL + person → "segment|version|since"
SIZES = b"\x00sizes\x00"  # + partition → {segment: members on the partition}, for alert rules on segment sizes
# + LEADER → the backfill book (stages/backfill.py): each partition's switch, the conditions waiting, the job
BACKFILL = b"\x00backfill\x00"
# A count from the person states gives the event loop back every SLICE states (~0.2 ms each), and a batch
# every YIELD_EVERY records: the collector and /health share the loop.
SLICE = 100
YIELD_EVERY = 500

Retry = Callable[[Callable[[], Awaitable[Any]], str, int], Awaitable[Any]]


def _mark(prefix: bytes, partition: int) -> bytes:
    return prefix + str(partition).encode()


def _cell_prefix(partition: int) -> bytes:
    return _mark(CELL, partition) + b"\x00"


def _due_prefix(partition: int) -> bytes:
    return _mark(DUE, partition) + b"\x00"


def _due_key(partition: int, due: int, person: bytes) -> bytes:
    return _due_prefix(partition) + b"%013d\x00" % due + person


def _audience_prefix(partition: int) -> bytes:
    return _mark(AUDIENCE, partition) + b"\x00"


def is_bookkeeping(key: bytes) -> bool:
    return key[:1] == b"\x00"


def owner_of(key: bytes, person_partition: Callable[[bytes], int]) -> int:
    """The events.identified partition a key of the persons table belongs to: a person's is its key's
    (`person_partition`), a bookkeeping key names its own."""
    return int(key.split(b"\x00")[2]) if is_bookkeeping(key) else person_partition(key)


class AggregateStage:
    def __init__(self, *, metrics: Metrics, persons: Table, sink: ClickHouseWriter,
                 outbox: Callable[[], Awaitable[Outbox]], topics: Topics, retry: Retry,
                 clock: Callable[[], int] = wall_ms, sweep_seconds: float = 10.0, revision: int = -1,
                 backfill_page: int = 5000, backfill_pause: float = 0.0):
        self.revision = revision  # of the stored definitions in force (docs/design.md §13)
        self.backfill_page, self.backfill_pause = backfill_page, backfill_pause
        self.persons = persons  # person id → PersonState JSON, and the bookkeeping above
        self.sink = sink
        self.outbox = outbox  # async () -> a new Outbox
        self.topics = topics
        self.retry = retry  # the retry policy's run (attempt, name, size)
        self.versions: dict[int, int] = {}  # partition → last publication version
        self.seq: dict[int, int] = {}  # partition → sequence number of its last checkpoint
        # (partition, closed cell) → (value, version) of this worker's last correction for a forgotten person
        self.corrections: dict[tuple[int, Cell], tuple[int, int]] = {}
        self._repairs: dict[int, asyncio.Task] = {}
        self._publishing = asyncio.Lock()
        self._counting = asyncio.Lock()
        # Segments: the clock "within" windows are relative to (injectable: tests move time), how often the
        # due index is swept, and membership changes not yet published / published but still stored.
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        self._batch = asyncio.Lock()  # a batch of events and a sweep batch do not interleave
        self._unannounced: dict[int, dict[bytes, list[dict]]] = defaultdict(dict)
        self._announced: dict[int, set[bytes]] = defaultdict(set)
        self._sweeper: asyncio.Task | None = None
        self._backfiller: asyncio.Task | None = None
        # partition → the segment versions every person of it was evaluated under (its end mark keeps them)
        self.evaluated: dict[int, dict[str, str]] = {}
        self._reevaluations: dict[int, asyncio.Task] = {}
        self._rfm_decided: dict[str, tuple[str, str, int]] | None = None  # the leader's, loaded once
        self._refresher: asyncio.Task | None = None
        # partition → events.raw partition → the newest progress marker it passed on (runtime/ticker.py)
        self._ticks: dict[int, dict[int, int]] = defaultdict(dict)
        self._through: dict[int, int] = {}  # partition → progress last reported
        self.sizes: dict[int, dict[str, int]] = {}  # partition → segment → members (SIZES)
        self._derive(metrics)

    def _derive(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.partials = Partials(metrics)
        self._feeds = cell_index(metrics.alerts)  # the cells alert rules read (docs/design.md §10)
        self._gauges = tuple(a for a in metrics.alerts if a.series.kind == "segment")
        # the definitions a checkpoint's cells were counted under (its end mark keeps them): another set —
        # one added, changed or removed — is counted afresh from the person states, which hold their history
        self._definitions = sorted(ref(d) for d in (*metrics.funnels, *metrics.retention,
                                                    *filter(None, [metrics.lifecycle]), *metrics.experiments))
        # what the partitions' states keep history for (the end mark keeps it): what is new to a partition
        # has no history there, which the backfill brings (stages/backfill.py)
        self._histories = histories(metrics)

    async def use(self, metrics: Metrics, revision: int) -> None:
        """Another set of definitions, while running (docs/design.md §13): between two batches, every owned
        partition is taken up again as after a rebalance that gave it back — its partials counted afresh from
        the person states under the new set (the checkpoint names the old one), published again, segments
        re-evaluated if theirs changed. What other definitions count stays as it was: their history is in
        the states, per predicate."""
        async with self._batch:
            owned = set(self._repairs)
            self.stop()
            # a repair in hand finishes first: cancelled mid-checkpoint, it could leave the changelog ahead of
            # the store
            await asyncio.gather(*(asyncio.shield(t) for t in self._repairs.values()), return_exceptions=True)
            self.revoked(owned)
            self._derive(metrics)
            self.revision = revision
            self.assigned(owned)

    # ---- assignment --------------------------------------------------------------------------------
    def assigned(self, partitions: Iterable[int]) -> None:
        """The partitions this worker owns now (after table recovery): repair each, in the background."""
        wanted = set(partitions)
        self.revoked(set(self._repairs) - wanted)
        new = {p: asyncio.ensure_future(self._repair(p)) for p in sorted(wanted - self._repairs.keys())}
        self._repairs.update(new)
        if new:
            asyncio.ensure_future(self._report(new))
        if (self.metrics.segments or self.metrics.rfm) and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.ensure_future(self._sweep_forever())
        if self.metrics.rfm and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.ensure_future(self._refresh_forever())
        if LEADER in wanted and (self._backfiller is None or self._backfiller.done()):
            self._backfiller = asyncio.ensure_future(self._backfill_job().run_forever())

    async def _report(self, repairs: dict[int, asyncio.Task]) -> None:
        """One line once an assignment's partitions are repaired."""
        started = time.monotonic()
        done = await asyncio.gather(*repairs.values(), return_exceptions=True)
        restored = [r for r in done if isinstance(r, tuple)]
        if restored:
            how = Counter(h for h, _ in restored)
            log.info("partials of partitions %s restored in %.2fs: %d from checkpoints, %d counted from the "
                     "person states; %d cells republished", sorted(repairs), time.monotonic() - started,
                     how["checkpoint"], how["count"], sum(cells for _, cells in restored))

    def revoked(self, partitions: Iterable[int]) -> None:
        partitions = set(partitions)
        for p in partitions:
            task = self._repairs.pop(p, None)
            if task is not None:
                task.cancel()
        self.partials.forget(partitions)
        self.corrections = {k: v for k, v in self.corrections.items() if k[0] not in partitions}
        if LEADER in partitions:
            self._rfm_decided = None
        for p in partitions:
            self._unannounced.pop(p, None)
            self._announced.pop(p, None)
            self._ticks.pop(p, None)
            self._through.pop(p, None)
            self.sizes.pop(p, None)
            task = self._reevaluations.pop(p, None)
            if task is not None:
                task.cancel()

    async def handing_over(self, partitions: Iterable[int]) -> None:
        """Faust is about to hand these partitions' tables over (a rebalance). The sweep and the evaluations
        are not Faust's batches, which a rebalance waits for: finish the batch in hand, stop them (assignment
        starts them again), then revoke — so none of them writes a state it no longer owns."""
        async with self._batch:
            self.stop()
            self.revoked(partitions)

    def stop(self) -> None:
        for task in (self._sweeper, self._refresher, self._backfiller):
            if task is not None:
                task.cancel()
        self._sweeper = self._refresher = self._backfiller = None

    async def _ready(self, partitions: Iterable[int]) -> None:
        """Wait for these partitions' partials (a partition nobody announced, or whose repair failed — a bug
        or bad data: it raised, and the batch's retry tries again — is repaired now)."""
        for p in partitions:
            task = self._repairs.get(p)
            if task is not None and task.done() and (task.cancelled() or task.exception() is not None):
                del self._repairs[p]
        missing = [p for p in partitions if p not in self._repairs]
        if missing:
            self.assigned(set(self._repairs) | set(missing))
        tasks = [self._repairs[p] for p in partitions]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    async def _repair(self, partition: int) -> tuple[str, int]:
        """(how the partials were restored, how many cells were republished)"""
        # First, before the end mark can name the new conditions: this partition applies the definitions in
        # force from now on, and every event it applied before is in ClickHouse (stages/backfill.py).
        known, revision = self._end(partition).get("histories"), self.revision
        new = sorted({pid for h, pid in self._histories.items() if h not in known}) if known is not None else []
        await self.retry(lambda: self._report_switch(partition, revision, new), f"switch p{partition}", 1)
        how = "checkpoint" if self._load(partition) else "count"
        if how == "count":
            await self._rebuild(partition)
            await self.retry(lambda: self._write_checkpoint(partition), f"checkpoint p{partition}", 1)
        obs.PARTIALS_RESTORED.labels(how).inc()
        cells = len(self.partials.parts[partition].counts)
        await self.retry(lambda: self._publish([partition]), f"republish p{partition}", cells)
        await self._load_sizes(partition)
        # membership changes whose publication a crash may have cut: published again (same messageIds)
        prefix = _audience_prefix(partition)
        pending = {key[len(prefix):]: orjson.loads(value) for key, value in self.persons.scan(partition, prefix)}
        if pending:
            self._unannounced[partition].update(pending)
            await self.retry(lambda: self._announce([partition]), f"audiences p{partition}", len(pending))
        if self.evaluated.get(partition, {}) != self._segment_versions():
            # segments added or changed since the partition's persons were last evaluated: all of them, once
            self._reevaluations[partition] = asyncio.ensure_future(self._reevaluate(partition))
        return how, cells

    async def _load_sizes(self, partition: int) -> None:
        """The partition's segment sizes, from SIZES; counted from the person states once if it has none yet
        (a table of an older release), then its shares republished."""
        if not self._gauges:
            return
        raw = self.persons.get(partition, _mark(SIZES, partition))
        if raw is not None:
            self.sizes[partition] = orjson.loads(raw)
        else:
            sizes: Counter = Counter()
            async with self._counting:
                async for values in self._persons_in_slices(partition):
                    for v in values:
                        sizes.update(orjson.loads(v).get("s", {}).keys())
            self.sizes[partition] = dict(sizes)
        await self.retry(lambda: self._publish_sizes([partition]), f"segment sizes p{partition}", 1)

    async def _publish_sizes(self, partitions: Iterable[int]) -> None:
        """The partitions' segment sizes to the evaluators of rules on them (a gauge: its latest share counts)."""
        out = await self.outbox()
        for p in partitions:
            version = self._version(p)
            for alert in self._gauges:
                size = self.sizes.get(p, {}).get(alert.series.segment, 0)
                out.add(self.topics.alert_series, alert.name.encode(),
                        orjson.dumps(feed_record(alert, f"a{p}", version, {GAUGE: {"v": size}})))
        await out.send()

    def _segment_versions(self) -> dict[str, str]:
        return {s.name: s.version for s in self.metrics.segments}

    async def _reevaluate(self, partition: int) -> None:
        """Every person of the partition evaluated under the current segment definitions, SWEEP_MAX at a time
        through the batch path (O(persons), in the background, once per change of the definitions); then
        the end mark records the versions, so a restart does not do it again."""
        started, start, done = time.monotonic(), b"\x01", 0  # person ids never start with NUL
        versions = self._segment_versions()
        log.info("segments changed on partition %d (%s → %s): evaluating every person", partition,
                 sorted(self.evaluated.get(partition, {}).items()), sorted(versions.items()))
        while True:
            keys = []
            for key, _ in self.persons.scan(partition, b"", start):
                if is_bookkeeping(key):
                    continue
                keys.append(key)
                if len(keys) == SWEEP_MAX:
                    break
            if not keys:
                break
            due = [(partition, {"type": "due", "person": k.decode(), "at": None}) for k in keys]

            async def attempt(due: list = due) -> None:
                async with self._batch:
                    await self._run(due)
            await self.retry(attempt, f"segments evaluation p{partition}", len(due))
            done += len(keys)
            start = keys[-1] + b"\x00"
        self.evaluated[partition] = versions

        async def checkpoint() -> None:
            async with self._batch:
                await self._write_checkpoint(partition)
        await self.retry(checkpoint, f"checkpoint p{partition}", 1)
        log.info("segments on partition %d: %d persons evaluated in %.1fs", partition, done,
                 time.monotonic() - started)

    def _end(self, partition: int) -> dict:
        raw = self.persons.get(partition, _mark(END, partition))
        return orjson.loads(raw) if raw is not None else {}

    def _load(self, partition: int) -> bool:
        """Partials from the checkpoint, if it is whole."""
        end = self._end(partition)
        self.versions[partition] = int(end.get("version", 0))
        self.evaluated[partition] = end.get("segments", {})
        begin = self.persons.get(partition, _mark(BEGIN, partition))
        if "seq" not in end or begin is None or int(begin) != end["seq"]:
            return False
        if end.get("definitions", self._definitions) != self._definitions:
            log.info("definitions changed on partition %d (%s → %s): counting its cells from the person states",
                     partition, end["definitions"], self._definitions)
            return False
        counts: dict[Cell, int] = {}
        prefix = _cell_prefix(partition)
        for key, value in self.persons.scan(partition, prefix):
            cell = parse_cell_id(key[len(prefix):].decode(), self.metrics)
            if cell is not None:
                counts[cell] = int(value)
        zeros = [c for c in (_recorded_cell(z, self.metrics) for z in end.get("zeros", ())) if c is not None]
        self.partials.load(partition, int(end["watermark"]), counts, zeros)
        self.seq[partition] = end["seq"]
        return True

    async def _rebuild(self, partition: int) -> None:
        """Partials counted from the person states: two passes over the partition's states (the open cells
        depend on the newest event time among them), SLICE states at a time with the event loop given back
        in between, one partition at a time (a count is pure CPU: in parallel it would only hold more)."""
        async with self._counting:
            end = self._end(partition)
            watermark = int(end.get("watermark", -1))
            async for values in self._persons_in_slices(partition):
                watermark = max([watermark, *(orjson.loads(v)["n"] for v in values)])
            open_from = self.partials.open_from_of(watermark)
            counts: Counter = Counter()
            async for values in self._persons_in_slices(partition):
                states = (PersonState.from_json(orjson.loads(v), self.metrics) for v in values)
                counts.update(count(states, self.metrics, open_from))
            zeros = [c for c in (_recorded_cell(z, self.metrics) for z in end.get("zeros", ())) if c is not None]
            self.partials.load(partition, watermark, counts, zeros)
            self.seq[partition] = int(end.get("seq", 0))

    async def _persons_in_slices(self, partition: int) -> AsyncIterator[list[bytes]]:
        """The partition's person states, as stored, SLICE at a time; the loop runs between slices."""
        values: list[bytes] = []
        for key, value in self.persons.scan(partition):
            if is_bookkeeping(key):
                continue
            values.append(value)
            if len(values) == SLICE:
                yield values
                values = []
                await asyncio.sleep(0)
        if values:
            yield values

    async def _write_checkpoint(self, partition: int) -> None:
        """A whole checkpoint of the partition's partials as they are (after a rebuild)."""
        outbox = await self.outbox()
        writes = Writes(self.persons, outbox)
        seq = self.seq.get(partition, 0) + 1
        part = self.partials.parts[partition]
        prefix = _cell_prefix(partition)
        writes.put(partition, _mark(BEGIN, partition), str(seq).encode())
        stale = {k for k, _ in self.persons.scan(partition, prefix)}
        for cell, persons in part.counts.items():
            key = prefix + cell_id(cell).encode()
            stale.discard(key)
            writes.put(partition, key, str(persons).encode())
        for key in stale:
            writes.put(partition, key, None)
        announced = self._announced.pop(partition, set())
        for akey in announced:
            writes.put(partition, _audience_prefix(partition) + akey, None)
        zeros = [c for c in part.dirty if not part.counts.get(c)]
        writes.put(partition, _mark(END, partition), self._end_record(partition, part.watermark, zeros, seq))
        try:
            writes.apply(await outbox.send())
        except BaseException:
            self._announced[partition] |= announced
            raise
        self.seq[partition] = seq

    def _end_record(self, partition: int, watermark: int, zeros: Iterable[Cell], seq: int) -> bytes:
        return orjson.dumps({"watermark": watermark, "version": self.versions.get(partition, 0),
                             "zeros": sorted(cell_id(c) for c in zeros), "seq": seq,
                             "segments": self.evaluated.get(partition, {}), "definitions": self._definitions,
                             "histories": sorted(self._histories)})

    # ---- backfill (stages/backfill.py) ----------------------------------------------------------------
    async def _report_switch(self, partition: int, revision: int, new: list[str]) -> None:
        """To the leader partition: this one follows `revision` from now on; `new` conditions need history."""
        out = await self.outbox()
        rec = {"type": "switched", "partition": partition, "revision": revision, "new": new}
        out.add(self.topics.identified, None, orjson.dumps(rec), partition=LEADER)
        await out.send()
        if new:
            log.info("partition %d follows definitions revision %d; new conditions to backfill: %s", partition,
                     revision, ", ".join(new))

    def _book(self) -> Book:
        return Book.from_json(self.persons.get(LEADER, _mark(BACKFILL, LEADER)))

    async def _write_book(self, change: Callable[[Book], Any]) -> Any:
        """Change the leader's book and write it, between batches; what `change` returned."""
        async def attempt() -> Any:
            async with self._batch:
                outbox = await self.outbox()
                writes = Writes(self.persons, outbox)
                book = Book.from_json(writes.get(LEADER, _mark(BACKFILL, LEADER)))
                result = change(book)
                writes.put(LEADER, _mark(BACKFILL, LEADER), book.to_json())
                writes.apply(await outbox.send())
                return result
        return await self.retry(attempt, "backfill book", 1)

    def _backfill_job(self) -> BackfillJob:
        async def partitions() -> int:
            return len((await self.outbox()).partitions(self.topics.identified))

        return BackfillJob(query=lambda sql: self.sink.query(sql), outbox=self.outbox, raw_topic=self.topics.raw,
                           load=self._book, revision=lambda: self.revision,
                           persist=self._write_book, insert=lambda table, rows: self.sink.write(table, rows),
                           metrics=lambda: self.metrics,
                           partitions=partitions, clock=self.clock, page=self.backfill_page,
                           pause=self.backfill_pause)

    def _backfilled(self, part: int, rec: dict, state_of: Callable[[int, bytes], list],
                    watermarks: dict[int, int]) -> None:
        """A stored event for conditions new to the definitions: applied to its person with those only, applied
        before or not (person.apply is idempotent), never judged late (it was counted when it came)."""
        ev, pids = rec["event"], set(rec["pids"])
        matched = [p for p in self.metrics.matching(ev["event"], ev.get("properties") or {}, ev["type"])
                   if p.pid in pids]
        if not matched:  # removed since the job started
            return
        slot = state_of(part, ev["personId"].encode())
        state = slot[1] if slot[1] is not None else PersonState()
        slot[1] = state
        if not state.user and ev["personId"] not in (ev.get("anonymousId"), ev.get("previousId")):
            state.user = True
        apply(state, ev["messageId"], ev["timestamp"], matched, self.metrics,
              active=self.metrics.activity.matches(ev["type"], ev["event"]), properties=ev.get("properties"))
        watermarks[part] = max(watermarks[part], ev["timestamp"])
        obs.BACKFILL_APPLIED.inc()

    # ---- one batch ----------------------------------------------------------------------------------
    async def process(self, records: Sequence[Record]) -> None:
        async with self._batch:
            await self._run([(r.partition, orjson.loads(r.value)) for r in records])

    async def _run(self, batch: list[tuple[int, dict]]) -> None:
        """One batch: events.identified records, or the sweep's {"type": "due"} ones."""
        await self._ready({p for p, _ in batch})
        outbox = await self.outbox()
        writes = Writes(self.persons, outbox)
        touched: dict[tuple[int, bytes], list] = {}  # (partition, key) → [old, new]
        watermarks: dict[int, int] = defaultdict(lambda: -1)

        changed: set[tuple[int, bytes]] = set()  # persons whose history this batch changes (not the sweep's)
        stored: dict[tuple[int, bytes], bytes] = {}  # their values as read: a state unchanged is not written

        def state_of(part: int, key: bytes, history: bool = True) -> list:
            if history:
                changed.add((part, key))
            slot = touched.get((part, key))
            if slot is None:
                raw = writes.get(part, key)
                if raw is not None:
                    stored[(part, key)] = raw
                old = PersonState.from_json(orjson.loads(raw), self.metrics) if raw is not None else None
                new = old.copy() if old is not None else PersonState()
                slot = touched[(part, key)] = [old, new]
            return slot

        rows, handoffs, forgets, ticks, switches = [], [], [], [], []
        for i, (part, rec) in enumerate(batch):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            kind = rec.get("type")
            if kind == "merge":
                slot = state_of(part, rec["from"].encode())
                if slot[1] is not None and slot[1].newest >= 0:
                    handoffs.append({"type": "state", "person": rec["into"], "from": rec["from"],
                                     "messageId": rec["messageId"], "state": slot[1].to_json()})
                slot[1] = None  # forgotten here once the hand-off is acknowledged
            elif kind == "forget":
                slot = state_of(part, rec["person"].encode())  # a fresh slot holds an empty state
                forgets.append((part, rec, slot[1] is not None and slot[1].newest >= 0))
                slot[1] = None
            elif kind == "state":
                slot = state_of(part, rec["person"].encode())
                incoming = PersonState.from_json(rec["state"], self.metrics)
                into = slot[1] if slot[1] is not None else PersonState()
                if incoming.exposures or into.exposures:
                    cut = experiment_history_cut(into, incoming, self.metrics)
                    if cut:
                        obs.EXPERIMENT_HISTORY_CUT.inc()
                        log.warning("hand-off of %s to %s joins an exposure older than the history one side kept "
                                    "(%s): experiment values in that window may be missing", rec["from"],
                                    rec["person"], ", ".join(cut))
                slot[1] = join(into, incoming, self.metrics)
                slot[1].user = True  # a hand-off goes to the user the anonymous id was linked to
                watermarks[part] = max(watermarks[part], slot[1].newest)
            elif kind == "tick":  # a progress marker from the ingest of events.raw partition `from`
                ticks.append((part, rec))
            elif kind == "backfill":
                self._backfilled(part, rec, state_of, watermarks)
            elif kind == "switched":  # on the leader: a partition took up a revision of the definitions
                switches.append(rec)
            elif kind == "due":  # the sweep: a person whose segment memberships may have changed by now
                key = rec["person"].encode()
                slot = state_of(part, key, history=False)
                if rec["at"] is not None and (slot[0] is None or slot[0].due != rec["at"]):  # a stale index key
                    writes.put(part, _due_key(part, rec["at"], key), None)
                if slot[0] is None:
                    slot[1] = None
            else:
                rows.append(self._event(part, rec, state_of, watermarks))

        # A redelivered event can arrive under another person than the one that applied it (its
        # anonymous id got linked in between: the identity stage now keys it by the user, whose state
        # has not joined the anonymous one yet) and look late there. A row already stored as counted
        # proves it was applied to some person, whose state carries it: keep the row counted.
        suspects = [r["message_id"] for r in rows if r["late"]]
        if suspects:
            counted = await self.sink.counted(suspects)
            for r in rows:
                if r["late"] and r["message_id"] in counted:
                    r["late"] = 0

        topics = self.topics
        # 2. hand-offs, acknowledged before the states they leave are forgotten (step 4)
        if handoffs:
            out = await self.outbox()
            for h in handoffs:
                out.add(topics.identified, h["person"].encode(), orjson.dumps(h))
            await out.send()
            obs.PERSON_HANDOFFS.inc(len(handoffs))
        # 3. rows
        await self.sink.write("flywheel.events", rows)
        # segment memberships of every person touched, now (docs/design.md §9)
        audience: dict[int, dict[bytes, list[dict]]] = defaultdict(dict)
        now = self.clock()
        for (part, key), (old, new) in touched.items():
            if (self.metrics.segments or self.metrics.rfm is not None
                    or (old is not None and (old.members or old.due >= 0 or old.rfm_published is not None))):
                self._decide(part, key, old, new, now, writes, audience)
        sized: dict[int, dict[str, int]] = {}  # partitions whose segment sizes change → their new sizes
        if self._gauges:
            for part, pending in audience.items():
                delta: Counter = Counter()
                for akey, recs in pending.items():
                    if akey.startswith(b"segments\x00"):
                        for rec in recs:
                            delta[rec["properties"]["segment"]] += 1 if rec["event"] == AUDIENCE_ENTERED else -1
                if any(delta.values()):
                    sizes = Counter(self.sizes.get(part, {}))
                    sizes.update(delta)
                    sized[part] = {k: v for k, v in sizes.items() if v}
                    writes.put(part, _mark(SIZES, part), orjson.dumps(sized[part]))
        # 4. the partials' change, then the table: begin, states, cells, end — per partition, in order
        by_partition: dict[int, list] = defaultdict(list)
        for (part, key), slot in touched.items():
            by_partition[part].append((key, *slot))
        changes: list[tuple[Change, int]] = []
        for part, persons in by_partition.items():
            delta: Counter = Counter()
            # the sweep changes no history: its persons' contributions stay as they were
            movers = [(old, new) for key, old, new in persons if (part, key) in changed]
            for i in range(0, len(movers), YIELD_EVERY // 10):  # ~50 persons' contributions, twice, per turn
                delta.update(self.partials.delta(part, watermarks[part], movers[i:i + YIELD_EVERY // 10]))
                await asyncio.sleep(0)
            change = self.partials.change(part, watermarks[part], delta)
            seq = self.seq.get(part, 0) + 1
            changes.append((change, seq))
            writes.put(part, _mark(BEGIN, part), str(seq).encode())
            for key, old, new in persons:
                if new is None:
                    if old is not None:
                        writes.put(part, key, None)
                elif (value := orjson.dumps(new.to_json())) != stored.get((part, key)):
                    writes.put(part, key, value)
            prefix = _cell_prefix(part)
            for cell, value in change.values.items():
                writes.put(part, prefix + cell_id(cell).encode(), str(value).encode() if value else None)
            for cell in change.closed:
                writes.put(part, prefix + cell_id(cell).encode(), None)
            prefix = _audience_prefix(part)
            for akey in self._announced.get(part, ()):  # published: no longer needed for a repair
                writes.put(part, prefix + akey, None)
            for akey, recs in audience.get(part, {}).items():
                recs[:0] = self._unannounced.get(part, {}).get(akey, [])
                writes.put(part, prefix + akey, orjson.dumps(recs))
            writes.put(part, _mark(END, part),
                       self._end_record(part, change.watermark, change.unpublished_zeros, seq))
        if switches:
            book = Book.from_json(writes.get(LEADER, _mark(BACKFILL, LEADER)))
            for rec in switches:
                book.report(rec["partition"], rec["revision"], rec["new"])
            writes.put(LEADER, _mark(BACKFILL, LEADER), book.to_json())
        first_open = {c.partition: c.open_from for c, _ in changes}
        corrections: dict[tuple[int, Cell], tuple[int, int]] = {}
        for part, rec, had_state in forgets:
            await self._forgotten(part, rec, outbox, corrections, first_open=first_open.get(part, 0),
                                  had_state=had_state)
        offsets = await outbox.send()
        self.corrections.update(corrections)
        # Kafka holds the batch's states: the store and the partials take them together (no await here).
        writes.apply(offsets)
        for change, seq in changes:
            self.partials.commit(change)
            self.seq[change.partition] = seq
            self._announced.pop(change.partition, None)
        for part, pending in audience.items():
            self._unannounced[part].update(pending)
        self.sizes.update(sized)
        # 5. the changed cells, and the membership changes (with any a failed attempt left)
        await self._publish([change.partition for change, _ in changes])
        await self._announce([p for p, pending in self._unannounced.items() if pending])
        if sized:
            await self._publish_sizes(sized)
        if ticks:
            await self._progress(ticks)

    async def _progress(self, ticks: list[tuple[int, dict]]) -> None:
        """After the batch's cells are out: how far each partition has handled every events.raw partition's
        records — the oldest of their newest markers —, to every alert evaluator partition."""
        of = 0
        for part, rec in ticks:
            seen = self._ticks[part]
            seen[rec["from"]] = max(seen.get(rec["from"], rec["at"]), rec["at"])
            of = rec["of"]
        if not (self._feeds or self._gauges):
            return
        out, sent = await self.outbox(), {}
        for part in {p for p, _ in ticks}:
            seen = self._ticks[part]
            if not all(p in seen for p in range(of)):
                continue  # not yet a marker from every events.raw partition
            through = min(seen[p] for p in range(of))
            if through <= self._through.get(part, -1):
                continue
            marker = orjson.dumps(progress_record("aggregate", part, len(out.partitions(self.topics.identified)),
                                                  through))
            for q in out.partitions(self.topics.alert_series):
                out.add(self.topics.alert_series, None, marker, partition=q)
            sent[part] = through
        if sent:
            await out.send()
            self._through.update(sent)

    def _decide(self, part: int, key: bytes, old: PersonState | None, new: PersonState | None, now: int,
                writes: Writes, audience: dict[int, dict[bytes, list[dict]]]) -> None:
        """A touched person's segment memberships at `now`: its changes (as audience records), its new
        memberships and due time in `new`, and the due index moved along."""
        before = old.members if old is not None else {}
        if new is not None:
            trim(new, self.metrics, now)
        after, changes = decide(before, memberships(new, self.metrics, now), now)
        if new is not None:
            new.members = after
            new.due = next_change(self.metrics.segments, new, now)
        definition = self.metrics.rfm
        if definition is not None or (old is not None and old.rfm_published is not None):
            # the person's RFM summary, published when it changes (a person leaving: frequency 0)
            summary = rfm.summary(new.orders, now, definition.window_ms) if new and definition else None
            if summary != (old.rfm_published if old is not None else None):
                record_ = rfm.summary_record(key.decode(), summary, now, user=(new or old).user)
                audience[part].setdefault(b"rfm\x00" + key, []).append(record_)
            if new is not None:
                new.rfm_published = summary
                if definition is not None:
                    new.due = min((d for d in (new.due, rfm.next_change(new.orders, now, definition.window_ms))
                                   if d >= 0), default=-1)
        old_due, new_due = (old.due if old is not None else -1), (new.due if new is not None else -1)
        if old_due != new_due:
            if old_due >= 0:
                writes.put(part, _due_key(part, old_due, key), None)
            if new_due >= 0:
                writes.put(part, _due_key(part, new_due, key), b"")
        if changes:
            person, user = key.decode(), (new or old).user
            for event, name, version, since in changes:
                key_, rec = audience_record(event, name, version, person, user=user, at=now, since=since)
                audience[part].setdefault(b"segments\x00" + key_, []).append(rec)

    async def _announce(self, partitions: Iterable[int]) -> None:
        """Publish the membership changes still due on these partitions (their states are written)."""
        async with self._publishing:
            due = {p: dict(self._unannounced[p]) for p in partitions if self._unannounced.get(p)}
            if not due:
                return
            out = await self.outbox()
            for pending in due.values():
                for akey, recs in pending.items():
                    field, key = akey.split(b"\x00", 1)
                    for rec in recs:
                        out.add(getattr(self.topics, field.decode()), key, orjson.dumps(rec))
            await out.send()
            for p, pending in due.items():
                for akey, recs in pending.items():
                    if self._unannounced[p].get(akey) is recs:
                        del self._unannounced[p][akey]
                    self._announced[p].add(akey)
                    if akey.startswith(b"segments\x00"):
                        for rec in recs:
                            obs.AUDIENCE_CHANGES.labels(rec["event"]).inc()

    # ---- RFM memberships (the leader) -----------------------------------------------------------------
    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.metrics.rfm.refresh_ms / 1000)
            try:
                await self.refresh_rfm()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ClickHouse unreachable, or not yet holding rfm_values: next time
                log.warning("RFM refresh failed (next in %.0f s): %s", self.metrics.rfm.refresh_ms / 1000, exc)

    async def refresh_rfm(self) -> int:
        """On the leader: score every person in rfm_values at the clock (oracle.rfm_values_sql — global quintiles),
        and publish the changes against the last decision, as Audience Entered / Exited of `rfm_<segment>`;
        the decisions are written (partition LEADER) before they are published, like any change. Returns how
        many persons changed."""
        definition = self.metrics.rfm
        task = self._repairs.get(LEADER)
        if definition is None or task is None or not task.done() or task.cancelled() or task.exception():
            return 0
        now = self.clock()
        rows = await self.sink.query(oracle.rfm_values_sql(now))
        scored = {r[0]: (rfm.grid_segment(int(r[4]), int(r[5])), bool(r[7])) for r in rows}
        async with self._batch:
            prefix = _mark(RFM_DECIDED, LEADER) + b"\x00"
            if self._rfm_decided is None:
                self._rfm_decided = {}
                for key, value in self.persons.scan(LEADER, prefix):
                    segment, version, since = value.decode().split("|")
                    self._rfm_decided[key[len(prefix):].decode()] = (segment, version, int(since))
            decided = dict(self._rfm_decided)
            outbox = await self.outbox()
            writes = Writes(self.persons, outbox)
            audience: dict[bytes, list[dict]] = {}
            changed = 0
            for person in sorted(decided.keys() | scored.keys()):
                before = decided.get(person)
                segment, user = scored.get(person, (None, False))
                if before is not None and (before[0], before[1]) == (segment, definition.version):
                    continue
                changed += 1
                if before is not None:
                    key, rec = audience_record(AUDIENCE_EXITED, f"rfm_{before[0]}", before[1], person, user=user,
                                               at=now, since=before[2])
                    audience.setdefault(b"segments\x00" + key, []).append(rec)
                    del decided[person]
                if segment is not None:
                    key, rec = audience_record(AUDIENCE_ENTERED, f"rfm_{segment}", definition.version, person,
                                               user=user, at=now, since=now)
                    audience.setdefault(b"segments\x00" + key, []).append(rec)
                    decided[person] = (segment, definition.version, now)
                value = decided.get(person)
                writes.put(LEADER, prefix + person.encode(), "|".join(map(str, value)).encode() if value else None)
            if not audience:
                return 0
            pending = _audience_prefix(LEADER)
            for akey, recs in audience.items():
                recs[:0] = self._unannounced.get(LEADER, {}).get(akey, [])
                writes.put(LEADER, pending + akey, orjson.dumps(recs))
            writes.apply(await outbox.send())
            self._rfm_decided = decided
            self._unannounced[LEADER].update(audience)
        await self._announce([LEADER])
        return changed

    # ---- the sweep ----------------------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the retry policy gave up (bad data): logged there; the next sweep tries again
                log.exception("segments sweep failed; the next one in %.0f s tries again", self.sweep_seconds)

    async def sweep(self) -> int:
        """Re-evaluate the persons whose due time has come (the due index, in time order), SWEEP_MAX per
        partition per batch, through the batch path. Returns how many. O(due persons), never O(persons)."""
        total = 0
        for p in sorted(self._repairs):
            task = self._repairs.get(p)
            if task is None or not task.done() or task.cancelled() or task.exception() is not None:
                continue  # a partition under repair is swept next time
            while True:
                prefix = _due_prefix(p)
                limit = prefix + b"%013d\x01" % self.clock()
                due: list[tuple[int, dict]] = []
                for key, _ in self.persons.scan(p, prefix):
                    if key >= limit or len(due) == SWEEP_MAX:
                        break
                    at, person = key[len(prefix):].split(b"\x00", 1)
                    due.append((p, {"type": "due", "person": person.decode(), "at": int(at)}))
                if not due:
                    break

                async def attempt(due: list = due) -> None:
                    async with self._batch:
                        await self._run(due)
                await self.retry(attempt, f"segments sweep p{p}", len(due))
                obs.SEGMENT_SWEPT.inc(len(due))
                total += len(due)
                if len(due) < SWEEP_MAX:
                    break
        return total

    async def _forgotten(self, part: int, rec: dict, outbox: Outbox, corrections: dict, *, first_open: int,
                         had_state: bool) -> None:
        """The rest of a forget request, sent with the batch that deletes the state (docs/design.md §3).

        Open cells lose the person through the partials' delta, like any state change. Closed cells are
        final in ClickHouse and no state explains them any more: the request lists the cells the person
        counted in (the oracle's, over their events), and each one closed here is published again one
        lower, marked with the request. Only when there was a state to delete: a request sent again (the
        command run twice) finds none and corrects nothing twice. A retry of this batch finds its own
        rows (or, not landed yet, computes the same ones again: same value, same version)."""
        cells = [c for c in (parse_cell_id(t, self.metrics) for t in rec.get("cells", ())) if c is not None]
        closed = [c for c in cells if not is_open(c, first_open)] if had_state else []
        corrected = 0
        if closed:
            request = rec["requestId"]
            stored = await self.sink.closed_values(part, closed, request)
            for cell in closed:
                value, version, ours = stored.get(cell, (0, 0, False))
                # this batch's or this worker's last correction of it: the sink may not have it yet
                mine = corrections.get((part, cell)) or self.corrections.get((part, cell))
                if mine is not None and mine[1] > version:
                    value, version = mine
                if ours or value <= 0:
                    continue
                kind, key, published = record(cell, part, value - 1, version + 1, correction=request)
                outbox.add(getattr(self.topics, kind.name), key, orjson.dumps(published))
                corrections[(part, cell)] = (value - 1, version + 1)
                corrected += 1
        if rec.get("primary"):
            outbox.add(self.topics.identity_changes, rec["person"].encode(), orjson.dumps(
                {"type": "forgotten", "person": rec["person"], "ids": rec.get("ids", []),
                 "requestId": rec["requestId"], "timestamp": rec["at"] // 1_000_000}))
            obs.FORGET_REQUESTS.labels("aggregate").inc()
        log.info("forget request %s on events.identified partition %d: %s, %d closed cells corrected",
                 rec["requestId"], part, "state deleted" if had_state else "no state", corrected)

    def _event(self, part: int, rec: dict, state_of: Callable[[int, bytes], list], watermarks: dict[int, int]) -> dict:
        """Apply one event to its person (state_of → its slot [old, new]); its row, with the late flag.
        An event that is no activity and satisfies no condition (an identify, a trait sync) changes no
        metric: it does not touch the state, and is never late."""
        ts, mid, mtype, name = rec["timestamp"], rec["messageId"], rec["type"], rec.get("event", "")
        matched = self.metrics.matching(name, rec.get("properties") or {}, mtype)
        active = self.metrics.activity.matches(mtype, name)
        traits = rec.get("traits") if mtype == "identify" and self.metrics.trait_keys else None
        late = None
        if matched or active or (traits and not self.metrics.trait_keys.isdisjoint(traits)):
            slot = state_of(part, rec["personId"].encode())
            state = slot[1] if slot[1] is not None else PersonState()
            slot[1] = state
            if not state.user and rec["personId"] not in (rec.get("anonymousId"), rec.get("previousId")):
                state.user = True
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
                apply(state, mid, ts, matched, self.metrics, active=active, traits=traits,
                      properties=rec.get("properties"))
                watermarks[part] = max(watermarks[part], ts)
        if late:
            obs.LATE_EVENTS.labels(late).inc()
        rec["late"] = bool(late)
        return event_row(rec)

    # ---- publication --------------------------------------------------------------------------------
    async def _publish(self, partitions: Iterable[int]) -> None:
        """Publish every cell of these partitions still due, with a new version; done once Kafka has them."""
        async with self._publishing:
            due = {p: self.partials.unpublished(p) for p in partitions if p in self.partials.parts}
            due = {p: cells for p, cells in due.items() if cells}
            if not due:
                return
            out = await self.outbox()
            for p, cells in due.items():
                version = self._version(p)
                feeds: dict = defaultdict(lambda: defaultdict(dict))  # alert → period → role → value
                for cell, value in cells:
                    kind, key, rec = record(cell, p, value, version)
                    out.add(getattr(self.topics, kind.name), key, orjson.dumps(rec))
                    obs.PARTIALS_PUBLISHED.labels(kind.name).inc()
                    for alert, role, period in (cell_feeds(self._feeds, cell) if self._feeds else ()):
                        feeds[alert][period][role] = value
                for alert, periods in feeds.items():  # the partition's shares of alert series, to their evaluators
                    out.add(self.topics.alert_series, alert.name.encode(),
                            orjson.dumps(feed_record(alert, f"a{p}", version, periods)))
            await out.send()
            for p, cells in due.items():
                self.partials.published(p, cells)

    def _version(self, partition: int) -> int:
        v = max(time.time_ns(), self.versions.get(partition, 0) + 1)
        self.versions[partition] = v
        return v


def _recorded_cell(item: Any, metrics: Metrics) -> Cell | None:
    """A cell due at 0 as an end mark records it: a cell id, or the first release's tagged list."""
    if isinstance(item, str):
        return parse_cell_id(item, metrics)
    tag, name, a, *b = item
    if tag == "a":
        window = next((w for w in ACTIVE_WINDOWS if w.name == name), None)
        return (window, int(a)) if window else None
    for f in metrics.funnels:
        if tag == "f" and f.name == name:
            return (f, int(a), int(b[0]))
    for r in metrics.retention:
        if tag == "r" and r.name == name:
            return (r, int(a), int(b[0]))
    return None
