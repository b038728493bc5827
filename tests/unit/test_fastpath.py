"""The fetcher's hand-off without a task per record (fastpath.py): same loop as Faust's, same outcomes."""

import asyncio
import inspect
import re

import faust
from faust.transport.consumer import Consumer as FaustConsumer
from flywheel.fastpath import DirectHandoff
from flywheel.read_committed import ReadCommittedTransport


def _code(fn) -> list[str]:
    """Source lines of a function without comments, blank lines and the def line."""
    lines = []
    for line in inspect.getsource(fn).splitlines()[1:]:
        line = re.sub(r"\s+#.*$", "", line).rstrip()
        if line.strip() and not line.strip().startswith("#"):
            lines.append(line)
    return lines


ADDED = [  # our lines in _drain_messages (the batch topics' hand-off, batches.py), in order
    'batch_topics = getattr(self.app, "flywheel_batches", None) or {}',
    "fetched: dict[str, list] = {}",
    "batch = fetched.get(message.topic)", "if batch is not None:", "batch.append(message)",
    "elif message.topic in batch_topics:", "fetched[message.topic] = [message]", "else:",
    "for topic, batch in fetched.items():", "await batch_topics[topic].deliver(batch)",
    "fetched = batch = None",
]


def test_drain_messages_is_fausts_loop_but_for_the_delivery():
    """If this fails, faust-streaming changed its loop: re-copy it into fastpath.py (or drop the module)."""
    ours, added = [], list(ADDED)
    for line in _code(DirectHandoff._drain_messages):
        if added and line.strip() == added[0]:
            added.pop(0)
            continue
        if "deliver = self._deliver" not in line:
            ours.append(line.replace("faust_consumer.CONSUMER_FETCHING", "CONSUMER_FETCHING")
                        .replace("await deliver(callback(message))",
                                 "await self.wait_first(\n callback(message), self.suspend_flow.wait()\n )"))
    assert not added, f"lines not found in fastpath's loop: {added}"
    theirs = _code(FaustConsumer._drain_messages)

    def norm(lines):
        return re.sub(r"\s+", " ", " ".join(lines)).replace("( ", "(").replace(" )", ")")

    assert norm(ours) == norm(theirs)


def consumer() -> DirectHandoff:
    """Built inside the running loop: mode services bind to the loop current at creation."""
    app = faust.App("handoff-test", broker="kafka://127.0.0.1:1", store="memory://")
    app.transport = ReadCommittedTransport(app.conf.broker_consumer, app)
    assert isinstance(app.consumer, DirectHandoff)
    return app.consumer


def test_a_delivery_that_does_not_suspend_completes_in_place():
    done = []

    async def delivery():
        done.append(1)

    async def main():
        c = consumer()
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda loop, coro, **kw: created.append(coro) or asyncio.Task(coro, loop=loop, **kw))
        await c._deliver(delivery())
        return list(created)

    created = []
    assert asyncio.run(main()) == []  # Faust's loop made four tasks per record here
    assert done == [1]


def test_a_blocked_delivery_resumes_and_returns_when_it_completes():
    steps = []

    async def main():
        c = consumer()
        room = asyncio.get_running_loop().create_future()

        async def delivery():
            steps.append("blocked")
            value = await room  # a full stream buffer
            await asyncio.sleep(0)
            steps.append(f"put {value}")

        task = asyncio.ensure_future(c._deliver(delivery()))
        await asyncio.sleep(0.01)
        assert steps == ["blocked"] and not task.done()
        room.set_result("event")
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    assert steps == ["blocked", "put event"]


def test_a_blocked_delivery_is_abandoned_when_the_flow_is_suspended():
    seen = []

    async def main():
        c = consumer()
        async def delivery():
            try:
                await asyncio.get_running_loop().create_future()  # never gets room
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        task = asyncio.ensure_future(c._deliver(delivery()))
        await asyncio.sleep(0.01)
        c.suspend_flow.set()  # a rebalance
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    assert seen == ["cancelled"]


def test_a_delivery_error_propagates():

    async def delivery():
        raise ValueError("decode failed")

    async def main():
        c = consumer()
        try:
            await c._deliver(delivery())
        except ValueError as exc:
            return str(exc)

    assert asyncio.run(main()) == "decode failed"


def test_lean_monitor_keeps_what_faust_reads():
    from faust.types import TP
    from flywheel.fastpath import LeanMonitor

    monitor, tp = LeanMonitor(), TP("events.raw", 3)
    assert monitor.on_stream_event_in(tp, 7, object(), object()) is None  # no per-event state dict
    assert monitor.stream_inbound_time[tp] > 0  # read by Faust's slow-processing warnings
    assert monitor.events_total == 1
    monitor.on_stream_event_out(tp, 7, object(), object(), None)
