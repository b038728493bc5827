"""Ingest, a batch of events.raw records at a time: validate → dedup → identity → outputs (docs/design.md §1–3).

The worker hands over a batch of raw records as fetched (runtime/delivery.py) and `Ingest.handle` treats it
in one pass: the pure model (model/validate.py, model/identity.py) decides each record's outputs, the
dedup and identity tables are read and written per record (stages/tables.py), and every output —
events.identified, events.invalid, identity.changes, merge markers and the tables' changelog records —
is appended in order to one outbox, sent together and awaited. The batch's records are acked only after
`handle` returned, so offsets never pass a record whose outputs, and table changes, are not yet
acknowledged by Kafka (the producer's acks=all).

Order: a batch holds each partition's records in offset order and they are handled in that order;
outputs are appended in the same order to one record batch per partition, and a batch's outputs are
acknowledged before the next batch's are sent. So per-key order on events.identified holds: the merge
marker of an anonymous id follows all of that id's earlier events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from flywheel import observability as obs
from flywheel.config import Topics
from flywheel.metrics.alerts import Counting, Tally, progress_record
from flywheel.metrics.definitions import Alert
from flywheel.model import identity
from flywheel.model.clock import DAY_MS, to_ms
from flywheel.model.envelope import Limits
from flywheel.model.plan import TrackingPlan
from flywheel.model.validate import Invalid, Raw, validate
from flywheel.stages.dedup import Dedup, DedupBatch
from flywheel.stages.ports import Outbox, Record, Table
from flywheel.stages.tables import Writes

log = logging.getLogger(__name__)

YIELD_EVERY = 500  # records between two turns of the event loop (~10 ms)
REPLAY = b"\x00replay\x00"  # + origin of a replayed DLQ record, in first_seen beside the messageIds (no expiry)
TALLY = b"\x00alert\x00"  # + partition + NUL + rule: its counts on the partition (metrics/alerts.py Tally)


class Ingest:
    """The ingest stage over a batch of events.raw records, with the dedup and identity tables.

    Tables (changelog-backed, co-partitioned with events.raw):
    - `first_seen`: messageId → origin (topic/partition@offset) of the raw record that first carried it,
      for `dedup_horizon_days` of arrival time (stages/dedup.py). An SDK retry (same messageId, another
      record) is dropped; a redelivery of that record itself (after a crash) is forwarded again and
      collapses downstream. Also: a replayed DLQ record that passed → its origin, under REPLAY + the
      origin of the record first rejected.
    - `linked_users`: anonymous id → b"<user>\\x00<origin of the linking record>" (identity.resolve).

    Alert rules on event counts and invalid rates (docs/design.md §10) are counted here, where each record is
    judged once: per rule and partition a `Tally` in first_seen, written with the batch, and the changed
    periods' counts sent to alerts.series. A tally remembers the last offset it counted, so a redelivered
    record is not counted twice.
    """

    def __init__(self, *, plan: TrackingPlan, limits: Limits, topics: Topics, first_seen: Table,
                 linked_users: Table, outbox: Callable[[], Awaitable[Outbox]], dedup_horizon_days: int = 7,
                 clock: Callable[[], float] = time.time, alerts: Sequence[Alert] = ()):
        self.plan = plan
        self.limits = limits
        self.topics = topics
        self.first_seen = first_seen
        self.dedup = Dedup(first_seen, dedup_horizon_days)
        self.clock = clock
        self._arrival_cap = 0
        self.linked_users = linked_users
        self.outbox = outbox
        self.counted = Counting(alerts)
        self._next_counted: Counting | None = None  # rules changed while running: from the next batch on
        self._republished: set[int] = set()  # partitions whose tallies were sent again since the start

    def use(self, alerts: Sequence[Alert]) -> None:
        """Other alert rules, while running: from the next batch on (a batch counts under one set)."""
        self._next_counted = Counting(alerts)

    async def handle(self, records: Sequence[Record]) -> None:
        """Process a batch; return only once all of its outputs are in Kafka. If that fails, the batch is
        retried from the tables as they were before it (stages/tables.py)."""
        if self._next_counted is not None:
            self.counted, self._next_counted, self._republished = self._next_counted, None, set()
        outbox = await self.outbox()
        first_seen, linked = Writes(self.first_seen, outbox), Writes(self.linked_users, outbox)
        dedup = self.dedup.batch(first_seen)
        # receivedAt is the producer's clock (the collector's, a service's): one set days ahead must not
        # expire the dedup table's live generations. Arrivals count at most a day past our own clock.
        self._arrival_cap = int(self.clock() * 1000) + DAY_MS
        counts: Counter[tuple[Any, str | None]] = Counter()
        tallies: dict[tuple[int, Alert], Tally] = {}
        ticks: dict[int, int] = {}  # partition → the newest progress marker handled
        if self.counted:
            for p in {r.partition for r in records} - self._republished:
                # once per partition after a start: a crash may have cut a batch's shares short of Kafka
                for alert in self.counted.alerts:
                    tally = self._tally(first_seen, tallies, p, alert)
                    tally.changed.update(tally.periods)
        for i, record in enumerate(records):
            if i % YIELD_EVERY == YIELD_EVERY - 1:  # the collector and /health share the event loop
                await asyncio.sleep(0)
            self._one(record, outbox, first_seen, dedup, linked, counts, tallies, ticks)
        for (p, alert), tally in tallies.items():
            if tally.changed:
                first_seen.put(p, TALLY + b"%d\x00" % p + alert.name.encode(), orjson.dumps(tally.to_json()))
                outbox.add(self.topics.alert_series, alert.name.encode(), orjson.dumps(tally.share(f"i{p}")))
        if ticks and self.counted:  # after the counts, on every evaluator partition: periods may close
            of = len(outbox.partitions(self.topics.raw))
            for p, at in ticks.items():
                marker = orjson.dumps(progress_record("ingest", p, of, at))
                for q in outbox.partitions(self.topics.alert_series):
                    outbox.add(self.topics.alert_series, None, marker, partition=q)
        dedup.finish()
        offsets = await outbox.send()
        first_seen.apply(offsets)
        linked.apply(offsets)
        dedup.landed()
        self._republished.update(p for p, _ in tallies)
        for (metric, source), n in counts.items():  # once, for the attempt that landed
            (metric.labels(source) if source is not None else metric).inc(n)

    def _tally(self, first_seen: Writes, tallies: dict, partition: int, alert: Alert) -> Tally:
        raw = first_seen.get(partition, TALLY + b"%d\x00" % partition + alert.name.encode())
        tally = tallies[(partition, alert)] = Tally(alert, orjson.loads(raw) if raw else None)
        return tally

    def _count(self, record: Record, first_seen: Writes, tallies: dict, rules: tuple[Alert, ...], event_ms: int,
               received_ms: int, invalid: bool) -> None:
        """A record into the tallies of the counted rules it feeds."""
        p = record.partition
        for alert in rules:
            tally = tallies.get((p, alert)) or self._tally(first_seen, tallies, p, alert)
            tally.count(record.offset, event_ms, received_ms, invalid)

    def _tick(self, raw: Raw, outbox: Outbox, ticks: dict[int, int]) -> None:
        """A progress marker: every record before it on this partition is handled. Passed on to every
        events.identified partition (behind this partition's events there), for the aggregate stage."""
        of = len(outbox.partitions(self.topics.raw))
        marker = orjson.dumps({"type": "tick", "from": raw.partition, "of": of, "at": raw.tick})
        for q in outbox.partitions(self.topics.identified):
            outbox.add(self.topics.identified, None, marker, partition=q)
        ticks[raw.partition] = max(ticks.get(raw.partition, raw.tick), raw.tick)

    def _one(self, record: Record, outbox: Outbox, first_seen: Writes, dedup: DedupBatch, linked: Writes,
             counts: Counter, tallies: dict, ticks: dict[int, int]) -> None:
        names = self.topics
        raw = Raw.from_record(record, topic=names.raw)
        if raw.tick is not None:
            self._tick(raw, outbox, ticks)
            return
        if raw.backfill:
            self._backfill(raw, outbox, linked)
            return
        dedup.arrived(record.partition, min(to_ms(raw.received_at), self._arrival_cap))
        if raw.forget:
            self._forget(raw, dedup, linked, counts)
            return
        counts[obs.RECEIVED, raw.source] += 1
        if raw.replay_of:
            counts[obs.REPLAYED, raw.source] += 1
        outcome = validate(raw, self.plan, self.limits)
        if isinstance(outcome, Invalid):
            counts[obs.INVALID, raw.source] += 1
            outbox.add(names.invalid, record.key, orjson.dumps(outcome.dlq_record()))
            if self.counted:
                received = to_ms(raw.received_at)
                self._count(record, first_seen, tallies, self.counted.invalid(raw.source), received, received, True)
            return
        counts[obs.VALID, raw.source] += 1
        ev = outcome.event
        mid = ev["messageId"].encode()
        here = raw.origin.encode()
        key, seen = dedup.seen(record.partition, mid)
        if seen is not None and seen != here:
            counts[obs.DUPLICATES, raw.source] += 1
            return
        if raw.replay_of:
            # A DLQ record replayed: once it passed, it passed for good — a replay run twice counts once, also
            # after its messageId left the dedup table. (Rejected again, it may be replayed again.)
            replayed = REPLAY + raw.replay_of.encode()
            first = first_seen.get(record.partition, replayed)
            if first is not None and first != here:
                counts[obs.DUPLICATES, raw.source] += 1
                return
            first_seen.put(record.partition, replayed, here)
        # First seen here — or this very record again (a redelivery): its changelog record may not have landed.
        dedup.remember(record.partition, key, here)
        if self.counted:
            self._count(record, first_seen, tallies, self.counted.valid(ev["event"], raw.source), ev["timestamp"],
                        ev["receivedAt"], False)
        self._resolve_identity(ev, raw, outbox, linked, counts)
        outbox.add(names.identified, ev["personId"].encode(), orjson.dumps(ev))

    def _backfill(self, raw: Raw, outbox: Outbox, linked: Writes) -> None:
        """A stored event sent back for new conditions (stages/backfill.py): to the person its ids resolve to
        now — the user an anonymous id was linked to since, read from the identity table, which this record's
        key (the anonymous id) puts on this partition, in order with that id's links. Validated, deduplicated
        and counted when it first came: none of it again, and it links nothing."""
        ev = orjson.loads(raw.value)
        if not ev.get("userId") and ev.get("anonymousId"):
            entry = linked.get(raw.partition, ev["anonymousId"].encode())
            ev["personId"] = entry.decode().partition("\x00")[0] if entry is not None else ev["anonymousId"]
        job = orjson.loads(raw.backfill)
        record = {"type": "backfill", "revision": job["revision"], "pids": job["pids"], "event": ev}
        outbox.add(self.topics.identified, ev["personId"].encode(), orjson.dumps(record))

    def _forget(self, raw: Raw, dedup: DedupBatch, linked: Writes, counts: Counter) -> None:
        """A forget request (flywheel persons forget; docs/design.md §3) for the ids and messageIds of one
        person kept on this partition: their links (only those to this person: an anonymous id another user
        holds stays theirs) and their dedup entries go, with changelog tombstones. Not an event: not
        counted, nothing forwarded. Logged by request id only — the ids are what is being erased."""
        try:
            request = orjson.loads(raw.value)
            person = request["person"].encode()
            ids = [i.encode() for i in request.get("ids", ())]
            message_ids = [m.encode() for m in request.get("messageIds", ())]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("forget request %s at %s is malformed: skipped (send it again with flywheel persons "
                        "forget)", raw.forget, raw.origin)
            return
        links = 0
        for anon in ids:
            entry = linked.get(raw.partition, anon)
            if entry is not None and entry.partition(b"\x00")[0] == person:
                linked.put(raw.partition, anon, None)
                links += 1
        entries = sum(dedup.forget(raw.partition, m) for m in message_ids)
        counts[obs.FORGET_REQUESTS, "ingest"] += 1
        log.info("forget request %s: %d links and %d dedup entries deleted on events.raw partition %d",
                 raw.forget, links, entries, raw.partition)

    def _resolve_identity(self, ev: dict, raw: Raw, outbox: Outbox, linked: Writes, counts: Counter) -> None:
        """Set ev["personId"]; record a first link (identity.changes + the merge marker) or a conflict."""
        names = self.topics
        pair = identity.linked_ids(ev)
        lookup = pair[0] if pair else ("" if ev["userId"] else ev["anonymousId"] or ev["previousId"])
        entry = linked.get(raw.partition, lookup.encode()) if lookup else None
        # Table value: b"<user>\x00<origin of the linking record>".
        linked_user, _, linked_by = entry.decode().partition("\x00") if entry is not None else (None, "", None)
        result = identity.resolve(ev, linked_user, linked_by=linked_by, origin=raw.origin)
        ev["personId"] = result.person_id
        if result.link is not None:
            anon, user = result.link.anonymous_id, result.link.user_id
            linked.put(raw.partition, anon.encode(), f"{user}\x00{raw.origin}".encode())
            counts[obs.IDENTITY_LINKS, None] += 1
            change = {"type": "link", "anonymousId": anon, "userId": user,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            outbox.add(names.identity_changes, anon.encode(), orjson.dumps(change))
            # Keyed by the anonymous id: it follows all of that id's earlier events on its partition
            # of events.identified, so their owner hands the state over only after applying them.
            marker = {"type": "merge", "from": anon, "into": user,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            outbox.add(names.identified, anon.encode(), orjson.dumps(marker))
        elif result.conflict is not None:
            c = result.conflict
            counts[obs.IDENTITY_CONFLICTS, raw.source] += 1
            log.info("identity conflict: %s stays with %s, refused %s (messageId %s)",
                     c.anonymous_id, c.linked_to, c.refused, ev["messageId"])
            change = {"type": "conflict", "anonymousId": c.anonymous_id, "linkedTo": c.linked_to,
                      "refused": c.refused, "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            outbox.add(names.identity_changes, c.anonymous_id.encode(), orjson.dumps(change))
