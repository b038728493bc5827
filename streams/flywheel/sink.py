"""The ClickHouse sink: insert a batch, retrying until it lands; the caller acks only afterwards.

Batches are cut by batches.py (up to FLYWHEEL_SINK_BATCH_SIZE records, lingering up to
FLYWHEEL_SINK_FLUSH_SECONDS), which acks — and so lets Faust commit — a batch's offsets only after this
coroutine returns. While ClickHouse is unreachable `write` does not return: the topic's batches stop,
their partitions' fetching pauses, offsets stop advancing, nothing is lost, and the
logs and `flywheel_sink_blocked` say so. Rows ClickHouse refuses as bad data (no retry can fix them)
are isolated by bisection and dead-lettered, so one bad row cannot stall a partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from flywheel import observability as obs
from flywheel.clickhouse import ClickHouse, is_bad_data

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]
DeadLetter = Callable[[str, dict[str, Any], str], Awaitable[None]]


class Sink:
    def __init__(
        self,
        ch: ClickHouse,
        executor: Executor,
        *,
        dead_letter: DeadLetter,
        max_backoff: float = 30.0,
        first_backoff: float = 0.2,
    ):
        self.ch = ch
        self.executor = executor
        self.dead_letter = dead_letter
        self.max_backoff = max_backoff
        self.first_backoff = first_backoff

    async def write(self, table: str, rows: Rows) -> None:
        """Insert `rows` into `table`; returns only when every row is in ClickHouse or dead-lettered."""
        if rows:
            await self._write(table, rows)

    async def _write(self, table: str, rows: Rows) -> None:
        bad = await self._insert_until_done(table, rows)
        if bad is None:
            return
        if len(rows) == 1:
            obs.SINK_REJECTED.labels(table).inc()
            log.error("ClickHouse refused a row for %s, dead-lettering it: %s", table, bad)
            await self.dead_letter(table, rows[0], f"ClickHouse refused the row: {bad}")
            return
        half = len(rows) // 2
        await self._write(table, rows[:half])
        await self._write(table, rows[half:])

    async def _insert_until_done(self, table: str, rows: Rows) -> str | None:
        """Insert, retrying transient failures forever with capped back-off. Returns the error text
        if ClickHouse refused the data itself, else None once inserted."""
        loop = asyncio.get_running_loop()
        backoff = self.first_backoff
        attempt = 0
        blocked_since: float | None = None
        while True:
            started = time.perf_counter()
            try:
                await loop.run_in_executor(self.executor, self.ch.insert, table, rows)
            except Exception as exc:  # classified below: nothing escapes without a decision
                if is_bad_data(exc):
                    obs.SINK_FAILURES.labels(table, "bad_data").inc()
                    return str(exc).splitlines()[0][:500]
                attempt += 1
                obs.SINK_FAILURES.labels(table, "retry").inc()
                if blocked_since is None:
                    blocked_since = time.monotonic()
                    obs.SINK_BLOCKED.labels(table).set(1)
                log.warning(
                    "insert of %d rows into %s failed (attempt %d, retrying in %.1fs; consumption paused): %s",
                    len(rows), table, attempt, backoff, str(exc).splitlines()[0][:300],
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            obs.SINK_BATCHES.labels(table).observe(time.perf_counter() - started)
            obs.SINK_ROWS.labels(table).inc(len(rows))
            if blocked_since is not None:
                obs.SINK_BLOCKED.labels(table).set(0)
                log.warning(
                    "ClickHouse is back: %d rows inserted into %s after %d failed attempts over %.1fs",
                    len(rows), table, attempt, time.monotonic() - blocked_since,
                )
            return None
