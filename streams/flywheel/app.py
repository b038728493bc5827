"""The Faust application: topics, tables and thin agents around the pure stages.

Stages, in the order data flows (DESIGN §1):

    events.raw ──ingest──▶ validate ──▶ dedup (messageId) ──▶ identity ──▶ events.identified
                              │                                   ├──▶ identity.changes
                              └──────▶ events.invalid              └──▶ merge marker (events.identified, key = anon id)
    events.identified ──aggregate─────▶ person state ──▶ metrics.funnels / .retention / .active_users
                              └─────────▶ flywheel.events (with the late flag)
    metrics.*         ──sink_partials─▶ flywheel.{funnel,retention,active_user}_partials
    events.invalid    ──sink_invalid──▶ flywheel.invalid_events
    identity.changes  ──sink_identity─▶ flywheel.identity_map / identity_conflicts

Agents only loop, read/write tables and send on; the semantics live in validate.py, identity.py,
metrics/ (person state, partials; wired by aggregates.py), ingest.py (the ingest stage, a batch of raw
records at a time) and sink.py. Delivery is at-least-once with idempotent application: the dedup table
remembers where a messageId was first seen, so a redelivered record is forwarded again (and collapses
in ClickHouse) while an SDK retry (same messageId, another record) is dropped.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import faust
import orjson

from flywheel.aggregates import AggregateStage
from flywheel.clickhouse import ClickHouse
from flywheel.clickhouse.rows import identity_rows, invalid_row, partial_row
from flywheel.config import Settings
from flywheel.fastpath import LeanMonitor
from flywheel.ingest import HEADER_RECEIVED_AT as HEADER_RECEIVED_AT  # imported from here by the collector
from flywheel.ingest import HEADER_SOURCE as HEADER_SOURCE  # and flywheel.producer
from flywheel.ingest import Ingest
from flywheel.metrics.definitions import load_metrics
from flywheel.plan import load_plan
from flywheel.read_committed import ReadCommittedTransport
from flywheel.sink import Sink
from flywheel.validate import Limits

log = logging.getLogger(__name__)

# Raw records per ingest batch, and how long a batch waits to fill (the latency added when traffic is light).
INGEST_BATCH_SIZE = 2000
INGEST_BATCH_SECONDS = 0.1
PARTIAL_TABLES = {"funnels": "funnel_partials", "retention": "retention_partials",
                  "active_users": "active_user_partials"}


def create_app(settings: Settings, ch: ClickHouse) -> faust.App:
    plan = load_plan(settings.tracking_plan)
    metrics = load_metrics(settings.metrics)
    limits = Limits(
        max_event_bytes=settings.max_event_bytes, max_future=timedelta(seconds=settings.max_future_seconds)
    )
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=settings.store,
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        producer_acks=-1,
        # Batch the produce requests of Faust's own per-record sends (Topic.send, Table writes outside
        # ingest, which batches its own). With Faust's default 0 s each send was its own tiny request (the
        # socket writes were ~20% of the worker's CPU when ingest still sent per event); 50 ms adds at
        # most that to a hop's latency.
        producer_linger=0.05,
        # Ingest sends each batch's outputs as one record batch per partition (ingest.Outbox); with the
        # default 16 KB a batch of events.identified records needs a dozen, each queued behind the last.
        producer_max_batch_size=512 * 1024,
        web_port=settings.http_port,
        web_bind="0.0.0.0",
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        # The collector (/v1/*) decodes gzip bodies itself, bounded: aiohttp must not (collector/server.py).
        web_application_options={"handler_args": {"auto_decompress": False}},
        # Records a stream may hold before its partitions are paused. Faust's 4096 kept the raw stream's
        # buffer full while ingest worked on a batch, so the fetcher blocked on every record (a task and
        # a wait each); a fetch's worth fits in 32k. Memory: ~32k raw events per stream at most.
        stream_buffer_maxsize=32768,
        monitor=LeanMonitor(),  # Faust's per-event statistics cost CPU and nothing reads them (fastpath.py)
    )
    # The collector writes events.raw in Kafka transactions: read only committed ones, so a request
    # the collector rejected (aborted) is never processed. Faust alone would not (read_committed.py).
    app.transport = ReadCommittedTransport(app.conf.broker_consumer, app)
    names = settings.topics
    raw_topic = app.topic(names.raw, key_type=bytes, value_type=bytes)
    invalid_topic = app.topic(names.invalid, key_type=bytes, value_type=bytes)
    identified_topic = app.topic(names.identified, key_type=bytes, value_type=bytes)
    changes_topic = app.topic(names.identity_changes, key_type=bytes, value_type=bytes)
    metric_topics = {
        kind: app.topic(getattr(names, kind), key_type=bytes, value_type=bytes)
        for kind in ("funnels", "retention", "active_users")
    }

    # messageId → origin (topic/partition@offset) of the raw record that first carried it. Co-partitioned with
    # events.raw (an SDK retry has the same key, so the same partition).
    first_seen = app.Table(
        "message-ids", default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes
    )
    # anonymous id → the user it was first linked to (DESIGN §3). Co-partitioned with events.raw, which
    # is keyed by the anonymous id (an alias by its previousId): every link of an id is decided on
    # its own partition, in order.
    linked_users = app.Table(
        "identity", default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes
    )

    # person id → the person's state (metrics/person.py), co-partitioned with events.identified. The single
    # source of truth for funnels, retention and active users (DESIGN §4).
    persons = app.Table("persons", default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes)

    # chdb calls are synchronous C++: one dedicated thread keeps them off the event loop.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    async def dead_letter(table: str, row: dict, reason: str) -> None:
        if table == "flywheel.invalid_events":
            log.error("dropping a DLQ row ClickHouse refuses (%s): %r", reason, row)
            return
        record = {
            "receivedAt": int(datetime.now(UTC).timestamp() * 1000),
            "source": str(row.get("source", "")),
            "reasons": [reason],
            "payload": orjson.dumps(row, default=str).decode(),
            "payloadEncoding": "utf-8",
            "origin": f"sink:{table}:{row.get('message_id', '')}",
        }
        await invalid_topic.send(value=orjson.dumps(record))

    sink = Sink(ch, executor, dead_letter=dead_letter, max_backoff=settings.sink_max_backoff_seconds)

    ingest_stage = Ingest(plan=plan, limits=limits, topics=names, first_seen=first_seen, linked_users=linked_users)

    @app.agent(raw_topic)
    async def ingest(stream):
        # A batch at a time (ingest.py): its outputs are in Kafka before take_events acks its records.
        producer = (await app.maybe_start_producer())._ensure_producer()  # Faust's aiokafka producer
        async for events in stream.take_events(INGEST_BATCH_SIZE, within=INGEST_BATCH_SECONDS):
            await ingest_stage.handle(events, producer)

    async def send_acked(topic: str, key: bytes, value: bytes):
        # Delivery is awaited (not left to Faust's commit): the person table is written only after this.
        return await (await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None))

    def identified_partitions() -> int:
        # Rebuilding partials maps each person to its partition as the producer did: the topic's real
        # partition count matters (a topic created before with another FLYWHEEL_PARTITIONS).
        return app.consumer.topic_partitions(names.identified) or settings.partitions

    stage = AggregateStage(metrics=metrics, persons=persons, partitions=identified_partitions, sink=sink,
                           producer_send=send_acked, topics=names)

    @app.on_partitions_revoked.connect
    async def _revoked(*args, **kwargs) -> None:
        stage.forget()  # partials are rebuilt from the person table for the next assignment

    @app.agent(identified_topic)
    async def aggregate(stream):
        async for batch in stream.take_events(settings.sink_batch_size, within=settings.sink_flush_seconds):
            await stage.process(batch)

    def partial_sink(kind: str):
        async def sink_partials(stream):
            async for batch in stream.take(settings.sink_batch_size, within=settings.sink_flush_seconds):
                rows = [partial_row(kind, orjson.loads(v)) for v in batch]
                await sink.write(f"flywheel.{PARTIAL_TABLES[kind]}", rows)
        sink_partials.__name__ = f"sink_{kind}"
        sink_partials.__qualname__ = f"sink_{kind}"
        return sink_partials

    for kind, topic in metric_topics.items():
        app.agent(topic, name=f"flywheel.app.sink_{kind}")(partial_sink(kind))

    @app.agent(changes_topic)
    async def sink_identity(stream):
        async for batch in stream.take(settings.sink_batch_size, within=settings.sink_flush_seconds):
            by_table: dict[str, list[dict]] = {}
            for value in batch:
                table, row = identity_rows(orjson.loads(value))
                by_table.setdefault(table, []).append(row)
            for table, rows in by_table.items():
                await sink.write(table, rows)

    @app.agent(invalid_topic)
    async def sink_invalid(stream):
        async for batch in stream.take(settings.sink_batch_size, within=settings.sink_flush_seconds):
            await sink.write("flywheel.invalid_events", [invalid_row(orjson.loads(v)) for v in batch])

    from flywheel.collector.server import register_collector
    from flywheel.web import register_routes

    register_routes(app, settings=settings, ch=ch, executor=executor)
    register_collector(app, settings=settings)  # Segment HTTP API /v1/* on the same port
    return app
