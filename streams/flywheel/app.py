"""The Faust application: topics, tables and the stages each topic's records are handed to, a batch at a time.

Stages, in the order data flows (DESIGN §1):

    events.raw ──ingest──▶ validate ──▶ dedup (messageId) ──▶ identity ──▶ events.identified
                              │                                   ├──▶ identity.changes
                              └──────▶ events.invalid              └──▶ merge marker (events.identified, key = anon id)
    events.identified ──aggregate─────▶ person state ──▶ metrics.funnels / .retention / .active_users
                              └─────────▶ flywheel.events (with the late flag)
    metrics.*         ──sink_partials─▶ flywheel.{funnel,retention,active_user}_partials
    events.invalid    ──sink_invalid──▶ flywheel.invalid_events
    identity.changes  ──sink_identity─▶ flywheel.identity_map / identity_conflicts

Each topic's records reach its stage a fetched batch at a time (batches.py), not through Faust agents
and streams, whose per-record plumbing cost most of the worker's CPU; Faust keeps the group, the
co-partitioned assignment, the tables and the commits. The stages are thin: the semantics live in
validate.py, identity.py, metrics/ (person state, partials; wired by aggregates.py), ingest.py (the
ingest stage) and sink.py. Delivery is at-least-once with idempotent application: the dedup table
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
from flywheel.batches import BatchTopics
from flywheel.clickhouse import ClickHouse
from flywheel.clickhouse.rows import identity_rows, invalid_row, partial_row
from flywheel.config import Settings
from flywheel.fastpath import LeanMonitor
from flywheel.ingest import HEADER_RECEIVED_AT as HEADER_RECEIVED_AT  # imported from here by the collector
from flywheel.ingest import HEADER_SOURCE as HEADER_SOURCE  # and flywheel.producer
from flywheel.ingest import Ingest
from flywheel.metrics.definitions import load_metrics
from flywheel.outbox import Outbox
from flywheel.plan import load_plan
from flywheel.read_committed import ReadCommittedTransport
from flywheel.sink import Sink
from flywheel.validate import Limits

log = logging.getLogger(__name__)

# Records per batch at most: what queued up while the previous batch was handled, up to this.
BATCH_RECORDS = 5000
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
        # Every hot-path write goes through an Outbox (outbox.py), already one record batch per partition;
        # what is left on Faust's per-record send path (dead letters from the sink, Faust's own table
        # writes) is batched for 50 ms rather than sent as one tiny request each.
        producer_linger=0.05,
        # A stage sends each batch's outputs as one record batch per partition (outbox.py); with the
        # default 16 KB a batch of events.identified records needs a dozen, each queued behind the last.
        producer_max_batch_size=512 * 1024,
        web_port=settings.http_port,
        web_bind="0.0.0.0",
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        # The collector (/v1/*) decodes gzip bodies itself, bounded: aiohttp must not (collector/server.py).
        web_application_options={"handler_args": {"auto_decompress": False}},
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
    batches = app.flywheel_batches = BatchTopics()  # read by the consumer's fetch loop (fastpath.py)

    async def producer():
        return (await app.maybe_start_producer())._ensure_producer()  # Faust's aiokafka producer

    async def ingest(messages):
        # Its outputs are in Kafka before the batch's records are acked (ingest.py, batches.py).
        await ingest_stage.handle(messages, await producer())

    batches.add(app, raw_topic, ingest, name="ingest", max_records=BATCH_RECORDS)

    async def outbox(topics):
        return await Outbox.for_topics(await producer(), topics)

    def identified_partitions() -> int:
        # Rebuilding partials maps each person to its partition as the producer did: the topic's real
        # partition count matters (a topic created before with another FLYWHEEL_PARTITIONS).
        return app.consumer.topic_partitions(names.identified) or settings.partitions

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == names.identified}

    stage = AggregateStage(metrics=metrics, persons=persons, partitions=identified_partitions, owned=owned_partitions,
                           sink=sink, outbox=outbox, topics=names)

    @app.on_partitions_revoked.connect
    async def _revoked(*args, **kwargs) -> None:
        stage.forget()  # partials are rebuilt from the person table for the next assignment

    # Lingers like the sinks: each batch inserts its events' rows.
    batches.add(app, identified_topic, stage.process, name="aggregate", max_records=BATCH_RECORDS,
                linger=settings.sink_flush_seconds)

    sink_batches = {"max_records": settings.sink_batch_size, "linger": settings.sink_flush_seconds}

    def partial_sink(kind: str):
        async def sink_partials(messages):
            rows = [partial_row(kind, orjson.loads(m.value)) for m in messages]
            await sink.write(f"flywheel.{PARTIAL_TABLES[kind]}", rows)
        return sink_partials

    for kind, topic in metric_topics.items():
        batches.add(app, topic, partial_sink(kind), name=f"sink_{kind}", **sink_batches)

    async def sink_identity(messages):
        by_table: dict[str, list[dict]] = {}
        for m in messages:
            table, row = identity_rows(orjson.loads(m.value))
            by_table.setdefault(table, []).append(row)
        for table, rows in by_table.items():
            await sink.write(table, rows)

    batches.add(app, changes_topic, sink_identity, name="sink_identity", **sink_batches)

    async def sink_invalid(messages):
        await sink.write("flywheel.invalid_events", [invalid_row(orjson.loads(m.value)) for m in messages])

    batches.add(app, invalid_topic, sink_invalid, name="sink_invalid", **sink_batches)

    from flywheel.collector.server import register_collector
    from flywheel.web import register_routes

    register_routes(app, settings=settings, ch=ch, executor=executor)
    register_collector(app, settings=settings)  # Segment HTTP API /v1/* on the same port
    return app
