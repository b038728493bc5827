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
metrics/ (person state, partials; wired by aggregates.py) and sink.py. Delivery is at-least-once
with idempotent application: the dedup table remembers where a messageId was first seen, so a
redelivered record is forwarded again (and collapses in ClickHouse) while an SDK retry (same
messageId, another record) is dropped.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import faust
import orjson

from flywheel import identity
from flywheel import observability as obs
from flywheel.aggregates import AggregateStage
from flywheel.clickhouse import ClickHouse
from flywheel.clickhouse.rows import identity_rows, invalid_row, partial_row
from flywheel.config import Settings
from flywheel.metrics.definitions import load_metrics
from flywheel.plan import load_plan
from flywheel.read_committed import ReadCommittedTransport
from flywheel.sink import Sink
from flywheel.validate import Invalid, Limits, Raw, validate

log = logging.getLogger(__name__)

HEADER_SOURCE = "flywheel-source"
HEADER_RECEIVED_AT = "flywheel-received-at"  # epoch ms, stamped by the collector / producer
PARTIAL_TABLES = {"funnels": "funnel_partials", "retention": "retention_partials",
                  "active_users": "active_user_partials"}


def raw_from_message(message, *, topic: str) -> Raw:
    """Where a raw record came from: source and receivedAt from headers, else the Kafka timestamp."""
    headers = dict(message.headers or ())
    source = headers.get(HEADER_SOURCE, b"kafka").decode("utf-8", "replace")
    stamped = headers.get(HEADER_RECEIVED_AT)
    try:
        received_ms = int(stamped) if stamped is not None else int(message.timestamp * 1000)
    except ValueError:
        received_ms = int(message.timestamp * 1000)
    return Raw(
        value=message.value if isinstance(message.value, bytes) else bytes(message.value or b""),
        source=source,
        received_at=datetime.fromtimestamp(received_ms / 1000, tz=UTC),
        topic=topic, partition=message.partition, offset=message.offset,
    )


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
        # Batch produce requests (events.identified + the table changelog: two sends per event). With
        # Faust's default 0 s every send became its own tiny request and the socket writes were ~20% of
        # the worker's CPU (bench/pipeline.py profile); 50 ms adds at most that to a hop's latency.
        producer_linger=0.05,
        web_port=settings.http_port,
        web_bind="0.0.0.0",
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        # The collector (/v1/*) decodes gzip bodies itself, bounded: aiohttp must not (collector/server.py).
        web_application_options={"handler_args": {"auto_decompress": False}},
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

    @app.agent(raw_topic)
    async def ingest(stream):
        async for event in stream.events():
            raw = raw_from_message(event.message, topic=names.raw)
            obs.RECEIVED.labels(raw.source).inc()
            outcome = validate(raw, plan, limits)
            if isinstance(outcome, Invalid):
                obs.INVALID.labels(raw.source).inc()
                await invalid_topic.send(key=event.key, value=orjson.dumps(outcome.dlq_record()))
                continue
            obs.VALID.labels(raw.source).inc()
            ev = outcome.event
            mid = ev["messageId"].encode()
            here = raw.origin.encode()
            seen = first_seen.get(mid)
            if seen is None:
                first_seen[mid] = here
            elif seen != here:
                obs.DUPLICATES.labels(raw.source).inc()
                continue
            await resolve_identity(ev, raw)
            await identified_topic.send(key=ev["personId"].encode(), value=orjson.dumps(ev))

    async def resolve_identity(ev: dict, raw: Raw) -> None:
        """Set ev["personId"]; record a first link (identity.changes + the merge marker) or a conflict."""
        pair = identity.linked_ids(ev)
        lookup = pair[0] if pair else ("" if ev["userId"] else ev["anonymousId"] or ev["previousId"])
        entry = linked_users.get(lookup.encode()) if lookup else None
        # Table value: b"<user>\x00<origin of the linking record>".
        linked_user, _, linked_by = entry.decode().partition("\x00") if entry is not None else (None, "", None)
        result = identity.resolve(ev, linked_user, linked_by=linked_by, origin=raw.origin)
        ev["personId"] = result.person_id
        if result.link is not None:
            anon, user = result.link.anonymous_id, result.link.user_id
            linked_users[anon.encode()] = f"{user}\x00{raw.origin}".encode()
            obs.IDENTITY_LINKS.inc()
            change = {"type": "link", "anonymousId": anon, "userId": user,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            await changes_topic.send(key=anon.encode(), value=orjson.dumps(change))
            # Keyed by the anonymous id: it follows all of that id's earlier events on its partition
            # of events.identified, so their owner hands the state over only after applying them.
            marker = {"type": "merge", "from": anon, "into": user,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            await identified_topic.send(key=anon.encode(), value=orjson.dumps(marker))
        elif result.conflict is not None:
            c = result.conflict
            obs.IDENTITY_CONFLICTS.labels(raw.source).inc()
            log.info("identity conflict: %s stays with %s, refused %s (messageId %s)",
                     c.anonymous_id, c.linked_to, c.refused, ev["messageId"])
            change = {"type": "conflict", "anonymousId": c.anonymous_id, "linkedTo": c.linked_to,
                      "refused": c.refused, "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            await changes_topic.send(key=c.anonymous_id.encode(), value=orjson.dumps(change))

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
