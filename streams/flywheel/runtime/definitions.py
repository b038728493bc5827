"""A running worker follows the stored definitions (docs/design.md §13).

One aiokafka consumer without a group on the definitions topic's only partition, from the revision the
worker started with. Whatever arrived in one fetch is folded in and compiled once (an import of ten
definitions is one switch, not ten); the new set goes to every stage that holds definitions (`on_change`),
in order. Every record is folded in; a set that does not compile here (writers check, but a process's
webhook allowlist and secrets are its own) is logged and not handed on — the set in force stays until a
later revision compiles. `flywheel ui` and `flywheel collector` follow the topic the same way (`follow_in`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics, MetricsError
from flywheel.metrics.store import Change, Stored
from flywheel.registry import check

log = logging.getLogger(__name__)

OnChange = Callable[[Metrics, Stored], Awaitable[None]]


class DefinitionsWatch(Service):
    def __init__(self, settings: Settings, stored: Stored, on_change: OnChange, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        self.stored = stored.copy()  # its own: folded in place, while what is in force is handed on
        self.on_change = on_change
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def revision(self) -> int:
        return self.stored.revision

    async def _connect(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False,
                                    client_id=f"{self.settings.app_id}-definitions-watch")
        await consumer.start()
        try:
            tp = TopicPartition(self.settings.topics.definitions, 0)
            consumer.assign([tp])
            consumer.seek(tp, self.stored.revision + 1)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    @Service.task
    async def _follow(self) -> None:
        failing = False
        while not self.should_stop:
            try:
                if self._consumer is None:
                    self._consumer = await self._connect()
                fetched = await self._consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker away: the worker keeps its set and tries again
                if not failing:
                    log.warning("definitions: cannot follow %s (%s); trying again every 2 s",
                                self.settings.topics.definitions, exc)
                failing = True
                await self.sleep(2.0)
                continue
            if failing:
                log.info("definitions: following %s again", self.settings.topics.definitions)
                failing = False
            records = [r for batch in fetched.values() for r in batch if r.value is not None]
            if records:
                await self.take([(r.offset, Change.from_bytes(r.value)) for r in records])

    async def take(self, records: list[tuple[int, Change]]) -> None:
        """Fold records in (always: every process follows the same sequence); if the set compiles here, hand it
        to the stages — else keep the set in force, say why, and try again with the next record."""
        self.stored.fold_all(records)
        try:
            metrics = check(self.settings, self.stored.mapping(),
                            source=f"{self.settings.topics.definitions}@{self.stored.revision}")
        except MetricsError as exc:
            log.error("definitions revision %d does not compile here; the set in force stays until one does: %s",
                      self.stored.revision, exc)
            return
        changed = ", ".join(f"{c.key} ({'deleted' if c.spec is None else c.version}, by {c.author} via {c.via})"
                            for _, c in records)
        log.info("definitions revision %d in force: %s", self.stored.revision, changed)
        await self.on_change(metrics, self.stored.copy())


def follow_in(app, settings: Settings, stored: Stored, on_change: OnChange) -> DefinitionsWatch:
    """A process without a Faust worker (`flywheel ui`, `flywheel collector`) follows the definitions for as
    long as its aiohttp `app` runs."""
    watch = DefinitionsWatch(settings, stored, on_change)

    async def start(_app) -> None:
        await watch.start()

    async def stop(_app) -> None:
        await watch.stop()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return watch
