"""Ingest, a batch of events.raw records at a time: validate → dedup → identity → outputs (DESIGN §1–3).

The agent takes a batch of raw records (`stream.take_events`) and `Ingest.handle` treats it in one pass:
the pure stages (validate.py, identity.py) decide each record's outputs, the dedup and identity tables
are read and written per record, and every output — events.identified, events.invalid,
identity.changes, merge markers and the tables' changelog records — is appended in order to one Kafka
record batch per topic-partition (`Outbox`), sent together and awaited. Faust acks a take batch's
records only when the agent asks for the next batch (faust/streams.py `take_events`: the acks sit in
the `finally` after the `yield`), so offsets never pass a record whose outputs, and table changes,
are not yet acknowledged by Kafka (the producer's acks=all).

Why: per record, `Topic.send` and each table write's changelog send went through Faust's publish path
(its producer buffer, sensors, a coroutine each) and aiokafka's per-message `send` — about a third of
the worker's CPU in the bench profile (bench/pipeline.py).

Order: a batch holds each partition's records in offset order and they are handled in that order;
outputs are appended in the same order to one record batch per partition, and a batch's outputs are
acknowledged before the next batch's are sent. So per-key order on events.identified holds: the merge
marker of an anonymous id follows all of that id's earlier events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from faust.streams import _current_event
from faust.types import TP

from flywheel import identity
from flywheel import observability as obs
from flywheel.collector.committer import partition_for
from flywheel.config import Topics
from flywheel.plan import TrackingPlan
from flywheel.validate import Invalid, Limits, Raw, validate

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder
    from faust.types import EventT, TableT

log = logging.getLogger(__name__)

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STOP_GRACE_SECONDS = 30.0  # a stopping agent waits this long for its batch's outputs

HEADER_SOURCE = "flywheel-source"
HEADER_RECEIVED_AT = "flywheel-received-at"  # epoch ms, stamped by the collector / producer


def raw_from_message(message, *, topic: str) -> Raw:
    """Where a raw record came from: source and receivedAt from headers, else the Kafka timestamp."""
    headers = dict(message.headers or ())
    source = headers.get(HEADER_SOURCE, b"kafka").decode("utf-8", "replace")
    stamped = headers.get(HEADER_RECEIVED_AT)
    try:
        received_ms = int(stamped) if stamped is not None else int(message.timestamp * 1000)
    except ValueError:
        received_ms = int(message.timestamp * 1000)
    return Raw(
        value=message.value if isinstance(message.value, bytes) else bytes(message.value or b""),
        source=source,
        received_at=datetime.fromtimestamp(received_ms / 1000, tz=UTC),
        topic=topic, partition=message.partition, offset=message.offset,
    )


class Outbox:
    """Records for Kafka, appended in order to one record batch per topic-partition, sent together.

    Without an explicit partition, a record goes where Faust's (aiokafka's) default partitioner would
    put it (murmur2 of the key), so a key lands on the same partition whoever produces it."""

    def __init__(self, producer: AIOKafkaProducer, partitions: Mapping[str, Sequence[int]]):
        self._producer = producer
        self._partitions = partitions
        self._batches: dict[tuple[str, int], list[BatchBuilder]] = {}

    def add(self, topic: str, key: bytes | None, value: bytes, *, partition: int | None = None) -> None:
        if partition is None:
            partition = partition_for(key, self._partitions[topic])
        builders = self._batches.get((topic, partition))
        if builders is None:
            builders = self._batches[(topic, partition)] = [self._producer.create_batch()]
        if builders[-1].append(key=key, value=value, timestamp=None) is None:  # full: start the next one
            builders.append(self._producer.create_batch())
            builders[-1].append(key=key, value=value, timestamp=None)  # a batch's first record always fits

    async def send(self) -> dict[tuple[str, int], int]:
        """Send every batch; return once Kafka has acknowledged all of them (the producer's acks=all),
        with the offset of the last record written to each topic-partition. A partition's batches go
        in order (aiokafka queues each behind the previous one)."""
        sent: list[tuple[tuple[str, int], BatchBuilder, asyncio.Future]] = []
        rounds = max((len(b) for b in self._batches.values()), default=0)
        for i in range(rounds):  # first batch of every partition, then the second ones, …
            for (topic, partition), builders in self._batches.items():
                if i < len(builders):
                    builders[i].close()  # complete: no linger, nothing else appended
                    future = await self._producer.send_batch(builders[i], topic, partition=partition)
                    sent.append(((topic, partition), builders[i], future))
        self._batches.clear()
        results = await asyncio.gather(*(future for _, _, future in sent))
        return {tp: meta.offset + builder.record_count() - 1
                for (tp, builder, _), meta in zip(sent, results, strict=True)}


class Ingest:
    """The ingest stage over a batch of events.raw records, with the dedup and identity tables.

    Tables (changelog-backed, co-partitioned with events.raw):
    - `first_seen`: messageId → origin (topic/partition@offset) of the raw record that first carried it.
      An SDK retry (same messageId, another record) is dropped; a redelivery of that record itself
      (after a crash) is forwarded again and collapses downstream.
    - `linked_users`: anonymous id → b"<user>\\x00<origin of the linking record>" (identity.resolve).
    """

    def __init__(self, *, plan: TrackingPlan, limits: Limits, topics: Topics, first_seen: TableT,
                 linked_users: TableT):
        self.plan = plan
        self.limits = limits
        self.topics = topics
        self.first_seen = first_seen
        self.linked_users = linked_users

    async def handle(self, events: Sequence[EventT], producer: AIOKafkaProducer) -> None:
        """Process a batch; return only once all of its outputs are in Kafka.

        If that fails (Kafka unreachable past the producer's own retries), the batch is processed again
        after a back-off, as a redelivery would be (the tables recognise the records that wrote them),
        for as long as it takes: Faust would ack the records if this raised (take_events acks in a
        `finally`), and the next commit would pass them."""
        backoff = FIRST_BACKOFF_SECONDS
        attempt = 0
        while True:
            work = asyncio.ensure_future(self._handle(events, producer))
            try:
                await asyncio.shield(work)
                if attempt:
                    log.warning("ingest batch of %d records done after %d failed attempts", len(events), attempt)
                return
            except asyncio.CancelledError:
                # The agent is stopping (shutdown, rebalance) and Faust acks the batch's records as it
                # unwinds: let the outputs reach Kafka first, within reason.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(work), STOP_GRACE_SECONDS)
                raise
            except Exception as exc:  # Kafka errors mostly; retried like a redelivery, never acked unsent
                attempt += 1
                log.error("ingest batch of %d records failed (attempt %d, retrying in %.1fs; its partitions "
                          "wait): %r", len(events), attempt, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _handle(self, events: Sequence[EventT], producer: AIOKafkaProducer) -> None:
        names = self.topics
        outbox = Outbox(producer, {
            topic: sorted(await producer.partitions_for(topic))
            for topic in (names.identified, names.invalid, names.identity_changes)
        })
        counts: Counter[tuple[Any, str | None]] = Counter()
        try:
            for event in events:
                # Faust stores pick the partition (the RocksDB instance) from the current event; in a take
                # batch the agent's task has none, so set each record's.
                _current_event.set(weakref.ref(event))
                self._one(event, outbox, counts)
        finally:
            _current_event.set(None)
        last_offsets = await outbox.send()
        # What Faust's Table does when a changelog record is acknowledged: a RocksDB store remembers the
        # changelog offset it holds, so a restart replays the changelog only from there.
        for table in (self.first_seen, self.linked_users):
            changelog = table.changelog_topic.get_topic_name()
            for (topic, partition), offset in last_offsets.items():
                if topic == changelog:
                    table.data.set_persisted_offset(TP(topic, partition), offset)
        for (metric, source), n in counts.items():  # once, for the attempt that landed
            (metric.labels(source) if source is not None else metric).inc(n)

    @staticmethod
    def _put(table: TableT, key: bytes, value: bytes, event: EventT, outbox: Outbox) -> None:
        """`table[key] = value` as Faust's Table does it — the store of the record's partition, and a
        changelog record on that same partition — but with the changelog record in the batch's outbox:
        Faust sends each one through its producer buffer, one coroutine per write."""
        table.data[key] = value
        outbox.add(table.changelog_topic.get_topic_name(), key, value, partition=event.message.partition)

    def _one(self, event: EventT, outbox: Outbox, counts: Counter) -> None:
        names = self.topics
        raw = raw_from_message(event.message, topic=names.raw)
        counts[obs.RECEIVED, raw.source] += 1
        outcome = validate(raw, self.plan, self.limits)
        if isinstance(outcome, Invalid):
            counts[obs.INVALID, raw.source] += 1
            outbox.add(names.invalid, event.message.key, orjson.dumps(outcome.dlq_record()))
            return
        counts[obs.VALID, raw.source] += 1
        ev = outcome.event
        mid = ev["messageId"].encode()
        here = raw.origin.encode()
        seen = self.first_seen.data.get(mid)  # the store itself: Table.get looks the key up twice
        if seen is None:
            self._put(self.first_seen, mid, here, event, outbox)
        elif seen != here:
            counts[obs.DUPLICATES, raw.source] += 1
            return
        self._resolve_identity(ev, raw, event, outbox, counts)
        outbox.add(names.identified, ev["personId"].encode(), orjson.dumps(ev))

    def _resolve_identity(self, ev: dict, raw: Raw, event: EventT, outbox: Outbox, counts: Counter) -> None:
        """Set ev["personId"]; record a first link (identity.changes + the merge marker) or a conflict."""
        names = self.topics
        pair = identity.linked_ids(ev)
        lookup = pair[0] if pair else ("" if ev["userId"] else ev["anonymousId"] or ev["previousId"])
        entry = self.linked_users.data.get(lookup.encode()) if lookup else None
        # Table value: b"<user>\x00<origin of the linking record>".
        linked_user, _, linked_by = entry.decode().partition("\x00") if entry is not None else (None, "", None)
        result = identity.resolve(ev, linked_user, linked_by=linked_by, origin=raw.origin)
        ev["personId"] = result.person_id
        if result.link is not None:
            anon, user = result.link.anonymous_id, result.link.user_id
            self._put(self.linked_users, anon.encode(), f"{user}\x00{raw.origin}".encode(), event, outbox)
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
