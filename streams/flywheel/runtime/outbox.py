"""Records for Kafka, appended to aiokafka record batches per topic-partition and sent together.

Every stage writes Kafka through one (its outputs and its tables' changelog records), and so does the
collector, inside a transaction: per record, aiokafka's `send` (a coroutine, a metadata check and an
accumulator lookup each) and Faust's publish path cost most of a worker's CPU when records went that
way one by one.

Order. A topic-partition's records go in the order they were added. With `ordered` sends (the default),
a partition's second record batch is sent only once its first is acknowledged, so if a record landed,
every record added before it to the same partition landed too — what the aggregate stage's checkpoint
relies on (stages/aggregate.py). A failure fails `send` as a whole; the stage's batch is retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from flywheel.runtime.partitioner import partition_for

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder

Headers = Sequence[tuple[str, bytes]]


class Outbox:
    def __init__(self, producer: AIOKafkaProducer, partitions: Mapping[str, Sequence[int]]):
        self._producer = producer
        self._partitions = partitions
        self._batches: dict[tuple[str, int], list[BatchBuilder]] = {}

    def add(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int | None = None,
            headers: Headers | None = None) -> None:
        """Append a record; without a partition, it goes where the key's hash puts it (runtime/partitioner.py)."""
        if partition is None:
            partition = partition_for(key, self._partitions[topic])
        builders = self._batches.get((topic, partition))
        if builders is None:
            builders = self._batches[(topic, partition)] = [self._producer.create_batch()]
        if builders[-1].append(key=key, value=value, timestamp=None, headers=headers) is None:  # full
            builders.append(self._producer.create_batch())
            if builders[-1].append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a {len(value or b'')}-byte record does not fit in a record batch")

    def partitions(self, topic: str) -> Sequence[int]:
        """The partitions of a topic the outbox was made for (Outboxes.new)."""
        return self._partitions[topic]

    def __len__(self) -> int:
        return sum(b.record_count() for builders in self._batches.values() for b in builders)

    async def send(self, *, ordered: bool = True) -> dict[tuple[str, int], int]:
        """Send every batch; return once Kafka has acknowledged all of them (the producer's acks=all),
        with the offset of the last record written to each topic-partition. `ordered=False` (inside a
        transaction, which makes them land together anyway) sends a partition's batches without waiting
        for the previous one's acknowledgement."""
        batches, self._batches = self._batches, {}
        last: dict[tuple[str, int], int] = {}
        sent: list[tuple[tuple[str, int], BatchBuilder, asyncio.Future]] = []
        rounds = max((len(b) for b in batches.values()), default=0)
        for i in range(rounds):  # first batch of every partition, then the second ones, …
            for (topic, partition), builders in batches.items():
                if i < len(builders):
                    builders[i].close()  # complete: no linger, nothing else appended
                    future = await self._producer.send_batch(builders[i], topic, partition=partition)
                    sent.append(((topic, partition), builders[i], future))
            if ordered or i == rounds - 1:
                results = await asyncio.gather(*(future for _, _, future in sent))
                for (tp, builder, _), meta in zip(sent, results, strict=True):
                    last[tp] = meta.offset + builder.record_count() - 1
                sent.clear()
        return last


class Outboxes:
    """Makes outboxes for a producer, knowing the partitions of every topic it writes."""

    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self._partitions: dict[str, list[int]] = {}

    async def new(self, topics: Iterable[str] = ()) -> Outbox:
        """An empty outbox; `topics` are those records may be added to without a partition."""
        for topic in topics:
            if topic not in self._partitions:
                self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return Outbox(self.producer, self._partitions)
