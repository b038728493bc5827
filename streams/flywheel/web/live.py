"""The UI's one subscription to Kafka, and the fan-out of page updates to open pages (docs/design.md §12).

`Feed` reads, with one consumer of its own (no consumer group, nothing committed), every partition of:
- metrics.funnels / retention / active_users / experiments, from the offsets the workers' sink has
  committed: everything before them is in ClickHouse, which gives the snapshot (`board.snapshot_sql`)
  taken after those offsets were read, so no record falls between the two; overlaps count once (versions).
  After a reconnect, from where the model stopped;
- events.identified and events.invalid, from a little before their end: the live-events page, and the rates.
Every `WATCH_SECONDS` it also reads the workers' group offsets: lag for the overview, and which topics the
sink has stored more of (the pages that are ClickHouse queries — data quality, segments, alerts — re-run).

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
        self.closed = False  # the server stops: every open stream ends

    def close(self) -> None:
        self.closed = True
        for page in self.pages.values():
            for wake in page.waiters:
                wake.set()

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

    def __init__(self, settings: Settings, hub: Hub, query: Query):
        self.settings = settings
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
        self.polled_at: float | None = None  # the last fetch from Kafka that succeeded (epoch s)
        self.watched_at: float | None = None  # the last read of the workers' offsets that succeeded
        self.committed: dict[tuple[str, int], int] = {}
        # called every watch with the topics the sink stored more of since the last (often none)
        self.on_sink_moved: Callable[[set[str]], Awaitable[None]] | None = None
        self._consumer = None
        self._admin = None
        self._live_from: dict[tuple[str, int], int] = {}
        self._positions: dict[tuple[str, int], int] = {}  # metric partitions: the next offset to apply
        self._opened = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        """Start reading (once; later calls do nothing)."""
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._run(), name="ui-feed"),
                       asyncio.create_task(self._snapshot(), name="ui-snapshot"),
                       asyncio.create_task(self._watch(), name="ui-watch")]
        for task in self._tasks:
            task.add_done_callback(_log_death)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_consumer()
        admin, self._admin = self._admin, None
        if admin is not None:
            await _quietly(admin.close)

    async def _run(self) -> None:
        while True:
            try:
                await self._open()
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka down, a topic missing: start over where the model stopped
                if self.kafka_error is None:
                    log.warning("ui feed: %s; retrying", exc)
                self.kafka_error = str(exc) or type(exc).__name__
                self.hub.changed("overview")
                await self._close_consumer()
                await asyncio.sleep(2.0)

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await _quietly(consumer.stop)

    async def _admin_client(self):
        from aiokafka.admin import AIOKafkaAdminClient

        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap, request_timeout_ms=10000)
            try:
                await admin.start()
            except BaseException:
                await admin.close()
                raise
            self._admin = admin
        return self._admin

    async def _open(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    auto_offset_reset="earliest", client_id=f"{self.settings.app_id}-ui",
                                    max_partition_fetch_bytes=4 << 20)
        self._consumer = consumer  # stopped by _close_consumer, also when start fails
        await consumer.start()
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
        self.recent = Recent()  # read back again below: no event shown twice after a reconnect
        for tp in tps:
            at = (tp.topic, tp.partition)
            if tp.topic in self.kind_of_topic:
                # where this model stopped (a reconnect), else where the sink stopped: the snapshot, taken
                # after this, holds everything before it
                consumer.seek(tp, self._positions.get(at, committed.get(at, begins[tp])))
            else:
                consumer.seek(tp, max(begins[tp], ends[tp] - RECENT_PER_PARTITION))
                self._live_from[at] = max(self._live_from.get(at, 0), ends[tp])  # the rates count from here
        log.info("ui feed reading %d partitions of %s", len(tps), ", ".join(metric_topics + event_topics))
        self.kafka_error = None
        self._opened.set()

    async def _group_offsets(self) -> dict[tuple[str, int], int]:
        admin = await self._admin_client()
        offsets = await admin.list_consumer_group_offsets(self.settings.app_id)
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def _snapshot(self) -> None:
        """ClickHouse's values of the metric cells, once the consumer is positioned (then records and
        snapshot merge by version, in whichever order they come); retried until ClickHouse answers."""
        await self._opened.wait()
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
            now = self.polled_at = time.time()
            for page in self.apply(batches):
                self.hub.changed(page, as_of=now)
            if batches:
                self.hub.changed("overview", as_of=now)

    def apply(self, batches: dict[Any, list]) -> set[str]:
        """Fetched records (per topic partition) into the model; the pages they changed. A record that is
        not JSON (none should be) is skipped and logged."""
        names = self.settings.topics
        touched: set[str] = set()
        # the page keeps the newest `recent.size` events: at most that many are decoded per fetch
        event_partitions = sum(1 for tp in batches if tp.topic not in self.kind_of_topic)
        newest = max(1, self.recent.size // max(1, event_partitions))
        for tp, records in batches.items():
            if not records:
                continue
            kind = self.kind_of_topic.get(tp.topic)
            if kind is not None:
                for r in records:
                    value = _json(tp, r)
                    if value is not None and self.partials.put_record(kind, value):
                        touched.add(METRIC_PAGES[kind])
                self._positions[(tp.topic, tp.partition)] = records[-1].offset + 1
                continue
            # events: only the newest are decoded; the rest are counted. An event on events.identified
            # carries "personId"; its merge and progress markers never do, and a backfilled event is no new one.
            live_from = self._live_from.get((tp.topic, tp.partition), 0)
            fresh = [r for r in records if r.offset >= live_from]  # not the read-back at start
            if tp.topic == names.identified:
                self.valid_rate.add(sum(1 for r in fresh if _is_event(r.value)))
                for r in records[-newest:]:
                    if _is_event(r.value) and (value := _json(tp, r)) is not None:
                        self.recent.add_valid(value)
            else:
                self.invalid_rate.add(len(fresh))
                for r in records[-newest:]:
                    if (value := _json(tp, r)) is not None:
                        self.recent.add_invalid(value)
            touched.add("events")
        return touched

    async def _watch(self) -> None:
        """The workers' group lag, and which topics their sink has stored more of (`on_sink_moved`)."""
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
            self.committed, self.lag, self.watched_at = committed, lag, time.time()
            if self.on_sink_moved is not None:  # every tick: a page held back by its rate limit runs later
                await self.on_sink_moved(moved)
            self.hub.changed("overview", as_of=time.time())

    def overview(self) -> dict[str, Any]:
        names = self.settings.topics
        return {
            "validPerSecond": self.valid_rate.per_second(), "invalidPerSecond": self.invalid_rate.per_second(),
            "validSeen": self.valid_rate.total, "invalidSeen": self.invalid_rate.total,
            "ingestLag": self.lag.get(names.raw, 0),
            "sinkLag": sum(n for t, n in self.lag.items() if t != names.raw),
            "lag": dict(sorted(self.lag.items())),
            "clickhouse": self.clickhouse_error or "ok", "kafka": self.kafka_error or "ok",
        }


def _json(tp, record) -> Any:
    try:
        return orjson.loads(record.value)
    except (orjson.JSONDecodeError, TypeError):
        log.warning("ui feed: %s[%d]@%d is not JSON: skipped", tp.topic, tp.partition, record.offset)
        return None


async def _quietly(close: Callable[[], Awaitable[Any]]) -> None:
    try:
        await close()
    except Exception:  # closing a broken client: nothing left to do
        pass


def _log_death(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ui: %s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


def _is_event(value: bytes | None) -> bool:
    """An event of events.identified, not a marker, a hand-off or a backfilled event (stages/backfill.py)."""
    return bool(value) and b'"personId":' in value and not value.startswith(b'{"type":"backfill"')
