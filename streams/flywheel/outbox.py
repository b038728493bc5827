"""A batch's records for Kafka, one record batch per topic-partition, sent together and awaited.

Used by every stage that writes Kafka on the hot path (ingest.py, aggregates.py), for its outputs and
for its tables' changelogs: per record, `Topic.send` and each Faust table write's changelog send go
through Faust's publish path (its producer buffer, sensors, a coroutine each) and aiokafka's
per-message `send` — about a third of the worker's CPU in the pipeline bench's profile when ingest
still sent that way.

Tables: `put` writes the store of the record's partition (as Faust's Table does) and add the
changelog record, on that same partition, to the outbox; once the outbox is acknowledged,
`remember_offsets` tells the stores which changelog offset they hold — what Faust does when a
changelog record is acknowledged — so a restart replays a RocksDB store's changelog only from there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from faust.types import TP

from flywheel.collector.committer import partition_for

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder
    from faust.types import TableT


class Outbox:
    """Records for Kafka, appended in order to one record batch per topic-partition, sent together.

    Without an explicit partition, a record goes where Faust's (aiokafka's) default partitioner would
    put it (murmur2 of the key), so a key lands on the same partition whoever produces it."""

    def __init__(self, producer: AIOKafkaProducer, partitions: Mapping[str, Sequence[int]]):
        self._producer = producer
        self._partitions = partitions
        self._batches: dict[tuple[str, int], list[BatchBuilder]] = {}

    def add(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int | None = None) -> None:
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

    @classmethod
    async def for_topics(cls, producer: AIOKafkaProducer, topics: Iterable[str]) -> Outbox:
        return cls(producer, {topic: sorted(await producer.partitions_for(topic)) for topic in topics})


def changelog(table: TableT) -> str:
    return table.changelog_topic.get_topic_name()


def put(table: TableT, key: bytes, value: bytes, partition: int, outbox: Outbox) -> None:
    """`table[key] = value` as Faust's Table does it, in the store of the current partition
    (batches.enter_partition), with the changelog record in the outbox instead of Faust's producer."""
    table.data[key] = value
    outbox.add(changelog(table), key, value, partition=partition)


def remember_offsets(tables: Iterable[TableT], last_offsets: Mapping[tuple[str, int], int]) -> None:
    """After the outbox landed: each RocksDB store remembers the changelog offset it holds."""
    for table in tables:
        name = changelog(table)
        for (topic, partition), offset in last_offsets.items():
            if topic == name:
                table.data.set_persisted_offset(TP(topic, partition), offset)
