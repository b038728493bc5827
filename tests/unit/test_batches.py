"""batches.BatchTopic: fetched records reach the handler a batch at a time, are acked only after it
returned, are handed again when it fails, and records of an older consumer generation are dropped
unacked. Also: table stores follow enter_partition. (The wiring on a real broker: tests/integration.)"""

from __future__ import annotations

import asyncio

import faust
from aiokafka.structs import TopicPartition
from faust.streams import current_event
from faust.types import TP
from faust.types.tuples import Message
from flywheel import batches
from flywheel.batches import BatchTopic, enter_partition
from flywheel.read_committed import ReadCommittedTransport


def app() -> faust.App:
    """Built inside the running loop: mode services bind to the loop current at creation."""
    a = faust.App("batches-test", broker="kafka://127.0.0.1:1", store="memory://")
    a.transport = ReadCommittedTransport(a.conf.broker_consumer, a)
    a.consumer_generation_id = 1
    a.flow_control.resume()  # suspended until a worker's partitions are assigned and recovered
    return a


def records(topic: str, offsets: range, *, partition: int = 0, generation: int = 1) -> list[Message]:
    return [Message(topic, partition, o, 0.0, 0, None, b"k", b"v%d" % o, None,
                    tp=TopicPartition(topic, partition),  # as Faust's aiokafka driver makes them
                    generation_id=generation) for o in offsets]


async def until(condition, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_queued_fetches_reach_the_handler_as_one_batch_acked_after_it_returned():
    seen: list[list[int]] = []
    release = asyncio.Event

    async def main():
        a = app()
        gate = release()
        acked_during: list[bool] = []

        async def handler(batch):
            seen.append([m.offset for m in batch])
            await gate.wait()
            acked_during.append(any(m.acked for m in batch))

        bt = BatchTopic(a, a.topic("t"), handler, name="t", max_records=250)
        first = records("t", range(0, 100))
        await bt.deliver(first)
        rest = [records("t", range(100, 200)), records("t", range(200, 300)), records("t", range(300, 400))]
        for r in rest:
            await bt.deliver(r)
        task = asyncio.ensure_future(bt.run())
        await until(lambda: len(seen) == 1)
        assert not any(m.acked for m in first)
        gate.set()
        await until(lambda: len(seen) == 2)
        await until(lambda: all(m.acked for r in rest for m in r))
        task.cancel()
        assert acked_during == [False, False]

    asyncio.run(main())
    # Whatever queued up, up to max_records (whole fetches: 300 ≥ 250), in order.
    assert seen == [list(range(0, 300)), list(range(300, 400))]


def test_a_failing_handler_gets_the_same_batch_again_and_nothing_is_acked_meanwhile(monkeypatch):
    monkeypatch.setattr(batches, "FIRST_BACKOFF_SECONDS", 0.01)
    attempts: list[list[int]] = []

    async def main():
        a = app()
        msgs = records("t", range(10, 15))

        async def handler(batch):
            attempts.append([m.offset for m in batch])
            assert not any(m.acked for m in batch)
            if len(attempts) < 3:
                raise ConnectionError("Kafka went away")

        bt = BatchTopic(a, a.topic("t"), handler, name="t")
        await bt.deliver(msgs)
        task = asyncio.ensure_future(bt.run())
        await until(lambda: all(m.acked for m in msgs))
        task.cancel()

    asyncio.run(main())
    assert attempts == [[10, 11, 12, 13, 14]] * 3


def test_records_of_an_older_generation_are_dropped_unacked():
    handled: list[int] = []

    async def main():
        a = app()

        async def handler(batch):
            handled.extend(m.offset for m in batch)

        bt = BatchTopic(a, a.topic("t"), handler, name="t")
        stale = records("t", range(0, 3), generation=1)
        a.consumer_generation_id = 2  # a rebalance happened after they were fetched
        fresh = records("t", range(0, 3), generation=2)
        await bt.deliver(stale)
        await bt.deliver(fresh)
        task = asyncio.ensure_future(bt.run())
        await until(lambda: all(m.acked for m in fresh))
        task.cancel()
        assert not any(m.acked for m in stale)

    asyncio.run(main())
    assert handled == [0, 1, 2]


def test_a_full_queue_pauses_its_partitions_until_the_handler_catches_up():
    async def main():
        a = app()
        gate = asyncio.Event()

        async def handler(batch):
            await gate.wait()

        bt = BatchTopic(a, a.topic("t"), handler, name="t", max_records=1)
        consumer = a.consumer
        for i in range(batches.HIGH_WATER):
            await bt.deliver(records("t", range(i, i + 1), partition=5))
        assert TP("t", 5) in consumer._buffered_partitions  # fetching paused
        task = asyncio.ensure_future(bt.run())
        gate.set()
        await until(lambda: TP("t", 5) not in consumer._buffered_partitions)
        assert TP("t", 5) in consumer._get_active_partitions()  # fetched again (Faust asserts its TPs)
        task.cancel()

    asyncio.run(main())


def test_table_stores_read_the_partition_entered():
    async def main():
        enter_partition(3)
        assert current_event().message.partition == 3
        enter_partition(6)
        assert current_event().message.partition == 6

    asyncio.run(main())


def test_a_rocksdb_store_writes_to_the_partition_entered(tmp_path):
    async def main():
        a = faust.App("batches-rocks", broker="kafka://127.0.0.1:1", store="rocksdb://", datadir=str(tmp_path))
        table = a.Table("t", partitions=8, key_type=bytes, value_type=bytes)
        store = table.data
        enter_partition(5)
        store[b"k"] = b"v"
        assert store.get(b"k") == b"v"
        assert set(store._dbs) == {5}  # the RocksDB instance of partition 5
        enter_partition(2)
        assert store.get(b"k") is None  # another partition's instance
        for db in store._dbs.values():
            db.close()

    asyncio.run(main())


def test_a_batch_in_hand_too_long_says_where_it_waits(monkeypatch, caplog):
    monkeypatch.setattr(batches, "STUCK_SECONDS", 0.05)

    async def main():
        a = app()
        gate = asyncio.Event()

        async def insert_into_clickhouse(batch):
            await gate.wait()

        bt = BatchTopic(a, a.topic("t"), insert_into_clickhouse, name="sink_t")
        msgs = records("t", range(0, 2))
        await bt.deliver(msgs)
        task = asyncio.ensure_future(bt.run())
        await until(lambda: "in hand" in caplog.text)
        gate.set()
        await until(lambda: all(m.acked for m in msgs))
        task.cancel()

    with caplog.at_level("WARNING", logger="flywheel.batches"):
        asyncio.run(main())
    assert "sink_t: a batch of 2 records has been in hand" in caplog.text
    assert "in insert_into_clickhouse" in caplog.text  # the handler's own frame, not only the wrapper's


def test_an_attempt_that_hangs_is_cancelled_and_the_batch_retried(monkeypatch):
    monkeypatch.setattr(batches, "STUCK_SECONDS", 0.02)
    monkeypatch.setattr(batches, "GIVE_UP_SECONDS", 0.1)
    monkeypatch.setattr(batches, "FIRST_BACKOFF_SECONDS", 0.01)
    attempts: list[str] = []

    async def main():
        a = app()
        never = asyncio.Event()

        async def handler(batch):
            attempts.append("started")
            if len(attempts) == 1:
                try:
                    await never.wait()  # a lost reply: this attempt would wait forever
                except asyncio.CancelledError:
                    attempts.append("cancelled")
                    raise

        bt = BatchTopic(a, a.topic("t"), handler, name="t")
        msgs = records("t", range(0, 3))
        await bt.deliver(msgs)
        task = asyncio.ensure_future(bt.run())
        await until(lambda: all(m.acked for m in msgs))
        task.cancel()

    asyncio.run(main())
    assert attempts == ["started", "cancelled", "started"]
