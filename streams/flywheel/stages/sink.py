"""The sink stage: records of metrics.*, identity.changes and events.invalid into ClickHouse, and the
writer every stage inserts rows with.

`Sink.write` makes one attempt at an insert. If ClickHouse refuses the data itself (the retry policy's
`is_bad_data`), the rows are bisected until the refused ones are isolated, and those are dead-lettered to
events.invalid, so one bad row cannot stall a partition. Any other failure raises: the batch fails as a
whole and its delivery retries it (runtime/retry.py), acking nothing meanwhile — while ClickHouse is
down, a topic's batches stop, offsets stop advancing and nothing is lost. The logs and
`flywheel_sink_blocked` say so, once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from flywheel import observability as obs
from flywheel.metrics.cells import KIND_BY_NAME, Cell, kind_of, row
from flywheel.metrics.oracle import quote
from flywheel.model.rows import alert_row, audience_row, definition_row, identity_rows, invalid_row, rfm_row
from flywheel.model.validate import dlq_record
from flywheel.stages.ports import Outbox, Record

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]
INVALID_EVENTS = "flywheel.invalid_events"
SEGMENT_CHANGES = "flywheel.segment_changes"
RFM_VALUES = "flywheel.rfm_values"
ALERT_EVENTS = "flywheel.alert_events"
DEFINITION_CHANGES = "flywheel.definition_changes"


class ClickHouse(Protocol):
    """clickhouse/: embedded or server. Synchronous calls, made on the sink's executor."""

    def insert(self, table: str, rows: Rows) -> None: ...

    def rows(self, sql: str) -> tuple[list[str], list[tuple]]: ...


class Sink:
    def __init__(self, ch: ClickHouse, executor: Executor, *, is_bad_data: Callable[[BaseException], bool],
                 outbox: Callable[[], Awaitable[Outbox]], invalid_topic: str):
        self.ch = ch
        self.executor = executor
        self.is_bad_data = is_bad_data
        self.outbox = outbox
        self.invalid_topic = invalid_topic
        self._blocked_since: dict[str, float] = {}

    def blocked(self) -> dict[str, float]:
        """Tables whose inserts are failing, and for how many seconds."""
        now = time.monotonic()
        return {table: now - since for table, since in self._blocked_since.items()}

    async def write(self, table: str, rows: Rows) -> None:
        """Insert `rows` into `table`; return once every row is in ClickHouse or dead-lettered. Raises if
        ClickHouse fails otherwise (the caller's batch is retried)."""
        if not rows:
            return
        refused: list[tuple[dict, str]] = []
        await self._write(table, rows, refused)
        if refused:
            await self._dead_letter(table, refused)

    async def _write(self, table: str, rows: Rows, refused: list[tuple[dict, str]]) -> None:
        bad = await self._insert(table, rows)
        if bad is None:
            return
        if len(rows) == 1:
            obs.SINK_REJECTED.labels(table).inc()
            log.error("ClickHouse refused a row for %s, dead-lettering it: %s", table, bad)
            refused.append((rows[0], bad))
            return
        half = len(rows) // 2
        await self._write(table, rows[:half], refused)
        await self._write(table, rows[half:], refused)

    async def _insert(self, table: str, rows: Rows) -> str | None:
        """One insert. Returns None once inserted, the error text if ClickHouse refused the data itself;
        raises on any other failure."""
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.ch.insert, table, rows)
        except Exception as exc:
            if self.is_bad_data(exc):
                obs.SINK_FAILURES.labels(table, "bad_data").inc()
                return str(exc).splitlines()[0][:500]
            obs.SINK_FAILURES.labels(table, "retry").inc()
            if table not in self._blocked_since:
                self._blocked_since[table] = time.monotonic()
                obs.SINK_BLOCKED.labels(table).set(1)
                log.warning("insert into %s failed; its topic waits for ClickHouse: %s", table,
                            str(exc).splitlines()[0][:300])
            raise
        obs.SINK_BATCHES.labels(table).observe(time.perf_counter() - started)
        obs.SINK_ROWS.labels(table).inc(len(rows))
        since = self._blocked_since.pop(table, None)
        if since is not None:
            obs.SINK_BLOCKED.labels(table).set(0)
            log.warning("ClickHouse is back: rows inserted into %s after %.1fs", table, time.monotonic() - since)
        return None

    async def _dead_letter(self, table: str, refused: list[tuple[dict, str]]) -> None:
        if table == INVALID_EVENTS:  # nowhere left to put it
            for r, reason in refused:
                log.error("dropping a DLQ row ClickHouse refuses (%s): %r", reason, r)
            return
        out = await self.outbox()
        now = int(datetime.now(UTC).timestamp() * 1000)
        for r, reason in refused:
            record = dlq_record(orjson.dumps(r, default=str), source=str(r.get("source", "")), reasons=[reason],
                                received_ms=now, origin=f"sink:{table}:{r.get('message_id', '')}")
            out.add(self.invalid_topic, None, orjson.dumps(record))
        await out.send()

    async def query(self, sql: str) -> list[tuple]:
        return list((await asyncio.get_running_loop().run_in_executor(self.executor, self.ch.rows, sql))[1])

    async def counted(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these events are stored with late = 0; empty if ClickHouse cannot say right now."""
        ids = ", ".join(quote(m) for m in message_ids)
        sql = f"SELECT DISTINCT message_id FROM flywheel.events WHERE late = 0 AND message_id IN ({ids})"
        try:
            _, found = await asyncio.get_running_loop().run_in_executor(self.executor, self.ch.rows, sql)
        except Exception as exc:  # the insert that follows waits for ClickHouse; the flags stay as judged
            log.warning("could not check %d late-looking events against stored rows: %s", len(message_ids), exc)
            return set()
        return {r[0] for r in found}


    async def closed_values(self, partition: int, cells: Sequence[Cell],
                            request: str) -> dict[Cell, tuple[int, int, bool]]:
        """Per cell on `partition`: (value, version) of its latest row not written for forget request
        `request`, and whether a row for that request is there already (absent cells: none). Raises if
        ClickHouse cannot say: the batch asking is retried."""
        by_kind: dict[Any, list[Cell]] = {}
        for cell in cells:
            by_kind.setdefault(kind_of(cell), []).append(cell)
        found: dict[Cell, tuple[int, int, bool]] = {}
        r = quote(request)
        for kind, group in by_kind.items():
            columns = [column for _, column in kind.fields]
            text = [f"toString({c})" for c in columns]
            wanted = {tuple(str(v) for v in kind.values(c)): c for c in group}
            tuples = ", ".join("(" + ", ".join(quote(v) for v in key) + ")" for key in wanted)
            sql = (f"SELECT {', '.join(text)}, argMaxIf(persons, version, correction != {r}), "
                   f"maxIf(version, correction != {r}), countIf(correction = {r}) FROM {kind.table} "
                   f"WHERE kafka_partition = {int(partition)} AND tuple({', '.join(text)}) IN ({tuples}) "
                   f"GROUP BY {', '.join(columns)}")
            _, rows = await asyncio.get_running_loop().run_in_executor(self.executor, self.ch.rows, sql)
            for row_ in rows:
                cell = wanted.get(tuple(str(v) for v in row_[:-3]))
                if cell is not None:
                    found[cell] = (int(row_[-3]), int(row_[-2]), int(row_[-1]) > 0)
        return found


class SinkStage:
    """Handlers of the topics that only go to ClickHouse."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def partials(self, kind_name: str) -> Callable[[Sequence[Record]], Awaitable[None]]:
        kind = KIND_BY_NAME[kind_name]

        async def handle(records: Sequence[Record]) -> None:
            await self.sink.write(kind.table, [row(kind, orjson.loads(r.value)) for r in records])
        return handle

    async def identity(self, records: Sequence[Record]) -> None:
        by_table: dict[str, Rows] = {}
        for r in records:
            change = orjson.loads(r.value)
            if change["type"] == "forgotten":  # for services; the command that asked deletes the rows
                continue
            table, row_ = identity_rows(change)
            by_table.setdefault(table, []).append(row_)
        for table, rows in by_table.items():
            await self.sink.write(table, rows)

    async def invalid(self, records: Sequence[Record]) -> None:
        await self.sink.write(INVALID_EVENTS, [invalid_row(orjson.loads(r.value)) for r in records])

    async def rfm(self, records: Sequence[Record]) -> None:
        await self.sink.write(RFM_VALUES, [rfm_row(orjson.loads(r.value), r.partition, r.offset) for r in records])

    async def alerts(self, records: Sequence[Record]) -> None:
        await self.sink.write(ALERT_EVENTS, [alert_row(orjson.loads(r.value)) for r in records])

    async def segments(self, records: Sequence[Record]) -> None:
        await self.sink.write(SEGMENT_CHANGES, [audience_row(orjson.loads(r.value), r.partition, r.offset)
                                                   for r in records])

    async def definitions(self, records: Sequence[Record]) -> None:
        await self.sink.write(DEFINITION_CHANGES, [definition_row(orjson.loads(r.value), r.offset)
                                                   for r in records if r.value is not None])
