"""The worker: its Faust app (topics, tables), the stage each topic's records are handed to, and its two
HTTP listeners. Wiring only: what a stage does is in stages/, how records reach it in delivery.py.

Stages, in the order data flows (docs/design.md §1):

    events.raw ──ingest──▶ validate ──▶ dedup (messageId) ──▶ identity ──▶ events.identified
                              │                                   ├──▶ identity.changes
                              └──────▶ events.invalid              └──▶ merge marker (events.identified, key = anon id)
    events.identified ──aggregate─────▶ person state ──▶ metrics.funnels / .retention / .active_users / .lifecycle
                              │                      │    / .experiments
                              │                      └──▶ segments.changes (Audience Entered / Exited; also
                              │                           when a due time comes: the sweep)
                              └─────────▶ flywheel.events (with the late flag)
    alerts.series     ──alerts────────▶ each rule's evaluator (shares from ingest and aggregate, progress
                                        markers from the Ticker through both) ──▶ alerts
    alerts            ──notify────────▶ flywheel.alert_events, webhooks
    metrics.*         ──sink──────────▶ flywheel.{funnel,retention,active_user,lifecycle,experiment}_partials
    segments.changes  ──sink──────────▶ flywheel.segment_changes
    segments.rfm      ──sink──────────▶ flywheel.rfm_values
    definitions       ──sink──────────▶ flywheel.definition_changes (the audit trail; workers follow the topic
                                        itself: runtime/definitions.py)
    events.invalid    ──sink──────────▶ flywheel.invalid_events
    identity.changes  ──sink──────────▶ flywheel.identity_map / identity_conflicts
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faust
from aiokafka import AIOKafkaProducer
from mode import Service

from flywheel.clickhouse import ClickHouse
from flywheel.collector.server import Collector, collector_app
from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics, read_metrics_file
from flywheel.metrics.store import Stored
from flywheel.model.plan import load_plan
from flywheel.registry import InForce, check
from flywheel.runtime import faust_seams
from flywheel.runtime.definitions import DefinitionsWatch
from flywheel.runtime.delivery import BatchTopics
from flywheel.runtime.outbox import Outbox, Outboxes
from flywheel.runtime.partitioner import partition_of
from flywheel.runtime.retry import RetryPolicy
from flywheel.runtime.status import WorkerStatus
from flywheel.runtime.ticker import Ticker
from flywheel.runtime.topics import ALERTS, FIRST_SEEN, IDENTITY, PERSONS, TABLES
from flywheel.stages.aggregate import AggregateStage, owner_of
from flywheel.stages.alerts import RULE, SHARES, AlertStage, NotifyStage
from flywheel.stages.ingest import Ingest
from flywheel.stages.sink import Sink, SinkStage
from flywheel.web.admin import add_experiments, add_sql, add_status, admin_app
from flywheel.web.health import KafkaProbe
from flywheel.web.server import Listener
from flywheel.web.ui import Dashboard, add_ui
from flywheel.web.users import Users
from flywheel.web.webhooks import Webhooks

log = logging.getLogger(__name__)

# Records per batch at most: what queued up while the previous batch was handled, up to this.
BATCH_RECORDS = 5000
PROGRESS_SECONDS = 10.0


@dataclass
class Pipeline:
    """What `flywheel worker` runs: faust.Worker(app, *services)."""

    app: faust.App
    services: list[Service]


class Listeners(Service):
    """The public collector and the admin listener, up from the worker's start (before table recovery)."""

    def __init__(self, listeners: list[Listener], **kwargs):
        super().__init__(**kwargs)
        self.listeners = listeners

    async def on_start(self) -> None:
        for listener in self.listeners:
            await listener.start()

    async def on_stop(self) -> None:
        for listener in reversed(self.listeners):
            await listener.stop()


class Stopping(Service):
    """Calls each of `callbacks` on the worker's stop, awaiting those that return an awaitable (the aggregate
    stage's sweep, the webhooks' HTTP session)."""

    def __init__(self, *callbacks, **kwargs):
        super().__init__(**kwargs)
        self._callbacks = callbacks

    async def on_stop(self) -> None:
        for callback in self._callbacks:
            result = callback()
            if inspect.isawaitable(result):
                await result


class Progress(Service):
    """While Faust restores the tables from their changelogs, one line every PROGRESS_SECONDS per table:
    `restoring persons: 40% (400,000 of 1,000,000 changelog records)`."""

    def __init__(self, app: faust.App, **kwargs):
        super().__init__(**kwargs)
        self.app = app
        self._totals: dict[str, int] = {}

    @Service.task
    async def _report(self) -> None:
        while not self.should_stop:
            await self.sleep(PROGRESS_SECONDS)
            remaining = faust_seams.recovery_remaining(self.app)
            if remaining is None:
                self._totals.clear()
                continue
            for table, left in sorted(remaining.items()):
                total = self._totals.setdefault(table, left)  # what was left when first seen
                if total and left:
                    log.info("restoring %s: %.0f%% (%s of %s changelog records)", table,
                             100 * (total - left) / total, f"{total - left:,}", f"{total:,}")


class Output(Service):
    """The producer every stage's outbox sends through (acks=all), started on first use."""

    def __init__(self, settings: Settings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        self.topics = list(settings.topics.model_dump().values())
        self._outboxes: Outboxes | None = None
        self._lock = asyncio.Lock()

    async def outbox(self) -> Outbox:
        if self._outboxes is None:
            async with self._lock:
                if self._outboxes is None:
                    producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                                client_id=f"{self.settings.app_id}-outbox",
                                                max_batch_size=512 * 1024, linger_ms=0)
                    await producer.start()
                    self._outboxes = Outboxes(producer)
        return await self._outboxes.new(self.topics)

    async def on_stop(self) -> None:
        if self._outboxes is not None:
            await self._outboxes.producer.stop()


def partitions_text(tps, topics: dict) -> str:
    """`events.raw 0-3, 6; events.identified 0-7` for the pipeline's topics among `tps`."""
    names = {t.get_topic_name() for t in topics.values()}
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        if tp.topic in names:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
    parts = []
    for name in sorted(by_topic):
        ps, runs = sorted(by_topic[name]), []
        for p in ps:
            if runs and p == runs[-1][1] + 1:
                runs[-1][1] = p
            else:
                runs.append([p, p])
        parts.append(f"{name} " + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs))
    return "; ".join(parts) or "nothing"


def rocksdb_memory(budget_mb: int, *, tables: int, partitions: int) -> dict[str, int]:
    """RocksDB options (Faust's Table options) keeping a worker's tables within `budget_mb`: each table
    partition gets an even share, half for two write buffers, half for its block cache. Faust's defaults —
    3 × 64 MB write buffers and a 2 GB block cache per partition — let 24 partitions grow to gigabytes."""
    share = budget_mb * 2**20 // (tables * partitions)
    return {"write_buffer_size": max(2**20, share // 4), "max_write_buffer_number": 2,
            "block_cache_size": max(2**20, share // 2)}


def create_worker(settings: Settings, ch: ClickHouse, *, sql_token: str | None = None,
                  definitions: InForce | None = None) -> Pipeline:
    """The worker under the definitions in force (registry.seed at start-up; without: the metrics file's,
    nothing stored or followed — for tests that only look at the app)."""
    plan = load_plan(settings.tracking_plan)
    if definitions is None:
        definitions = InForce(check(settings, read_metrics_file(settings.metrics), source=str(settings.metrics)),
                              Stored(), "file")
    metrics = definitions.metrics
    batches = BatchTopics()
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=settings.store,
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_seconds,
        web_enabled=False,  # the worker's listeners are its own (Listeners)
        monitor=faust_seams.LeanMonitor(),
    )
    faust_seams.install_transport(app, batches)
    faust_seams.install_bulk_restore(app, settings.kafka_bootstrap, min_records=settings.restore_bulk_min_records)
    names = settings.topics
    topic = {name: app.topic(getattr(names, name), key_type=bytes, value_type=bytes)
             for name in names.model_fields}
    policy = RetryPolicy(max_backoff=settings.sink_max_backoff_seconds)
    output = Output(settings)

    # the budget goes to the three large tables; the alerts table holds a few keys per rule
    memory = rocksdb_memory(settings.store_memory_mb, tables=len(TABLES) - 1, partitions=settings.partitions)
    small = {"write_buffer_size": 2**20, "max_write_buffer_number": 2, "block_cache_size": 2**20}

    def table(name: str, owner, options: dict = memory) -> faust_seams.StoreTable:
        t = app.Table(name, default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes,
                      options=options)
        return faust_seams.StoreTable(t, owner)

    def partitions(topic_name: str) -> int:
        # the topic's real partition count (a topic created before with another FLYWHEEL_PARTITIONS)
        return app.consumer.topic_partitions(topic_name) or settings.partitions

    # Tables co-partitioned with events.raw: messageId → origin of the record that first carried it;
    # anonymous id → the user it was first linked to (docs/design.md §3).
    first_seen = table(FIRST_SEEN, lambda key: partition_of(key, partitions(names.raw)))
    linked_users = table(IDENTITY, lambda key: partition_of(key, partitions(names.raw)))
    # Co-partitioned with events.identified: person id → state, the single source of truth (§4).
    persons = table(PERSONS, lambda key: owner_of(key, lambda k: partition_of(k, partitions(names.identified))))

    def rule_partition(name: str) -> int:
        return partition_of(name.encode(), partitions(names.alert_series))

    def alert_owner(key: bytes) -> int:  # s|<rule> and r|<rule>: the rule's partition
        return rule_partition(key[len(RULE):].decode() if key[:2] in (RULE, SHARES) else key.decode())

    # Co-partitioned with alerts.series: each rule's shares and state (stages/alerts.py).
    alert_table = table(ALERTS, alert_owner, small)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")  # chdb calls block
    sink = Sink(ch, executor, is_bad_data=policy.is_bad_data, outbox=output.outbox, invalid_topic=names.invalid)
    ingest = Ingest(plan=plan, limits=settings.limits(), topics=names, first_seen=first_seen,
                    linked_users=linked_users, outbox=output.outbox, dedup_horizon_days=settings.dedup_horizon_days,
                    alerts=metrics.alerts)
    alert_stage = AlertStage(metrics=metrics, table=alert_table, outbox=output.outbox, topics=names,
                             rule_partition=rule_partition, clock=settings.clock())
    webhooks = Webhooks(settings.alert_webhooks)
    notify = NotifyStage(metrics=metrics, post=webhooks.post)
    aggregate = AggregateStage(metrics=metrics, persons=persons, sink=sink, outbox=output.outbox, topics=names,
                               retry=lambda attempt, name, size: policy.run(attempt, name=name, size=size),
                               clock=settings.clock(), sweep_seconds=settings.segment_sweep_seconds,
                               revision=definitions.stored.revision, backfill_page=settings.backfill_page_events,
                               backfill_pause=settings.backfill_pause_seconds)
    sinks = SinkStage(sink)

    def owned() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == names.identified}

    async def rewind_uncommitted() -> None:
        """Partitions of our topics with no committed offset start again from their beginning.

        Why: records of a partition fetched before a rebalance are dropped unacked (delivery.py), and Faust
        seeks to the committed offset to fetch them again — but aiokafka does not seek when there is none
        (or it is 0), and Faust then commits the next acked records past them: lost. A fresh group whose
        first rebalance comes before its first commit would lose its first records. From the beginning is
        where a partition without a commit starts anyway (consumer_auto_offset_reset=earliest)."""
        stream = {t.get_topic_name() for t in topic.values()}
        tps = {tp for tp in app.consumer.assignment() if tp.topic in stream}
        if not tps:
            return
        committed = await app.consumer.seek_to_committed()
        fresh = sorted(tp for tp in tps if not committed.get(tp))
        if fresh:
            for tp, earliest in (await app.consumer.earliest_offsets(*fresh)).items():
                await app.consumer.seek(tp, earliest)
            log.info("no committed offset yet: from the beginning for %s", partitions_text(fresh, topic))

    @persons.table.on_recover
    async def _recovered() -> None:
        await rewind_uncommitted()
        aggregate.assigned(owned())

    @app.on_partitions_revoked.connect
    async def _revoked(app_: faust.App, revoked, **kwargs) -> None:
        await aggregate.handing_over({tp.partition for tp in revoked if tp.topic == names.identified})
        alert_stage.revoked([tp.partition for tp in revoked if tp.topic == names.alert_series])

    @app.on_partitions_assigned.connect
    async def _assigned(app_: faust.App, assigned, **kwargs) -> None:
        log.info("assigned (generation %d): %s", app.consumer_generation_id, partitions_text(assigned, topic))

    flush = {"max_records": settings.sink_batch_size, "linger": settings.sink_flush_seconds}
    batches.add(app, topic["raw"], ingest.handle, name="ingest", retry=policy, max_records=BATCH_RECORDS)
    # Lingers a little: each batch inserts its events' rows and publishes its cells (the live numbers' delay).
    batches.add(app, topic["identified"], aggregate.process, name="aggregate", retry=policy,
                max_records=BATCH_RECORDS, linger=settings.aggregate_linger_seconds)
    for kind in ("funnels", "retention", "active_users", "lifecycle", "experiments"):
        batches.add(app, topic[kind], sinks.partials(kind), name=f"sink_{kind}", retry=policy, **flush)
    batches.add(app, topic["identity_changes"], sinks.identity, name="sink_identity", retry=policy, **flush)
    batches.add(app, topic["invalid"], sinks.invalid, name="sink_invalid", retry=policy, **flush)
    batches.add(app, topic["segments"], sinks.segments, name="sink_segments", retry=policy, **flush)
    batches.add(app, topic["rfm"], sinks.rfm, name="sink_rfm", retry=policy, **flush)
    batches.add(app, topic["definitions"], sinks.definitions, name="sink_definitions", retry=policy, **flush)
    batches.add(app, topic["alert_series"], alert_stage.process, name="alerts", retry=policy,
                max_records=BATCH_RECORDS)

    async def on_alerts(records) -> None:  # stored first: a webhook outage does not hold the table back
        await sinks.alerts(records)
        await notify.process(records)
    batches.add(app, topic["alerts"], on_alerts, name="notify", retry=policy)

    kafka = KafkaProbe(settings.kafka_bootstrap)
    status = WorkerStatus(app, topics=names, sink=sink, retry=policy, max_lag=settings.ready_max_lag,
                          stages={bt.name: bt.topic_name for bt in batches.values()},
                          tables={"dedup": first_seen, "identity": linked_users, "persons": persons})
    admin = admin_app(role="worker", checks=[kafka, status.clickhouse, status.recovery, status.behind])
    add_status(admin, status.status)
    if sql_token is not None:  # embedded ClickHouse (a server is queried directly by `flywheel sql`)
        add_sql(admin, ch=ch, executor=executor, token=sql_token, port=settings.admin_port)
    dashboard = Dashboard(settings, metrics, Users(settings.data_dir), sink.query) if settings.ui else None
    if dashboard is not None:  # the users file closes with the admin listener
        dashboard.use(definitions)
        add_ui(admin, dashboard)
    collector = Collector.from_settings(settings, metrics)
    listeners = Listeners([
        Listener(collector_app(collector, kafka=kafka), host=settings.http_host,
                 port=settings.http_port, name="collector"),
        Listener(admin, host=settings.admin_host, port=settings.admin_port, name="admin"),
    ])
    async def on_change(new: Metrics, stored: Stored) -> None:
        """A new revision of the stored definitions, while running (docs/design.md §13)."""
        collector.use(new)
        ingest.use(new.alerts)
        notify.use(new)
        await alert_stage.use(new)
        experiments.clear()
        experiments.update({e.name: e for e in new.experiments})
        if dashboard is not None:
            dashboard.use(InForce(new, stored, "stored"))
        await aggregate.use(new, stored.revision)

    experiments = add_experiments(admin, metrics=metrics, query=sink.query)
    services = [listeners, output, Progress(app), status, Stopping(aggregate.stop, webhooks.close),
                DefinitionsWatch(settings, definitions.stored, on_change)]
    # progress markers for alert rules, while any is in force (rules may come and go while running)
    services.append(Ticker(output.outbox, names.raw, clock=settings.clock(), seconds=settings.alert_tick_seconds,
                           active=lambda: bool(alert_stage.alerts)))
    return Pipeline(app, services)
