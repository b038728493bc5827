"""runtime/delivery.py's BatchTopic: fetched records reach the handler a batch at a time, are acked only
after it returned, are handed again when it fails (the retry policy), and records of an older consumer
generation are dropped unacked. (The wiring on a real broker: tests/integration.)"""

from __future__ import annotations

import asyncio

import faust
from aiokafka.structs import TopicPartition
from faust.types import TP
from faust.types.tuples import Message
from flywheel.runtime import delivery
from flywheel.runtime.delivery import BatchTopic
from flywheel.runtime.faust_seams import install_transport
from flywheel.runtime.retry import RetryPolicy

FAST = RetryPolicy(first_backoff=0.01, stuck_after=0.05, give_up_after=0.1)


def app() -> faust.App:
    """Built inside the running loop: mode services bind to the loop current at creation."""
    a = faust.App("batches-test", broker="kafka://127.0.0.1:1", store="memory://")
    install_transport(a, {})
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

        bt = BatchTopic(a, a.topic("t"), handler, name="t", retry=FAST, max_records=250)
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
    # Whatever queued up, up to max_records, in order; the rest of a fetch opens the next batch.
    assert seen == [list(range(0, 250)), list(range(250, 400))]


def test_a_failing_handler_gets_the_same_batch_again_and_nothing_is_acked_meanwhile():
    attempts: list[list[int]] = []

    async def main():
        a = app()
        msgs = records("t", range(10, 15))

        async def handler(batch):
            attempts.append([m.offset for m in batch])
            assert not any(m.acked for m in batch)
            if len(attempts) < 3:
                raise ConnectionError("Kafka went away")

        bt = BatchTopic(a, a.topic("t"), handler, name="t", retry=FAST)
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

        bt = BatchTopic(a, a.topic("t"), handler, name="t", retry=FAST)
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

        bt = BatchTopic(a, a.topic("t"), handler, name="t", retry=FAST, max_records=1)
        consumer = a.consumer
        for i in range(delivery.HIGH_WATER):
            await bt.deliver(records("t", range(i, i + 1), partition=5))
        assert TP("t", 5) in consumer._buffered_partitions  # fetching paused
        task = asyncio.ensure_future(bt.run())
        gate.set()
        await until(lambda: TP("t", 5) not in consumer._buffered_partitions)
        assert TP("t", 5) in consumer._get_active_partitions()  # fetched again (Faust asserts its TPs)
        task.cancel()

    asyncio.run(main())


def test_a_batch_in_hand_is_tracked_so_a_rebalance_waits_for_it():
    async def main():
        a = app()
        gate = asyncio.Event()

        async def handler(batch):
            await gate.wait()

        bt = BatchTopic(a, a.topic("t"), handler, name="t", retry=FAST)
        msgs = records("t", range(0, 3))
        await bt.deliver(msgs)
        task = asyncio.ensure_future(bt.run())
        await until(lambda: a.consumer.unacked)  # Consumer.wait_empty waits while this is not empty
        assert set(a.consumer.unacked) == set(msgs)
        gate.set()
        await until(lambda: all(m.acked for m in msgs))  # what wait_empty clears the set of
        task.cancel()

    asyncio.run(main())


def test_records_queued_across_a_rebalance_are_taken_and_their_paused_partitions_resume():
    """Faust resumes the flow after a rebalance's seek; records of the new generation fetched before that
    must not be cleared: they would never be acked, and if they had paused their partitions (a full queue),
    nothing would resume them — the topic would stall for good."""
    handled: list[int] = []

    async def main():
        a = app()

        async def handler(batch):
            handled.extend(m.offset for m in batch)

        bt = BatchTopic(a, a.topic("t"), handler, name="t", retry=FAST, max_records=1000)
        a.flow_control.suspend()  # a rebalance: generation 2 is assigned, its seek is under way
        a.consumer_generation_id = 2
        a.flow_control.resume()  # as during recovery, before the seek
        fetches = [records("t", range(i * 10, i * 10 + 10), partition=5, generation=2)
                   for i in range(delivery.HIGH_WATER)]
        for f in fetches:
            await bt.deliver(f)
        assert TP("t", 5) in a.consumer._buffered_partitions  # a full queue paused the partition
        a.flow_control.suspend()
        a.flow_control.resume()  # Faust's resume once the seek is done
        task = asyncio.ensure_future(bt.run())
        await until(lambda: all(m.acked for f in fetches for m in f))
        assert TP("t", 5) not in a.consumer._buffered_partitions
        task.cancel()

    asyncio.run(main())
    assert handled == list(range(delivery.HIGH_WATER * 10))
