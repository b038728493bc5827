"""Group commit: the events of concurrent requests go to Kafka in one transaction, all or nothing.

A request is answered 200 only once the transaction holding its events is committed (acks=all,
idempotent transactional producer). Requests that arrive while a transaction is in flight wait for
the next one, which takes all of them: one commit round trip serves many requests, so throughput
grows with concurrency while each request still lands entirely or not at all.

On any failure (Kafka down, timeout, fenced) every request of the group gets `KafkaUnavailable`
(→ 503) and the producer is dropped, not reused: the next one registers the same transactional id,
which makes the broker abort the open transaction and fence any produce request of the old one
still in flight (if the broker is unreachable until then, `transaction_timeout` aborts it).
Consumers read events.raw with isolation_level=read_committed (flywheel.read_committed), so an
aborted request's events are never seen.

One ambiguity is inherent: if the commit reached Kafka but its answer did not reach us in time,
the client gets a 503, retries, and its events are written twice; they carry the same messageIds,
and the pipeline drops repeated messageIds (docs/design.md §2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaProducer

from flywheel import observability as obs
from flywheel.collector.outcomes import Record
from flywheel.runtime.outbox import Outbox

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


class KafkaUnavailable(Exception):
    """The request's transaction did not commit: none of its events is visible; retry later
    (safe even in the rare case where the commit did land: the messageIds deduplicate)."""


class Committer(Protocol):
    """Where accepted requests go: GroupCommitter, or an in-memory one in handler unit tests."""

    async def submit(self, records: Sequence[Record], headers: Headers) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Pending:
    records: Sequence[Record]
    headers: Headers
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def transactional_producer(bootstrap: str, transactional_id: str, *, timeout: float) -> AIOKafkaProducer:
    """An idempotent, transactional producer (acks=all) whose requests give up after `timeout`."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="flywheel-collector",
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        request_timeout_ms=int(timeout * 1000),
        # The broker aborts a transaction left open this long (a collector killed mid-request):
        # until then read_committed consumers wait on that partition, so keep it short.
        transaction_timeout_ms=int(max(timeout * 2, 10) * 1000),
        max_batch_size=512 * 1024,
        linger_ms=0,
    )


class GroupCommitter:
    """Writes each submitted request's records to `topic`, grouped into Kafka transactions.

    `lanes` transactions can be in flight at once, each lane with its own transactional producer
    (id `<transactional_id>-<lane>`): a producer can only start its next transaction once the broker
    has written the previous one's commit markers (aiokafka waits 20 ms on CONCURRENT_TRANSACTIONS),
    so a single lane leaves the collector idle half the time.
    """

    def __init__(
        self, *, topic: str, producer_factory: Callable[[int], AIOKafkaProducer], timeout: float = 10.0,
        lanes: int = 2, max_group_records: int = 20_000,
    ):
        self.topic = topic
        self.timeout = timeout
        self.max_group_records = max_group_records
        self._lanes = [_Lane(i, producer_factory) for i in range(max(1, lanes))]
        self._queue: asyncio.Queue[_Pending] | None = None
        self._runners: list[asyncio.Task] = []
        self._closed = False

    async def submit(self, records: Sequence[Record], headers: Headers) -> None:
        """Return once every record is committed to Kafka; raise KafkaUnavailable if none will be."""
        if not records:
            return
        if self._closed:
            raise KafkaUnavailable("the collector is shutting down")
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._runners = [asyncio.create_task(self._run(lane), name=f"collector-commit-{lane.index}")
                             for lane in self._lanes]
        pending = _Pending(records, headers)
        started = time.perf_counter()
        self._queue.put_nowait(pending)
        try:
            await pending.done
        finally:
            obs.COLLECTOR_PRODUCE_SECONDS.observe(time.perf_counter() - started)

    async def close(self) -> None:
        """Stop taking requests; those still queued get KafkaUnavailable."""
        self._closed = True
        for runner in self._runners:
            runner.cancel()
        for runner in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        while self._queue is not None and not self._queue.empty():
            _fail([self._queue.get_nowait()], KafkaUnavailable("the collector is shutting down"))
        for lane in self._lanes:
            await lane.discard()

    async def _run(self, lane: _Lane) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            n = len(group[0].records)
            while not self._queue.empty() and n < self.max_group_records:
                group.append(self._queue.get_nowait())
                n += len(group[-1].records)
            try:
                await self._commit(lane, group)
            except asyncio.CancelledError:
                _fail(group, KafkaUnavailable("the collector is shutting down"))
                raise
            except Exception as exc:  # every failure means: not written, tell the clients to retry
                obs.COLLECTOR_TRANSACTIONS.labels("aborted").inc()
                log.warning("Kafka transaction of %d requests (%d events) failed, answering 503: %r",
                            len(group), n, exc)
                _fail(group, KafkaUnavailable(self._reason(exc)))
                await lane.discard()
            else:
                obs.COLLECTOR_TRANSACTIONS.labels("committed").inc()
                obs.COLLECTOR_GROUP_EVENTS.observe(n)
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_result(None)

    def _reason(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError):
            return f"Kafka did not commit the events within {self.timeout:g}s"
        return f"{type(exc).__name__}: {exc}".strip(": ")

    async def _commit(self, lane: _Lane, group: list[_Pending]) -> None:
        async with asyncio.timeout(self.timeout):
            producer = await lane.started_producer()
            outbox = Outbox(producer, {self.topic: sorted(await producer.partitions_for(self.topic))})
            await producer.begin_transaction()
            for pending in group:
                for record in pending.records:
                    outbox.add(self.topic, record.key, record.value, headers=pending.headers)
            await outbox.send(ordered=False)  # every batch acknowledged by all in-sync replicas
            await producer.commit_transaction()


class _Lane:
    """One transactional producer, started on first use and replaced after any failure."""

    def __init__(self, index: int, factory: Callable[[int], AIOKafkaProducer]):
        self.index = index
        self._factory = factory
        self._producer: AIOKafkaProducer | None = None

    async def started_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self._factory(self.index)
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 2)
                raise
            self._producer = producer
        return self._producer

    async def discard(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)


def _fail(group: list[_Pending], exc: Exception) -> None:
    for pending in group:
        if not pending.done.done():
            pending.done.set_exception(exc)
