"""Ingest, a batch of events.raw records at a time: validate → dedup → identity → outputs (DESIGN §1–3).

The worker hands over a batch of raw records as fetched (batches.py) and `Ingest.handle` treats it in one pass:
the pure stages (validate.py, identity.py) decide each record's outputs, the dedup and identity tables
are read and written per record, and every output — events.identified, events.invalid,
identity.changes, merge markers and the tables' changelog records — is appended in order to one Kafka
record batch per topic-partition (outbox.py), sent together and awaited. The batch's records are acked
only after `handle` returned (batches.py), so offsets never pass a record whose outputs, and table
changes, are not yet acknowledged by Kafka (the producer's acks=all).

Order: a batch holds each partition's records in offset order and they are handled in that order;
outputs are appended in the same order to one record batch per partition, and a batch's outputs are
acknowledged before the next batch's are sent. So per-key order on events.identified holds: the merge
marker of an anonymous id follows all of that id's earlier events.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from flywheel import identity
from flywheel import observability as obs
from flywheel.batches import enter_partition
from flywheel.config import Topics
from flywheel.outbox import Outbox, changelog, put, remember_offsets
from flywheel.plan import TrackingPlan
from flywheel.validate import Invalid, Limits, Raw, validate

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from faust.types import Message, TableT

log = logging.getLogger(__name__)

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

    async def handle(self, messages: Sequence[Message], producer: AIOKafkaProducer) -> None:
        """Process a batch; return only once all of its outputs are in Kafka. If that fails, the caller
        (batches.py) retries the batch, as a redelivery would be: the tables recognise its records."""
        names = self.topics
        outbox = await Outbox.for_topics(producer, (names.identified, names.invalid, names.identity_changes))
        counts: Counter[tuple[Any, str | None]] = Counter()
        for message in messages:
            enter_partition(message.partition)  # the table stores of the record's partition
            self._one(message, outbox, counts)
        remember_offsets((self.first_seen, self.linked_users), await outbox.send())
        for (metric, source), n in counts.items():  # once, for the attempt that landed
            (metric.labels(source) if source is not None else metric).inc(n)

    def _one(self, message: Message, outbox: Outbox, counts: Counter) -> None:
        names = self.topics
        raw = raw_from_message(message, topic=names.raw)
        counts[obs.RECEIVED, raw.source] += 1
        outcome = validate(raw, self.plan, self.limits)
        if isinstance(outcome, Invalid):
            counts[obs.INVALID, raw.source] += 1
            outbox.add(names.invalid, message.key, orjson.dumps(outcome.dlq_record()))
            return
        counts[obs.VALID, raw.source] += 1
        ev = outcome.event
        mid = ev["messageId"].encode()
        here = raw.origin.encode()
        seen = self.first_seen.data.get(mid)  # the store itself: Table.get looks the key up twice
        if seen is None:
            put(self.first_seen, mid, here, message.partition, outbox)
        elif seen != here:
            counts[obs.DUPLICATES, raw.source] += 1
            return
        else:  # this very record again (a redelivery, or a retried batch): its changelog record may not have landed
            outbox.add(changelog(self.first_seen), mid, here, partition=message.partition)
        self._resolve_identity(ev, raw, outbox, counts)
        outbox.add(names.identified, ev["personId"].encode(), orjson.dumps(ev))

    def _resolve_identity(self, ev: dict, raw: Raw, outbox: Outbox, counts: Counter) -> None:
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
            put(self.linked_users, anon.encode(), f"{user}\x00{raw.origin}".encode(), raw.partition, outbox)
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
