"""Every use of faust-streaming's and aiokafka's internals, in one module (docs/design.md §7).

Flywheel uses Faust for the consumer group, the co-partitioned assignment, tables (stores, changelogs,
recovery, standbys), offset commits and flow control in a rebalance, through its public API elsewhere.
What the public API cannot do is here, each with a contract test in tests/unit/test_faust_seams.py that
fails loudly when an upgrade changes what it relies on. Versions are pinned in pyproject.toml
(faust-streaming 0.15.3, aiokafka 0.14.0).

1. Batch hand-off (`DirectHandoff._drain_messages`): the consumer's fetch loop is Faust's
   `Consumer._drain_messages`, copied line for line, except that the records of a batch topic are
   collected per fetch and handed to their `BatchTopic` (runtime/delivery.py) in one call, and that any
   other record's delivery is first stepped in place: Faust wraps every delivery in mode's `wait_first`
   (four tasks and an asyncio.wait per record) to race it against a suspended flow, which matters only
   when the delivery blocks; only then does it go to that race. The contract test compares the copy with
   Faust's loop.
2. read_committed (`ReadCommittedConsumerThread`): the collector writes events.raw in Kafka
   transactions, so workers must skip aborted records. Faust sets aiokafka's isolation level only with
   `processing_guarantee="exactly_once"` (which has open bugs); we set `AIOKafkaConsumer._isolation_level`
   on the consumer Faust builds, before it starts.
3. `LeanMonitor`: Faust's Monitor sensor keeps per-record statistics nothing here reads (by topic,
   read offsets, active messages, times); this keeps what Faust itself reads (`stream_inbound_time`,
   for its slow-processing warnings) and the counters.
4. Table stores (`StoreTable`): stages read and write a table's store per partition (a batch spans
   partitions; Faust's Table API picks the partition from the current stream event) — RocksDB through
   `Store._db_for_partition` and `Store.offset_key`, in write batches; the memory store through its dict.
5. Pausing a partition's fetching (`pause`, `resume`): `Consumer.on_buffer_full` / `on_buffer_drop`, what
   a full stream buffer does.
6. Recovery (`recovered`, `recovery_remaining`): whether Faust's table recovery has completed once, and
   what it still has to read per table, from `Recovery.completed`, `in_recovery`, `active_remaining()`
   and `tp_to_table`.
7. Bulk restore (`install_bulk_restore`): Faust's recovery reads a changelog at ~4,400 records/s here (a
   Python event per record); a worker without its local state would take minutes per million persons.
   Once Faust's recovery knows where each active changelog partition's store stands and where the
   changelog ends (`Recovery._build_offsets` for "active", after `_build_highwaters`), the records in
   between are read in large fetches and written in RocksDB write batches (~180,000 records/s, see
   bench/restore.py), the store's persisted offset moved along; Faust then recovers only what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Iterator, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

import aiokafka
from faust.sensors.monitor import Monitor
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service, ServiceT

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

READ_COMMITTED = "read_committed"


# ---- 1. batch hand-off ------------------------------------------------------------------------------
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
    """Mixin for a Faust Consumer: `_drain_messages` hands batch topics' records to their BatchTopic, and
    other records to their streams without a task per record (seam 1)."""

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
        batch_topics = self.transport.batch_topics  # changed: runtime/delivery.py

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


# ---- 2. read_committed ------------------------------------------------------------------------------
class ReadCommittedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_isolation_level"):
            raise RuntimeError(
                f"aiokafka {aiokafka.__version__} no longer keeps _isolation_level: "
                "update flywheel.runtime.faust_seams for this version"
            )
        consumer._isolation_level = READ_COMMITTED
        return consumer


class WorkerConsumer(DirectHandoff, faust_aiokafka.Consumer):
    """The worker's consumer: read_committed, and fetched records handed over a batch at a time."""

    def _new_consumer_thread(self) -> ReadCommittedConsumerThread:
        return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class WorkerTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with the worker's consumer, and the batch topics its fetch loop feeds."""

    Consumer = WorkerConsumer

    def __init__(self, *args: Any, batch_topics: Mapping[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batch_topics = batch_topics


def install_transport(app: faust.App, batch_topics: Mapping[str, Any]) -> None:
    """Give `app` the worker's transport (before its consumer is created)."""
    app.transport = WorkerTransport(app.conf.broker_consumer, app, batch_topics=batch_topics)


# ---- 3. the lean monitor ----------------------------------------------------------------------------
class LeanMonitor(Monitor):
    """Faust's Monitor without the per-event bookkeeping (see the module docstring)."""

    def on_message_in(self, tp, offset, message) -> None:
        self.messages_received_total += 1  # Consumer.track_message calls this for every record

    def on_stream_event_in(self, tp, offset, stream, event) -> None:
        self.events_total += 1
        self.stream_inbound_time[tp] = monotonic()

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:
        pass


# ---- 4. table stores --------------------------------------------------------------------------------
class StoreTable:
    """A Faust table's store, addressed by partition: stages.ports.Table.

    `owner(key)` is the partition a key belongs to; only the memory store needs it (one dict for every
    partition). Faust's Table object stays the owner of the store: it creates, recovers and revokes it."""

    def __init__(self, table: faust.Table, owner: Callable[[bytes], int]):
        self.table = table
        self.changelog = table.changelog_topic.get_topic_name()
        self._owner = owner
        self._rocksdb = hasattr(table.data, "_db_for_partition")

    def _db(self, partition: int):
        return self.table.data._db_for_partition(partition)

    def get(self, partition: int, key: bytes) -> bytes | None:
        if self._rocksdb:
            return self._db(partition).get(key)
        return self.table.data.data.get(key)

    def scan(self, partition: int, prefix: bytes = b"", start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        if not self._rocksdb:
            data = self.table.data.data
            keys = sorted(k for k in data if k.startswith(prefix) and k >= start and self._owner(k) == partition)
            yield from ((k, data[k]) for k in keys if k in data)
            return
        offset_key = self.table.data.offset_key
        it = self._db(partition).iter()
        it.seek(max(prefix, start))
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            if key != offset_key:
                yield key, it.value()
            it.next()

    # RocksDB's own figures, summed over the partitions this worker has open (ours: stores._dbs).
    STATS = {"keys": "rocksdb.estimate-num-keys", "memtables": "rocksdb.cur-size-all-mem-tables",
             "block_cache": "rocksdb.block-cache-usage", "index_filters": "rocksdb.estimate-table-readers-mem",
             "sst_files": "rocksdb.total-sst-files-size"}

    def stats(self) -> dict[str, int]:
        """keys (RocksDB's estimate), memtables, block_cache, index_filters (bytes in memory), sst_files
        (bytes on disk), and how many partitions are open; the memory store: keys only."""
        if not self._rocksdb:
            return {"keys": len(self.table.data.data), "partitions": 0}
        dbs = list(self.table.data._dbs.values())
        totals = {name: sum(db.property_int_value(prop) or 0 for db in dbs) for name, prop in self.STATS.items()}
        return totals | {"partitions": len(dbs)}

    def write(self, partition: int, items: Mapping[bytes, bytes | None], changelog_offset: int | None) -> None:
        store = self.table.data
        if not self._rocksdb:
            for key, value in items.items():
                if value is None:
                    store.data.pop(key, None)
                else:
                    store.data[key] = value
            return
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in items.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if changelog_offset is not None:  # a restart replays the changelog from here (Store.persisted_offset)
            batch.put(store.offset_key, str(changelog_offset).encode())
        self._db(partition).write(batch)


# ---- 5. pausing fetching ----------------------------------------------------------------------------
def pause(app: faust.App, tps: Iterable[TP]) -> None:
    for tp in tps:
        app.consumer.on_buffer_full(tp)


def resume(app: faust.App, tps: Iterable[TP]) -> None:
    for tp in tps:
        app.consumer.on_buffer_drop(tp)


# ---- 6. recovery ------------------------------------------------------------------------------------
def recovered(app: faust.App) -> bool:
    """Whether the tables have been recovered since the worker started (it has been ready once)."""
    return app.tables.recovery.completed.is_set()


def recovery_remaining(app: faust.App) -> dict[str, int] | None:
    """Changelog records Faust's recovery has still to read, per table; None when it is not recovering."""
    recovery = app.tables.recovery
    if not recovery.in_recovery:
        return None
    remaining: dict[str, int] = {}
    for tp, left in recovery.active_remaining().items():
        name = recovery.tp_to_table[tp].name
        remaining[name] = remaining.get(name, 0) + max(0, left)
    return remaining


# ---- 7. bulk restore ---------------------------------------------------------------------------------
BULK_PER_TURN = 10_000  # records written between two turns of the event loop (/health shares it)


def install_bulk_restore(app: faust.App, bootstrap: str, *, min_records: int) -> None:
    """Restore active changelog partitions in bulk, before Faust's recovery, once one of them is at least
    `min_records` behind its changelog."""
    recovery = app.tables.recovery
    build_offsets = recovery._build_offsets

    async def _build_offsets(consumer, tps, destination, title: str) -> None:
        await build_offsets(consumer, tps, destination, title)
        if title == "active":
            await bulk_restore(bootstrap, recovery, tps, destination, recovery.active_highwaters,
                               min_records=min_records)

    recovery._build_offsets = _build_offsets


async def bulk_restore(bootstrap: str, recovery: Any, tps: Iterable[TP], offsets: dict[TP, int],
                       highwaters: Mapping[TP, int], *, min_records: int) -> int:
    """Write the changelog records after `offsets[tp]` (the last one the store holds, Faust's reckoning)
    up to `highwaters[tp]` (the last one there is) into each RocksDB store, and move `offsets` on.
    Returns how many records were written. The persisted offset moves with each write batch: a kill in
    the middle resumes from there."""
    from rocksdict import WriteBatch

    behind = {tp: highwaters.get(tp, -1) - max(offsets.get(tp, -1), -1) for tp in tps
              if hasattr(recovery.tp_to_table[tp].data, "_db_for_partition")}
    if not any(n >= min_records for n in behind.values()):
        return 0
    # Once one partition is worth a consumer of its own, every partition behind goes the same way: Faust's
    # recovery reads ~4k records/s, so even the dedup table's few thousand cost it seconds (bench/restart.py).
    todo = {tp: highwaters[tp] for tp, n in behind.items() if n > 0}
    started, written = monotonic(), 0
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         max_partition_fetch_bytes=8 * 2**20, fetch_max_bytes=32 * 2**20)
    await consumer.start()
    try:
        ours = {aiokafka.TopicPartition(tp.topic, tp.partition): tp for tp in todo}
        consumer.assign(list(ours))
        for atp, tp in ours.items():
            consumer.seek(atp, max(offsets.get(tp, -1), -1) + 1)
        remaining = set(ours)
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=1000, max_records=BULK_PER_TURN)
            for atp, records in fetched.items():
                tp = ours[atp]
                store = recovery.tp_to_table[tp].data
                batch, last = WriteBatch(raw_mode=True), None
                for r in records:
                    if r.offset > todo[tp]:
                        break
                    if r.value is None:
                        batch.delete(r.key)
                    else:
                        batch.put(r.key, r.value)
                    last = r.offset
                    written += 1
                if last is not None:
                    store._db_for_partition(tp.partition).write(batch)
                    store.set_persisted_offset(tp, last)
                    offsets[tp] = last
            for atp in list(remaining):
                if await consumer.position(atp) > todo[ours[atp]]:
                    remaining.discard(atp)
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    log.info("bulk restore: %d changelog records into %d partitions in %.1f s", written, len(todo),
             monotonic() - started)
    return written

