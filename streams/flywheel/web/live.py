"""The UI's one subscription to Kafka, and the fan-out of page updates to open pages (docs/design.md §12).

`Feed` reads, with one consumer of its own (no consumer group, nothing committed), every partition of:
- metrics.funnels / retention / active_users / experiments, from the offsets the workers' sink has
  committed: everything before them is in ClickHouse, which gives the snapshot (`board.snapshot_sql`)
  taken after those offsets were read, so no record falls between the two; overlaps count once (versions);
- events.identified and events.invalid, from a little before their end: the live-events page, and the rates.
Every `WATCH_SECONDS` it also reads the workers' group offsets: lag for the overview, and — when the sink
has moved on a topic whose page is a ClickHouse query (data quality, segments, alerts) — a new query.

`Hub` holds the open pages: each update marks a page changed; each open page's stream wakes, takes the
page's data (computed once per change and shared by every page open with the same parameters) and sends
it. Nothing polls from the browser: Server-Sent Events carry the updates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics
from flywheel.web.board import BOARD_KINDS, Partials, Rate, Recent, load_snapshot, snapshot_sql

log = logging.getLogger(__name__)

WATCH_SECONDS = 2.0
RECENT_PER_PARTITION = 50  # events read back from the end of each events.* partition at start
Query = Callable[[str], Awaitable[list]]


@dataclass
class Page:
    """One page's data: `generation` grows with every change; `cache` holds the encoded data per parameters."""

    generation: int = 0
    as_of: float = 0.0  # epoch seconds: the data includes every record read up to then
    cache: dict[tuple, tuple[int, bytes]] = field(default_factory=dict)
    waiters: set[asyncio.Event] = field(default_factory=set)


class Hub:
    """Open pages subscribe to a page name; `changed(name)` wakes them."""

    def __init__(self, names: list[str], *, clock: Callable[[], float] = time.time):
        self.pages = {name: Page() for name in names}
        self.clock = clock

    def changed(self, name: str, *, as_of: float | None = None) -> None:
        page = self.pages[name]
        page.generation += 1
        page.as_of = as_of if as_of is not None else self.clock()
        page.cache.clear()
        for wake in page.waiters:
            wake.set()

    def subscribe(self, name: str) -> asyncio.Event:
        wake = asyncio.Event()
        wake.set()  # the first data goes out at once
        self.pages[name].waiters.add(wake)
        return wake

    def unsubscribe(self, name: str, wake: asyncio.Event) -> None:
        self.pages[name].waiters.discard(wake)

    def encoded(self, name: str, params: tuple, render: Callable[[], dict[str, Any]]) -> bytes:
        """The page's data for these parameters, rendered once per generation."""
        page = self.pages[name]
        held = page.cache.get(params)
        if held is not None and held[0] == page.generation:
            return held[1]
        body = orjson.dumps({"asOf": page.as_of, **render()}, default=str)
        page.cache[params] = (page.generation, body)
        return body

    def subscribers(self) -> int:
        return sum(len(p.waiters) for p in self.pages.values())


METRIC_PAGES = {"funnels": "funnels", "retention": "retention", "active_users": "active", "experiments": "experiments"}


class Feed:
    """The consumer behind the pages (see the module's text). `query` runs SQL on ClickHouse."""

    def __init__(self, settings: Settings, metrics: Metrics, hub: Hub, query: Query):
        self.settings = settings
        self.metrics = metrics
        self.hub = hub
        self.query = query
        names = settings.topics
        self.kind_of_topic = {getattr(names, kind): kind for kind in BOARD_KINDS}
        self.partials = Partials()
        self.snapshot_at: float | None = None  # when ClickHouse's snapshot was loaded (None: not yet)
        self.recent = Recent()
        self.valid_rate, self.invalid_rate = Rate(), Rate()
        self.lag: dict[str, int] = {}  # topic → the workers' group's lag on it (end − committed)
        self.clickhouse_error: str | None = None
        self.kafka_error: str | None = None
        self.committed: dict[tuple[str, int], int] = {}
        self._consumer = None
        self._admin = None
        self._live_from: dict[tuple[str, int], int] = {}
        self._tasks: list[asyncio.Task] = []
        self.sql_pages: dict[str, tuple[str, ...]] = {}  # page → the topics whose sink progress re-renders it
        self.on_sql_page: Callable[[str], Awaitable[None]] | None = None  # re-runs a ClickHouse page's queries

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start reading (once; later calls do nothing)."""
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._run(), name="ui-feed"),
                       asyncio.create_task(self._watch(), name="ui-watch")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self._consumer, self._admin):
            if client is not None:
                try:
                    await client.close()
                except Exception:  # closing a broken client: nothing left to do
                    pass

    async def _run(self) -> None:
        while True:
            try:
                await self._open()
                await self._snapshot()
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka down or a rebalance of topics: start over (the model is idempotent)
                if self.kafka_error is None:
                    log.warning("ui feed: %s; retrying", exc)
                self.kafka_error = str(exc) or type(exc).__name__
                self.hub.changed("overview")
                await self._close_consumer()
                await asyncio.sleep(2.0)

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.stop()
            except Exception:  # a consumer that broke: nothing to do
                pass

    async def _admin_client(self):
        from aiokafka.admin import AIOKafkaAdminClient

        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap, request_timeout_ms=10000)
            await admin.start()
            self._admin = admin
        return self._admin

    async def _open(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    client_id=f"{self.settings.app_id}-ui", max_partition_fetch_bytes=4 << 20)
        await consumer.start()
        self._consumer = consumer
        names = self.settings.topics
        metric_topics = list(self.kind_of_topic)
        event_topics = [names.identified, names.invalid]
        tps = []
        for topic in metric_topics + event_topics:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer._client.force_metadata_update()  # aiokafka learns new topics lazily
                partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                raise RuntimeError(f"topic {topic} has no partitions yet (has a worker started?)")
            tps += [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        committed = await self._group_offsets()
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        for tp in tps:
            if tp.topic in self.kind_of_topic:
                consumer.seek(tp, committed.get((tp.topic, tp.partition), begins[tp]))
            else:
                consumer.seek(tp, max(begins[tp], ends[tp] - RECENT_PER_PARTITION))
                self._live_from[(tp.topic, tp.partition)] = ends[tp]  # the rates count from here
        log.info("ui feed reading %d partitions of %s", len(tps), ", ".join(metric_topics + event_topics))
        self.kafka_error = None

    async def _group_offsets(self) -> dict[tuple[str, int], int]:
        admin = await self._admin_client()
        offsets = await admin.list_consumer_group_offsets(self.settings.app_id)
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def _snapshot(self) -> None:
        """ClickHouse's values of the metric cells; retried until ClickHouse answers."""
        if self.snapshot_at is not None:
            return  # kept across a reconnect: records only ever replace older versions
        while True:
            try:
                for kind in BOARD_KINDS:
                    load_snapshot(self.partials, kind, await self.query(snapshot_sql(kind)))
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._clickhouse_failed(exc)
                await asyncio.sleep(2.0)
        self.clickhouse_error = None
        self.snapshot_at = time.time()
        log.info("ui feed: snapshot of the metric cells loaded from ClickHouse")
        for page in METRIC_PAGES.values():
            self.hub.changed(page)

    def _clickhouse_failed(self, exc: BaseException) -> None:
        if self.clickhouse_error is None:
            log.warning("ui: a ClickHouse query failed (%s); retrying", exc)
        self.clickhouse_error = str(exc).strip() or type(exc).__name__

    async def _consume(self) -> None:
        consumer = self._consumer
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            now = time.time()
            for page in self.apply(batches):
                self.hub.changed(page, as_of=now)
            if batches:
                self.hub.changed("overview", as_of=now)

    def apply(self, batches: dict[Any, list]) -> set[str]:
        """Fetched records (per topic partition) into the model; the pages they changed."""
        names = self.settings.topics
        touched: set[str] = set()
        # the page keeps the newest `recent.size` events: at most that many are decoded per fetch
        event_partitions = sum(1 for tp in batches if tp.topic not in self.kind_of_topic)
        newest = max(1, self.recent.size // max(1, event_partitions))
        for tp, records in batches.items():
            kind = self.kind_of_topic.get(tp.topic)
            if kind is not None:
                for r in records:
                    if self.partials.put_record(kind, orjson.loads(r.value)):
                        touched.add(METRIC_PAGES[kind])
                continue
            # events: only the newest are decoded; the rest are counted. An event on events.identified
            # carries "personId"; its merge and progress markers never do.
            live_from = self._live_from.get((tp.topic, tp.partition), 0)
            fresh = [r for r in records if r.offset >= live_from]  # not the read-back at start
            if tp.topic == names.identified:
                self.valid_rate.add(sum(1 for r in fresh if b'"personId":' in r.value))
                for r in records[-newest:]:
                    if b'"personId":' in r.value:
                        self.recent.add_valid(orjson.loads(r.value))
            else:
                self.invalid_rate.add(len(fresh))
                for r in records[-newest:]:
                    self.recent.add_invalid(orjson.loads(r.value))
            touched.add("events")
        return touched

    async def _watch(self) -> None:
        """The workers' group lag, and ClickHouse pages re-rendered when the sink moves on their topics."""
        from aiokafka import TopicPartition

        while True:
            await asyncio.sleep(WATCH_SECONDS)
            consumer = self._consumer
            if consumer is None:
                continue
            try:
                committed = await self._group_offsets()
                tps = [TopicPartition(t, p) for t, p in committed]
                ends = await consumer.end_offsets(tps) if tps else {}
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka unreachable: the feed's loop says so
                log.debug("ui watch: %r", exc)
                continue
            lag: dict[str, int] = {}
            for tp, end in ends.items():
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - committed[(tp.topic, tp.partition)])
            moved = {t for (t, p), o in committed.items() if self.committed.get((t, p)) != o}
            self.committed, self.lag = committed, lag
            now = time.time()
            for page, topics in self.sql_pages.items():
                if moved.intersection(topics) and self.on_sql_page is not None:
                    await self.on_sql_page(page)
                    self.hub.changed(page, as_of=now)
            self.hub.changed("overview", as_of=now)

    def overview(self) -> dict[str, Any]:
        names = self.settings.topics
        return {
            "validPerSecond": self.valid_rate.per_second(), "invalidPerSecond": self.invalid_rate.per_second(),
            "validSeen": self.valid_rate.total, "invalidSeen": self.invalid_rate.total,
            "ingestLag": self.lag.get(names.raw, 0),
            "sinkLag": sum(n for t, n in self.lag.items() if t != names.raw),
            "lag": dict(sorted(self.lag.items())),
            "clickhouse": self.clickhouse_error or "ok", "kafka": self.kafka_error or "ok",
            "snapshot": self.snapshot_at is not None,
        }
