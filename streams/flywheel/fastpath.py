"""Faust per-record overheads the worker does without; each found in the pipeline bench's profile.

1. `DirectHandoff` (a Consumer mixin): the fetcher hands each fetched record to the streams without a
   task and an asyncio.wait per record. faust-streaming 0.15.3 (`Consumer._drain_messages`) delivers
   every record with `await self.wait_first(callback(message), self.suspend_flow.wait())`: mode's
   `wait_first` wraps the delivery and three events (suspend, stopped, crashed) in four new tasks,
   waits on them and cancels the losers. That race only matters while a delivery is blocked (a
   stream's buffer is full) and a rebalance suspends the flow; otherwise the delivery (decode, put on
   the stream's queue) completes without suspending. `_drain_messages` below is Faust's, line for
   line, except that the delivery coroutine is first stepped in place; only if it suspends does the
   rest of it go to Faust's `wait_first` race, as before. Order and flow control are unchanged: the
   fetcher still waits for each record's delivery before taking the next.

2. `LeanMonitor`: Faust's Monitor sensor keeps per-event statistics (events by stream and by task,
   runtimes: weak-dict lookups and a state dict per event) that nothing here reads. It keeps what
   Faust itself reads (`stream_inbound_time`, for its slow-processing warnings) and the counters.

Revisit when upgrading faust-streaming (pinned in pyproject.toml): tests/unit/test_fastpath.py checks
that Faust's loop is still the one copied here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Generator
from time import monotonic
from typing import Any, cast

from faust.sensors.monitor import Monitor
from faust.transport import consumer as faust_consumer
from mode import Service, ServiceT


class _Resume:
    """Awaitable that drives a coroutine from the suspension point where it was left (`yielded`)."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine, yielded: Any):
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # cancellation included: the coroutine decides
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: Coroutine, yielded: Any) -> Any:
    return await _Resume(coro, yielded)


class DirectHandoff(faust_consumer.Consumer):
    """Mixin for a Faust Consumer: `_drain_messages` without a task per record."""

    async def _deliver(self, delivery: Coroutine) -> None:
        try:
            yielded = delivery.send(None)
        except StopIteration:
            return  # delivered without suspending: the common case
        # Blocked (full stream buffer, flow control): race it against a suspended flow, as Faust does.
        await self.wait_first(_resume(delivery, yielded), self.suspend_flow.wait())

    # Copied from faust-streaming 0.15.3 faust/transport/consumer.py Consumer._drain_messages; the one
    # change is marked.
    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = faust_consumer.CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        deliver = self._deliver  # changed: was self.wait_first(callback(message), self.suspend_flow.wait())
        batch_topics = getattr(self.app, "flywheel_batches", None) or {}  # changed: batches.py

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = cast(AsyncIterator, getmany(timeout=1.0))

                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if not self.should_stop:
                    fetched: dict[str, list] = {}  # changed: records of batch topics, by topic
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            batch = fetched.get(message.topic)  # changed (see above)
                            if batch is not None:
                                batch.append(message)
                            elif message.topic in batch_topics:
                                fetched[message.topic] = [message]
                            else:
                                await deliver(callback(message))
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                    for topic, batch in fetched.items():  # changed: one hand-off per topic and fetch
                        await batch_topics[topic].deliver(batch)
                    fetched = batch = None  # type: ignore[assignment]  # no reference left while waiting
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


class LeanMonitor(Monitor):
    """Faust's Monitor without the per-event bookkeeping (see the module docstring)."""

    def on_stream_event_in(self, tp, offset, stream, event) -> None:
        self.events_total += 1
        self.stream_inbound_time[tp] = monotonic()

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:
        pass
