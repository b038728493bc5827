"""Make the Faust worker's consumer read with isolation_level=read_committed.

Why: the collector writes each request (or group of requests) to events.raw in a Kafka transaction
and aborts it when Kafka fails mid-way, so a rejected request never half-lands. That holds only if
the consumers skip aborted records, i.e. read_committed. faust-streaming 0.15.3 sets it only when
`processing_guarantee="exactly_once"` (see faust/transport/drivers/aiokafka.py
`AIOKafkaConsumerThread._create_worker_consumer`), which we do not use (DESIGN notes: open bugs).

How: a Transport whose consumer thread builds the worker consumer exactly as Faust does, then sets
the isolation level before the consumer starts (aiokafka reads it in `start()`, when it creates its
fetcher). Installed in app.py with `app.transport = ReadCommittedTransport(...)`. Everything else —
offset commits, gaps left by transaction markers and aborted records (Faust tracks them), table
changelogs (not transactional, unaffected) — is Faust's own code, unchanged.

Checked by tests/integration/test_collector_kafka.py (an aborted transaction never reaches
flywheel.events) and tests/unit/test_read_committed.py (the setting reaches aiokafka).
Revisit when upgrading faust-streaming or aiokafka (both pinned in pyproject.toml).
"""

from __future__ import annotations

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka

from flywheel.fastpath import DirectHandoff

READ_COMMITTED = "read_committed"


class ReadCommittedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_isolation_level"):
            raise RuntimeError(
                f"aiokafka {aiokafka.__version__} no longer keeps _isolation_level: "
                "update flywheel.read_committed for this version"
            )
        consumer._isolation_level = READ_COMMITTED
        return consumer


class ReadCommittedConsumer(DirectHandoff, faust_aiokafka.Consumer):
    """The worker's consumer: read_committed, and fetched records handed to the streams without a task
    per record (fastpath.py)."""

    def _new_consumer_thread(self) -> ReadCommittedConsumerThread:
        return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class ReadCommittedTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, with read_committed worker consumers."""

    Consumer = ReadCommittedConsumer
