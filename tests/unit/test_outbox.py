"""outbox.Outbox: records land on the partition Kafka's default partitioner picks, in the order they
were added (per partition, across record batches), and send() returns only once all are acknowledged."""

import asyncio
from collections import defaultdict
from types import SimpleNamespace

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from flywheel.outbox import Outbox


class FakeProducer:
    """create_batch/send_batch of AIOKafkaProducer; a batch is 'acknowledged' when `release` is set."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []
        self.next_offset: dict[tuple[str, int], int] = defaultdict(int)
        self.release: asyncio.Event | None = None

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0, is_transactional=0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future:
        assert batch.closed()  # complete, so aiokafka sends it without lingering
        records = [(r.key, r.value) for r in MemoryRecords(bytes(batch._build())).next_batch()]
        self.sent.append((topic, partition, records))
        base = self.next_offset[(topic, partition)]
        self.next_offset[(topic, partition)] += len(records)

        async def ack():
            await self.release.wait()
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
