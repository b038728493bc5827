"""runtime/outbox.py: records land on the partition Kafka's default partitioner picks, in the order they
were added (per partition, across record batches), send() returns only once all are acknowledged, and
an ordered send lands a partition's records as a prefix: never a later batch without the earlier ones."""

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from flywheel.runtime.outbox import Outbox


class FakeProducer:
    """create_batch/send_batch of AIOKafkaProducer; a batch is 'acknowledged' when `release` is set."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []
        self.next_offset: dict[tuple[str, int], int] = defaultdict(int)
        self.release: asyncio.Event | None = None
        self.fail: set[int] = set()  # the n-th batches sent (0-based) fail

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0, is_transactional=0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future:
        assert batch.closed()  # complete, so aiokafka sends it without lingering
        records = [(r.key, r.value) for r in MemoryRecords(bytes(batch._build())).next_batch()]
        self.sent.append((topic, partition, records))
        base = self.next_offset[(topic, partition)]
        self.next_offset[(topic, partition)] += len(records)

        failing = len(self.sent) - 1 in self.fail

        async def ack():
            await self.release.wait()
            if failing:
                raise ConnectionError("not acknowledged")
            return SimpleNamespace(offset=base)

        return asyncio.ensure_future(ack())


def test_records_keep_their_order_per_partition_across_batches_and_partitions_match_kafkas():
    partitions = list(range(8))
    producer = FakeProducer(batch_size=300)  # a few records per batch: many batches per partition
    added = [(f"user-{i % 5}".encode(), f"event-{i}".encode()) for i in range(200)]

    async def main():
        producer.release = asyncio.Event()
        outbox = Outbox(producer, {"events.identified": partitions})
        for key, value in added:
            outbox.add("events.identified", key, value)
        outbox.add("changelog", b"m1", b"origin", partition=5)
        sending = asyncio.ensure_future(outbox.send())
        await asyncio.sleep(0.01)
        assert not sending.done()  # waits for Kafka's acknowledgement
        producer.release.set()
        return await sending

    last = asyncio.run(main())
    by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for topic, partition, records in producer.sent:
        if topic == "events.identified":
            by_partition[partition] += records
    assert sum(len(r) for r in by_partition.values()) == len(added)
    assert max(sum(1 for t, p, _ in producer.sent if (t, p) == ("events.identified", q)) for q in partitions) > 1
    kafka = DefaultPartitioner()
    for key, _ in added:
        expected = [kv for kv in added if kv[0] == key]
        partition = kafka(key, partitions, partitions)
        assert [kv for kv in by_partition[partition] if kv[0] == key] == expected
    assert ("changelog", 5, [(b"m1", b"origin")]) in producer.sent  # an explicit partition is kept
    assert last[("changelog", 5)] == 0
    for partition, records in by_partition.items():
        assert last[("events.identified", partition)] == len(records) - 1


def test_an_ordered_send_stops_a_partition_at_its_first_failed_batch():
    producer = FakeProducer(batch_size=200)
    producer.fail = {0}  # the first batch of the partition

    async def main():
        producer.release = asyncio.Event()
        producer.release.set()
        outbox = Outbox(producer, {})
        for i in range(30):
            outbox.add("t", b"k", b"value-%d" % i, partition=0)
        with pytest.raises(ConnectionError):
            await outbox.send()

    asyncio.run(main())
    assert len(producer.sent) == 1  # the later batches were never sent


def test_an_unordered_send_sends_every_batch_at_once():
    producer = FakeProducer(batch_size=200)

    async def main():
        producer.release = asyncio.Event()
        outbox = Outbox(producer, {})
        for i in range(30):
            outbox.add("t", b"k", b"value-%d" % i, partition=0)
        sending = asyncio.ensure_future(outbox.send(ordered=False))
        await asyncio.sleep(0.01)
        assert len(producer.sent) > 1 and not sending.done()  # all in flight before any acknowledgement
        producer.release.set()
        return await sending

    assert asyncio.run(main())[("t", 0)] == 29
