"""Progress markers for the alert evaluators (docs/design.md §10).

Every FLYWHEEL_ALERT_TICK_SECONDS, each worker appends a marker — an empty record with the header
`flywheel-tick: <its clock, epoch ms>` — to every events.raw partition. It travels behind the events there:
the ingest stage, on reaching it, has handled every record before it (and reports that for its counts), and
passes it on to every events.identified partition, where the aggregate stage reports the same once it has
a marker from every events.raw partition. So a period closes when the data that arrived before its end
plus the grace is in, wherever it was queued: a quiet partition still moves, and a backlog or an outage
holds periods open instead of judging them on half their data. Markers from several workers do no harm
(each stage keeps the newest)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from mode import Service

from flywheel.model.envelope import HEADER_TICK
from flywheel.runtime.outbox import Outbox

log = logging.getLogger(__name__)


class Ticker(Service):
    def __init__(self, outbox: Callable[[], Awaitable[Outbox]], topic: str, *, clock: Callable[[], int],
                 seconds: float, active: Callable[[], bool] = lambda: True, **kwargs):
        super().__init__(**kwargs)
        self.outbox = outbox
        self.topic = topic
        self.clock = clock
        self.seconds = seconds
        self.active = active  # whether any alert rule is in force: no markers while none is
        self._failing = False

    async def tick(self) -> None:
        out = await self.outbox()
        headers = [(HEADER_TICK, str(self.clock()).encode())]
        for p in out.partitions(self.topic):
            out.add(self.topic, None, b"", partition=p, headers=headers)
        await out.send()

    @Service.task
    async def _run(self) -> None:
        while not self.should_stop:
            await self.sleep(self.seconds)
            if not self.active():
                continue
            try:
                await self.tick()
            except Exception as exc:  # Kafka unreachable: alert periods wait; say so once
                if not self._failing:
                    log.warning("progress markers not sent (alert periods wait for them): %r", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("progress markers sent again")
                self._failing = False
