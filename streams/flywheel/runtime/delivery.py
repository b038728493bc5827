"""Fetched records of a topic go to its stage a batch at a time, not record by record through Faust streams.

Why: with Faust agents, every record was decoded into an Event, put on a stream's queue, iterated,
counted by sensors and acked on its own — in the pipeline bench's profile about two thirds of the
worker's CPU went to that plumbing, not to Flywheel's stages. Here the consumer's fetch loop
(faust_seams.DirectHandoff) hands each fetch's records of a batch topic to its `BatchTopic`; its task
passes whatever has queued up — waiting up to `linger` seconds for more, at most `max_records` — to the
stage's handler in one call, and acks the records only after it returned.

What stays Faust's: group membership and the co-partitioned assignment (the topics are subscribed
through Faust's conductor), tables (stores, changelogs, recovery, standbys), offset commits (from the
acks), and flow control in a rebalance:
- the queue is a Faust FlowControlQueue: a fetch is held while the flow is suspended (a rebalance), and
  records of an older consumer generation are dropped unacked when taken (recovery seeks back to the
  committed offsets, so they come again). The queue is *not* cleared when the flow resumes: Faust resumes
  it after seeking, and records fetched in between belong to the new generation — clearing them lost them
  (their offsets never acked: commits stuck) and, if they had paused their partitions, stalled the topic
  for good, since only taking from the queue resumes fetching;
- records the handler has taken are tracked as Faust's streams track them (`Consumer.track_message`),
  so a rebalance waits for the batch in hand before it commits and hands tables over;
- too many queued fetches pause their partitions' fetching (as a full stream buffer does), until the
  handler has caught up.

Failure: the retry policy (runtime/retry.py) gives a handler that fails the same records again, for as
long as it takes; nothing is acked meanwhile — a batch is either done or still in hand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from faust.types import TP

from flywheel.runtime import faust_seams
from flywheel.runtime.retry import RetryPolicy

if TYPE_CHECKING:
    import faust
    from faust.types import Message

log = logging.getLogger(__name__)

HIGH_WATER = 4  # queued fetches that pause their partitions
LOW_WATER = 1  # … and resume them

Handler = Callable[[Sequence["Message"]], Awaitable[None]]


class BatchTopic:
    """One topic's records, a fetch at a time, to one handler (see the module docstring)."""

    def __init__(self, app: faust.App, topic: faust.TopicT, handler: Handler, *, name: str, retry: RetryPolicy,
                 max_records: int = 5000, linger: float = 0.0):
        self.app = app
        self.topic_name = topic.get_topic_name()
        self.handler = handler
        self.name = name
        self.retry = retry
        self.max_records = max_records
        self.linger = linger  # e.g. fewer, larger ClickHouse inserts when traffic is light
        self.queue = app.FlowControlQueue(maxsize=0)  # unbounded: HIGH_WATER pauses fetching
        self._paused: set[TP] = set()
        self._rest: list[Message] = []  # taken from the queue, beyond max_records: the next batch's first
        app.topics.add(topic)  # subscribed (and acked) through Faust's conductor, like an agent's topic

    # ---- the consumer's side: its fetch loop (faust_seams, seam 1) ---------------------------------
    async def deliver(self, messages: list[Message]) -> None:
        await self.queue.put(messages)  # held while the flow is suspended (a rebalance)
        if self.queue.qsize() >= HIGH_WATER:
            # Faust's TP: message.tp is aiokafka's TopicPartition, which the consumer's sets reject.
            tps = {TP(m.topic, m.partition) for m in messages}
            faust_seams.pause(self.app, tps)
            self._paused |= tps
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
        # at most max_records (e.g. FLYWHEEL_SINK_BATCH_SIZE rows per insert): the rest of the last fetch
        # opens the next batch
        batch, self._rest = batch[:self.max_records], batch[self.max_records:]
        if self._paused and self.queue.qsize() <= LOW_WATER:
            faust_seams.resume(self.app, self._paused)
            self._paused.clear()
        # Taken during a rebalance: wait for it to end. Fetched before it: not ours to process or ack any
        # more (they come again if they are).
        await self.app.flow_control.acquire()
        generation = self.app.consumer_generation_id
        return [m for m in batch if m.generation_id == generation]

    async def run(self) -> None:
        """The handler loop: an app task for the worker's lifetime."""
        consumer = self.app.consumer
        while True:
            batch = await self._take(self._rest or await self.queue.get())
            if not batch:
                continue
            for m in batch:
                consumer.track_message(m)  # a rebalance waits for these (Consumer.wait_empty)
            await self.retry.run(lambda batch=batch: self.handler(batch), name=self.name, size=len(batch))
            for m in batch:
                consumer.ack(m)


class BatchTopics(dict):
    """topic name → BatchTopic, for the consumer's fetch loop."""

    def add(self, app: faust.App, topic: faust.TopicT, handler: Handler, *, name: str, **kwargs) -> BatchTopic:
        bt = self[topic.get_topic_name()] = BatchTopic(app, topic, handler, name=name, **kwargs)
        app.task(bt.run)  # started once the worker is up (after table recovery)
        return bt
