"""Contract tests of runtime/faust_seams.py: one per use of faust-streaming's or aiokafka's internals, so an
upgrade that changes what a seam relies on fails here, loudly, rather than in production."""

import asyncio
import inspect
import re

import faust
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from flywheel.runtime.faust_seams import READ_COMMITTED, DirectHandoff, StoreTable, install_transport, pause, resume


def _code(fn) -> list[str]:
    """Source lines of a function without comments, blank lines and the def line."""
    lines = []
    for line in inspect.getsource(fn).splitlines()[1:]:
        line = re.sub(r"\s+#.*$", "", line).rstrip()
        if line.strip() and not line.strip().startswith("#"):
            lines.append(line)
    return lines


ADDED = [  # our lines in _drain_messages (the batch topics' hand-off, runtime/delivery.py), in order
    "batch_topics = self.transport.batch_topics",
    "fetched: dict[str, list] = {}",
    "batch = fetched.get(message.topic)", "if batch is not None:", "batch.append(message)",
    "elif message.topic in batch_topics:", "fetched[message.topic] = [message]", "else:",
    "for topic, batch in fetched.items():", "await batch_topics[topic].deliver(batch)",
    "fetched = batch = None",
]


def test_drain_messages_is_fausts_loop_but_for_the_delivery():
    """Seam 1. If this fails, faust-streaming changed its loop: re-copy it into faust_seams.py."""
    ours, added = [], list(ADDED)
    for line in _code(DirectHandoff._drain_messages):
        if added and line.strip() == added[0]:
            added.pop(0)
            continue
        if "deliver = self._deliver" not in line:
            ours.append(line.replace("faust_consumer.CONSUMER_FETCHING", "CONSUMER_FETCHING")
                        .replace("await deliver(callback(message))",
                                 "await self.wait_first(\n callback(message), self.suspend_flow.wait()\n )"))
    assert not added, f"lines not found in faust_seams' loop: {added}"
    theirs = _code(FaustConsumer._drain_messages)

    def norm(lines):
        return re.sub(r"\s+", " ", " ".join(lines)).replace("( ", "(").replace(" )", ")")

    assert norm(ours) == norm(theirs)


def consumer() -> DirectHandoff:
    """Built inside the running loop: mode services bind to the loop current at creation."""
    app = faust.App("handoff-test", broker="kafka://127.0.0.1:1", store="memory://")
    install_transport(app, {})
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
    from flywheel.runtime.faust_seams import LeanMonitor

    monitor, tp = LeanMonitor(), TP("events.raw", 3)
    assert monitor.on_stream_event_in(tp, 7, object(), object()) is None  # no per-event state dict
    assert monitor.stream_inbound_time[tp] > 0  # read by Faust's slow-processing warnings
    assert monitor.events_total == 1
    monitor.on_stream_event_out(tp, 7, object(), object(), None)
    monitor.on_message_in(tp, 7, object())  # what Consumer.track_message reports of every record
    assert monitor.messages_received_total == 1 and not monitor.messages_received_by_topic


# ---- seam 2: read_committed ------------------------------------------------------------------------

def worker_consumer(app: faust.App):
    async def build():
        thread = app.consumer._new_consumer_thread()
        return thread._create_worker_consumer(app.transport)

    return asyncio.run(build())


def test_the_worker_consumer_is_read_committed_without_exactly_once():
    app = faust.App("rc-test", broker="kafka://127.0.0.1:1", store="memory://")
    install_transport(app, {})
    assert app.conf.processing_guarantee.value == "at_least_once"
    assert worker_consumer(app)._isolation_level == READ_COMMITTED


def test_plain_faust_would_read_uncommitted():
    """Why seam 2 exists: if this fails, Faust changed and the seam can go."""
    app = faust.App("rc-test-plain", broker="kafka://127.0.0.1:1", store="memory://")
    assert worker_consumer(app)._isolation_level == "read_uncommitted"


# ---- seam 4: table stores --------------------------------------------------------------------------

def _store_table(tmp_path, store: str) -> StoreTable:
    app = faust.App(f"seams-{store[:3]}", broker="kafka://127.0.0.1:1", store=store, datadir=str(tmp_path))
    table = app.Table("persons", partitions=8, key_type=bytes, value_type=bytes)
    return StoreTable(table, owner=lambda key: int(key[:1]))


def _exercise(t: StoreTable) -> None:
    t.write(5, {b"5a": b"1", b"5b": b"2", b"5c": b"3"}, changelog_offset=41)
    t.write(2, {b"2a": b"x"}, changelog_offset=7)
    t.write(5, {b"5b": None}, changelog_offset=42)
    assert t.get(5, b"5a") == b"1" and t.get(5, b"5b") is None
    assert list(t.scan(5)) == [(b"5a", b"1"), (b"5c", b"3")]
    assert list(t.scan(5, b"5c")) == [(b"5c", b"3")]
    assert list(t.scan(2)) == [(b"2a", b"x")]
    assert t.changelog.endswith("persons-changelog")


def test_a_rocksdb_store_is_written_and_read_per_partition(tmp_path):
    async def main():
        t = _store_table(tmp_path, "rocksdb://")
        _exercise(t)
        store = t.table.data
        assert set(store._dbs) == {2, 5}  # one RocksDB instance per partition, as Faust's recovery writes them
        # what Faust reads at a restart to replay the changelog only from there
        assert store.persisted_offset(TP(t.changelog, 5)) == 42
        assert list(t.scan(5)) == [(b"5a", b"1"), (b"5c", b"3")]  # the offset record is not a key
        assert list(t.scan(5, start=b"5b")) == [(b"5c", b"3")]
        stats = t.stats()  # what /status and flywheel_table_* report
        assert stats["partitions"] == 2 and stats["keys"] >= 3 and stats["memtables"] > 0
        # Faust's recovery writes the same databases: a changelog record lands where we read it
        store._db_for_partition(5).put(b"5d", b"4")
        assert t.get(5, b"5d") == b"4"
        for db in store._dbs.values():
            db.close()

    asyncio.run(main())


def test_a_memory_store_is_one_dict_told_apart_by_owner(tmp_path):
    async def main():
        t = _store_table(tmp_path, "memory://")
        _exercise(t)
        assert t.table.data.data == {b"5a": b"1", b"5c": b"3", b"2a": b"x"}  # what Faust's recovery fills

    asyncio.run(main())


# ---- seam 5: pausing a partition's fetching ---------------------------------------------------------

def test_pause_and_resume_a_partition():
    async def main():
        app = faust.App("seams-pause", broker="kafka://127.0.0.1:1", store="memory://")
        install_transport(app, {})
        tp = TP("t", 5)
        pause(app, [tp])
        assert tp in app.consumer._buffered_partitions
        resume(app, [tp])
        assert tp not in app.consumer._buffered_partitions

    asyncio.run(main())


# ---- seam 6: recovery progress ------------------------------------------------------------------------

def test_recovery_progress_reads_what_faust_keeps():
    from flywheel.runtime.faust_seams import recovered, recovery_remaining

    async def main():
        app = faust.App("seams-recovery", broker="kafka://127.0.0.1:1", store="memory://")
        table = app.Table("persons", partitions=2, key_type=bytes, value_type=bytes)
        recovery = app.tables.recovery
        assert recovery_remaining(app) is None and not recovered(app)  # not recovering, nor recovered yet
        recovery.completed.set()
        assert recovered(app)
        tp = TP(table.changelog_topic.get_topic_name(), 1)
        recovery.tp_to_table[tp] = table
        recovery.active_highwaters[tp] = 1000
        recovery.active_offsets[tp] = 400
        recovery.in_recovery = True
        assert recovery_remaining(app) == {"persons": 600}

    asyncio.run(main())


# ---- seam 7: bulk restore -----------------------------------------------------------------------------

def test_recovery_builds_active_offsets_after_the_highwaters_where_the_bulk_restore_hooks_in():
    """install_bulk_restore wraps Recovery._build_offsets: it must see the highwaters already built and
    come before the records are read, and its arguments must be what bulk_restore takes. (The restore
    itself runs on a real broker in every integration test: tests/helpers.py sets
    restore_bulk_min_records=1.)"""
    import inspect

    from faust.tables.recovery import Recovery
    from flywheel.runtime.faust_seams import install_bulk_restore

    source = " ".join(inspect.getsource(Recovery._restart_recovery.fun).split())  # a mode Service.task
    highwaters = source.index('_build_highwaters)( consumer, assigned_active_tps, active_highwaters, "active"')
    offsets = source.index('_build_offsets)( consumer, assigned_active_tps, active_offsets, "active"')
    seek = source.index("_seek_offsets")
    assert highwaters < offsets < seek
    assert list(inspect.signature(Recovery._build_offsets).parameters) == ["self", "consumer", "tps",
                                                                           "destination", "title"]

    async def main():
        app = faust.App("seams-bulk", broker="kafka://127.0.0.1:1", store="rocksdb://")
        install_bulk_restore(app, "127.0.0.1:1", min_records=10)
        recovery = app.tables.recovery
        assert "_build_offsets" in vars(recovery)  # this instance's, wrapped
        assert hasattr(recovery, "active_highwaters") and hasattr(recovery, "tp_to_table")

    asyncio.run(main())
