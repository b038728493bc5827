"""Backfill: a new condition's history, from ClickHouse into the person states (docs/design.md §13).

A definition that brings a condition (a predicate) no state has history for — a new funnel step, a new
return event, a segment's new `performed` — would count only what arrives after it. The backfill gives
it the events before, exactly once each:

1. **Switch.** Every events.identified partition reports, when it takes up a set of definitions (its
   repair: at assignment, or when the set changes while running), to the leader partition: the revision
   and the predicates new to it since its checkpoint. From then on it applies them to every event; every
   event it applied before is in ClickHouse already (a batch inserts its rows before it is acknowledged).
2. **Read.** Once every partition reported the revision, the leader's owner reads the events of the new
   conditions from flywheel.events (late = 0, within the horizon of the newest event), in pages, and
   sends each to events.raw with the header `flywheel-backfill` (revision, predicates) — keyed as the
   collector keys an event, so the ingest stage resolves its person with the identity table, in order
   with that id's links, and passes it on (nothing validated, deduplicated or counted again).
3. **Apply.** The aggregate stage applies it to its person with only those predicates, whether or not
   the event was applied before: person.apply is idempotent, so an event that also arrived after the
   switch counts once. The partials change through the usual batch path.

Seam: events applied before a partition switched are in ClickHouse before the read starts (step 1), and
events after it are applied live with the new conditions; overlap is harmless (idempotence). A crash
anywhere repeats a page at worst: the job and its cursor are in the leader's table, written after each
page is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from flywheel import observability as obs
from flywheel.metrics.definitions import Metrics
from flywheel.metrics.oracle import quote
from flywheel.model.clock import DAY_MS, from_ms, iso_ms
from flywheel.model.envelope import HEADER_BACKFILL, HEADER_RECEIVED_AT, HEADER_SOURCE

log = logging.getLogger(__name__)

PAGE = 5000  # events per page read and sent
KEEP_DONE = 20  # finished jobs kept in the book (the audit table keeps all)
BACKFILLS = "flywheel.definition_backfills"
_COLUMNS = ("messageId", "type", "event", "anonymousId", "userId", "personId", "previousId", "groupId",
            "timestamp", "receivedAt", "properties", "traits", "context", "source")


@dataclass
class Book:
    """The leader's record of the switches and of the backfill jobs (in its persons table)."""

    switched: dict[int, int] = field(default_factory=dict)  # partition → the revision it reported last
    pending: dict[str, int] = field(default_factory=dict)  # predicate id → revision it came with
    job: dict[str, Any] | None = None  # revision, pids, events, from_ms, cursor, rows, started
    done: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: bytes | None) -> Book:
        if raw is None:
            return cls()
        data = orjson.loads(raw)
        return cls({int(p): int(r) for p, r in data.get("switched", {}).items()}, dict(data.get("pending", {})),
                   data.get("job"), list(data.get("done", ())))

    def to_json(self) -> bytes:
        return orjson.dumps({"switched": {str(p): r for p, r in sorted(self.switched.items())},
                             "pending": self.pending, "job": self.job, "done": self.done[-KEEP_DONE:]})

    def report(self, partition: int, revision: int, new: Iterable[str]) -> None:
        """The last report counts, not the highest: a partition taken over by a worker still on an older
        revision applies that one again (until it catches up and reports anew)."""
        self.switched[partition] = revision
        for pid in new:
            self.pending[pid] = max(revision, self.pending.get(pid, -1))

    def ready(self, partitions: int, revision: int) -> bool:
        """A job can start: conditions wait, every partition follows the revision that brought them, and so
        does the leader itself (`revision`: it must know every condition it reads for)."""
        if self.job is not None or not self.pending:
            return False
        wanted = max(self.pending.values())
        return revision >= wanted and all(self.switched.get(p, -1) >= wanted for p in range(partitions))

    def start(self, metrics: Metrics, *, newest_ms: int, now_ms: int) -> dict[str, Any] | None:
        """The job for what waits (conditions since removed are dropped); None if nothing is left."""
        revision = max(self.pending.values())
        current = {p.pid: p for p in metrics.predicates}
        pids = sorted(pid for pid in self.pending if pid in current)
        self.pending = {}
        if not pids:
            return None
        names = sorted({current[pid].event for pid in pids if current[pid].event is not None})
        anything = any(current[pid].event is None for pid in pids)  # an `any` condition: every activity event
        from_ms = (newest_ms // DAY_MS - metrics.horizon_days) * DAY_MS if newest_ms >= 0 else 0
        self.job = {"revision": revision, "pids": pids, "events": None if anything else names, "from_ms": from_ms,
                    "cursor": None, "rows": 0, "started": now_ms}
        return self.job

    def finish(self, now_ms: int) -> dict[str, Any]:
        job = dict(self.job or {})
        job["finished"] = now_ms
        self.done.append(job)
        self.job = None
        return job


def page_sql(job: dict[str, Any], limit: int = PAGE) -> str:
    """The next page of the job's events: stored as counted (late = 0), no identity call, from its time bound,
    after its cursor, in (time, messageId) order."""
    where = ["late = 0", "type NOT IN ('identify', 'alias')", f"toUnixTimestamp64Milli(timestamp) >= {job['from_ms']}"]
    if job["events"] is not None:
        where.append("event IN (" + ", ".join(quote(n) for n in job["events"]) + ")" if job["events"] else "0")
    if job["cursor"] is not None:
        ts, mid = job["cursor"]
        where.append(f"(toUnixTimestamp64Milli(timestamp), message_id) > ({int(ts)}, {quote(mid)})")
    return f"""
    SELECT message_id, type, event, anonymous_id, user_id, person_id, previous_id, group_id,
           toUnixTimestamp64Milli(timestamp) AS ts, toUnixTimestamp64Milli(received_at), properties, traits,
           context, source
    FROM flywheel.events FINAL
    WHERE {' AND '.join(where)}
    ORDER BY ts, message_id
    LIMIT {limit}"""


def event_of(row: tuple) -> dict[str, Any]:
    """A flywheel.events row → the event as events.identified carries it."""
    ev = dict(zip(_COLUMNS, row, strict=True))
    ev["timestamp"], ev["receivedAt"] = int(ev["timestamp"]), int(ev["receivedAt"])
    for k in ("properties", "traits", "context"):
        ev[k] = orjson.loads(ev[k]) if ev[k] else {}
    for k in ("anonymousId", "userId", "previousId", "groupId"):
        ev[k] = ev[k] or None
    return ev


def raw_key(ev: dict[str, Any]) -> bytes:
    """As the collector keys an event (docs/design.md §1): the partition whose identity table knows its id."""
    return (ev["anonymousId"] or ev["userId"] or ev["personId"]).encode()


def backfill_headers(ev: dict[str, Any], revision: int, pids: list[str]) -> list[tuple[str, bytes]]:
    return [(HEADER_BACKFILL, orjson.dumps({"revision": revision, "pids": pids})),
            (HEADER_SOURCE, ev["source"].encode()), (HEADER_RECEIVED_AT, str(ev["receivedAt"]).encode())]


class BackfillJob:
    """The leader's owner runs the book's job: pages from ClickHouse to events.raw, the cursor written after
    each page landed. `persist(book_update)` writes the book under the stage's batch lock."""

    def __init__(self, *, query: Callable[[str], Awaitable[list]], outbox: Callable[[], Awaitable[Any]],
                 raw_topic: str, load: Callable[[], Book], revision: Callable[[], int],
                 persist: Callable[[Callable[[Book], Any]], Awaitable[Any]],
                 insert: Callable[[str, list[dict]], Awaitable[None]], metrics: Callable[[], Metrics],
                 partitions: Callable[[], Awaitable[int]], clock: Callable[[], int], interval: float = 1.0,
                 page: int = PAGE, pause: float = 0.0):
        self.query = query
        self.outbox = outbox
        self.raw_topic = raw_topic
        self.load = load
        self.revision = revision  # of the definitions the stage follows
        self.persist = persist
        self.insert = insert
        self.metrics = metrics
        self.partitions = partitions
        self.clock = clock
        self.interval = interval
        self.page = page
        self.pause = pause  # seconds between pages

    async def run_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ClickHouse or Kafka away: the job waits where it is
                if not failing:
                    log.warning("backfill waits (next try in %.0f s): %s", self.interval, exc)
                failing = True
            else:
                if failing:
                    log.info("backfill goes on")
                failing = False

    async def step(self) -> bool:
        """Start a job if one is ready, then run the job there is to its end. Whether there was one."""
        book = self.load()
        if book.job is None:
            if not book.pending:  # the common case, every second: nothing to ask Kafka
                return False
            partitions = await self.partitions()
            if not book.ready(partitions, self.revision()):
                return False
            rows = await self.query("SELECT toUnixTimestamp64Milli(max(timestamp)), count() FROM flywheel.events")
            newest = int(rows[0][0]) if rows and rows[0][1] else -1
            job = await self.persist(lambda b: b.start(self.metrics(), newest_ms=newest, now_ms=self.clock())
                                     if b.ready(partitions, self.revision()) else b.job)
            if job is None:
                return False
            log.info("backfill of revision %d starts: conditions %s, events %s from %s", job["revision"],
                     ", ".join(job["pids"]), "any" if job["events"] is None else ", ".join(job["events"]),
                     iso_ms(job["from_ms"]))
        job = self.load().job
        if job is None:
            return False
        while True:
            page = await self.query(page_sql(job, self.page))
            if not page:
                break
            out = await self.outbox()
            for row in page:
                ev = event_of(row)
                out.add(self.raw_topic, raw_key(ev), orjson.dumps(ev),
                        headers=backfill_headers(ev, job["revision"], job["pids"]))
            await out.send()
            last = event_of(page[-1])
            cursor, rows = [last["timestamp"], last["messageId"]], len(page)
            obs.BACKFILL_EVENTS.inc(rows)

            def advance(b: Book, cursor: list = cursor, rows: int = rows) -> dict | None:
                if b.job is not None:
                    b.job["cursor"] = cursor
                    b.job["rows"] += rows
                return b.job
            job = await self.persist(advance)
            if job is None:  # finished by another owner of the leader meanwhile
                return True
            if self.pause:
                await asyncio.sleep(self.pause)
        finished = self.clock()
        # the row first (one per job: a crash before the book says finished writes the same row again)
        await self.insert(BACKFILLS, [{"revision": job["revision"], "predicates": job["pids"], "events": job["rows"],
                                       "started": from_ms(job["started"]), "finished": from_ms(finished)}])
        await self.persist(lambda b: b.finish(finished))
        log.info("backfill of revision %d done: %d events sent to their persons", job["revision"], job["rows"])
        return True
