"""Fetched records of a topic go to its handler a batch at a time, not record by record through Faust streams.

Why: with Faust agents, every record was decoded into an Event, put on a stream's queue, iterated,
counted by sensors and acked on its own — in the pipeline bench's profile about two thirds of the
worker's CPU went to that plumbing, not to Flywheel's stages. Here the consumer's fetch loop
(fastpath.DirectHandoff._drain_messages) appends each fetched record of a batch topic to a list, and
hands the list of one fetch to the topic's `BatchTopic`; its task passes whatever lists have queued up
— waiting up to `linger` seconds for more, at most `max_records` — to the handler in one call, and acks
the records only after it returned.

What stays Faust's: group membership and the co-partitioned assignment (the topics are subscribed
through Faust's conductor), tables (stores, changelogs, recovery, standbys), offset commits (from the
acks), and flow control in a rebalance:
- the queue is a Faust FlowControlQueue: a fetch is held while the flow is suspended, and the queue is
  cleared when partitions are revoked; records of an older consumer generation are dropped unacked
  (recovery seeks back to the committed offsets, so they come again);
- records the handler has taken are tracked as Faust's streams track them, so a rebalance waits
  (`Consumer.wait_empty`) for the batch in hand before it commits and hands tables over;
- too many queued lists pause their partitions' fetching (as a full stream buffer does), until the
  handler has caught up.

Failure: a handler that raises — or still has no result after GIVE_UP_SECONDS (logged with where it
waits from STUCK_SECONDS on), when the attempt is cancelled — gets the same records again after a
back-off (doubling to 30 s), for as long as it takes, and nothing is acked meanwhile: a batch is
either done or still in hand.
Handlers are written for redelivery anyway (at-least-once, DESIGN §6). Faust's agents would have acked
the batch and restarted, losing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from faust.streams import _current_event
from faust.types import TP

if TYPE_CHECKING:
    import faust
    from faust.types import Message

log = logging.getLogger(__name__)

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STUCK_SECONDS = 30.0  # a batch in hand this long is logged, with where it waits
GIVE_UP_SECONDS = 120.0  # … and this long, its attempt is cancelled and the batch retried
STOP_GRACE_SECONDS = 30.0  # a stopping worker lets the batch in hand finish this long
HIGH_WATER = 4  # queued fetches that pause their partitions
LOW_WATER = 1  # … and resume them

Handler = Callable[[Sequence["Message"]], Awaitable[None]]


class PartitionScope:
    """What Faust's table stores read from the current event: `.message.partition`. They pick the
    RocksDB instance (and a changelog partition) of the event being processed; a batch holds records
    of several partitions, so each table access is made in the scope of its record's partition."""

    __slots__ = ("partition", "message", "__weakref__")

    def __init__(self, partition: int):
        self.partition = partition
        self.message = self


_SCOPES: dict[int, PartitionScope] = {}


def enter_partition(partition: int) -> None:
    """Table stores act on `partition` from now on (in this task). faust.streams._current_event is
    private API; tests/unit/test_batches.py checks a RocksDB store still follows it."""
    scope = _SCOPES.get(partition)
    if scope is None:
        scope = _SCOPES[partition] = PartitionScope(partition)
    _current_event.set(weakref.ref(scope))


def awaiting(task: asyncio.Future) -> str:
    """Where a task waits: its chain of awaited coroutines (Task.get_stack shows only the outermost)."""
    coro = getattr(task, "get_coro", lambda: None)()
    frames = []
    while coro is not None and hasattr(coro, "cr_frame"):
        if coro.cr_frame is not None:
            frames.append((coro.cr_frame, coro.cr_frame.f_lineno))
        coro = coro.cr_await
    lines = traceback.StackSummary.extract(frames).format()
    return "".join(lines) + f"  awaiting {coro!r}"


class BatchTopic:
    """One topic's records, a fetch at a time, to one handler (see the module docstring)."""

    def __init__(self, app: faust.App, topic: faust.TopicT, handler: Handler, *, name: str,
                 max_records: int = 5000, linger: float = 0.0):
        self.app = app
        self.topic_name = topic.get_topic_name()
        self.handler = handler
        self.name = name
        self.max_records = max_records
        self.linger = linger  # e.g. fewer, larger ClickHouse inserts when traffic is light
        self.queue = app.FlowControlQueue(maxsize=0, clear_on_resume=True)  # unbounded: HIGH_WATER pauses fetching
        self._paused: set[TP] = set()
        app.topics.add(topic)  # subscribed (and acked) through Faust's conductor, like an agent's topic

    # ---- the consumer's side (fastpath.DirectHandoff._drain_messages) ------------------------------
    async def deliver(self, messages: list[Message]) -> None:
        await self.queue.put(messages)  # held while the flow is suspended (a rebalance)
        if self.queue.qsize() >= HIGH_WATER:
            consumer = self.app.consumer
            # Faust's TP: message.tp is aiokafka's TopicPartition, which the consumer's sets reject.
            for tp in {TP(m.topic, m.partition) for m in messages}:
                consumer.on_buffer_full(tp)
                self._paused.add(tp)
            log.debug("%s: %d fetches queued, fetching paused for %s", self.name, self.queue.qsize(), self._paused)

    # ---- the handler's side ------------------------------------------------------------------------
    async def _take(self, first: list[Message]) -> list[Message]:
        batch = list(first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger
        while len(batch) < self.max_records:
            if not self.queue.empty():
                batch.extend(self.queue.get_nowait())
                continue
            wait = deadline - loop.time()
            if wait <= 0:
                break
            try:
                batch.extend(await asyncio.wait_for(self.queue.get(), wait))
            except TimeoutError:
                break
        if self._paused and self.queue.qsize() <= LOW_WATER:
            consumer = self.app.consumer
            for tp in self._paused:
                consumer.on_buffer_drop(tp)
            self._paused.clear()
        # Fetched before a rebalance: not ours to process or ack any more (they come again if they are).
        generation = self.app.consumer_generation_id
        if not self.app.flow_control.is_active():
            return []
        return [m for m in batch if m.generation_id == generation]

    async def run(self) -> None:
        """The handler loop: an app task for the worker's lifetime."""
        consumer = self.app.consumer
        while True:
            batch = await self._take(await self.queue.get())
            if not batch:
                continue
            unacked = consumer._unacked_messages  # a rebalance waits for these (Consumer.wait_empty)
            for m in batch:
                unacked.add(m)
            try:
                await self._handle(batch)
            finally:
                _current_event.set(None)
            for m in batch:
                consumer.ack(m)

    async def _handle(self, batch: list[Message]) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        attempt = 0
        while True:
            work = asyncio.ensure_future(self.handler(batch))
            try:
                await self._watch(work, batch)
                if attempt:
                    log.warning("%s: batch of %d records done after %d failed attempts", self.name,
                                len(batch), attempt)
                return
            except asyncio.CancelledError:
                # The worker is stopping: let the batch's outputs land, within reason (nothing is acked).
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(work), STOP_GRACE_SECONDS)
                raise
            except Exception as exc:  # Kafka or ClickHouse errors mostly; a bug keeps failing, loudly
                attempt += 1
                log.error("%s: batch of %d records failed (attempt %d, retrying in %.1fs; its partitions "
                          "wait): %r", self.name, len(batch), attempt, backoff, exc,
                          exc_info=attempt == 1)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _watch(self, work: asyncio.Future, batch: list[Message]) -> None:
        """Await the handler; while it takes longer than STUCK_SECONDS, say where it waits (its partitions
        wait meanwhile: a stalled pipeline must say why); after GIVE_UP_SECONDS, cancel it and raise."""
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({work}, timeout=STUCK_SECONDS)
            if done:
                return work.result()
            waited += STUCK_SECONDS
            log.warning("%s: a batch of %d records has been in hand for %.0f s; waiting in:\n%s",
                        self.name, len(batch), waited, awaiting(work))
            if waited >= GIVE_UP_SECONDS:
                # Handlers are idempotent (at-least-once): a hung attempt is dropped and the batch retried.
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                raise TimeoutError(f"no result after {waited:.0f} s; the attempt was cancelled")


class BatchTopics(dict):
    """topic name → BatchTopic, for the consumer's fetch loop; `app.flywheel_batches`."""

    def add(self, app: faust.App, topic: faust.TopicT, handler: Handler, *, name: str, **kwargs) -> BatchTopic:
        bt = self[topic.get_topic_name()] = BatchTopic(app, topic, handler, name=name, **kwargs)
        app.task(bt.run)  # started once the worker is up (after table recovery)
        return bt
