"""The worker's Faust consumer reads events.raw with isolation_level=read_committed (read_committed.py)."""

import asyncio

import faust
from flywheel.read_committed import READ_COMMITTED, ReadCommittedTransport


def worker_consumer(app: faust.App):
    async def build():
        thread = app.consumer._new_consumer_thread()
        return thread._create_worker_consumer(app.transport)

    return asyncio.run(build())


def test_the_worker_consumer_is_read_committed_without_exactly_once():
    app = faust.App("rc-test", broker="kafka://127.0.0.1:1", store="memory://")
    app.transport = ReadCommittedTransport(app.conf.broker_consumer, app)
    assert app.conf.processing_guarantee.value == "at_least_once"
    assert worker_consumer(app)._isolation_level == READ_COMMITTED


def test_plain_faust_would_read_uncommitted():
    """Why the transport exists: if this fails, Faust changed and read_committed.py can go."""
    app = faust.App("rc-test-plain", broker="kafka://127.0.0.1:1", store="memory://")
    assert worker_consumer(app)._isolation_level == "read_uncommitted"
