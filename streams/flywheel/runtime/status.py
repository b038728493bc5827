"""A worker's status: what its admin listener's /status and /health/ready say, and the lag gauges of
/metrics. Refreshed every REFRESH_SECONDS by a small service; `flywheel status` prints it.

Readiness of a worker (the public collector's is Kafka alone: web/health.py):
- Kafka answers (web/health.KafkaProbe);
- ClickHouse takes inserts (no sink table is failing);
- its tables are recovered and it is not in a rebalance;
- it is at most FLYWHEEL_READY_MAX_LAG records behind on events.raw.

Lag is per topic and partition the worker owns: the partition's end offset (the last stable offset: the
worker reads read_committed) minus the consumer's position, the next record it will fetch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from mode import Service
from prometheus_client import Gauge

from flywheel import observability as obs
from flywheel.config import Topics
from flywheel.runtime import faust_seams
from flywheel.runtime.retry import RetryPolicy
from flywheel.stages.sink import Sink

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
LAG = Gauge("flywheel_consumer_lag", "Records of a topic partition the worker owns not yet fetched (end - position)",
            ["topic", "partition"])
TABLE_KEYS = Gauge("flywheel_table_keys", "Keys in a state table's partitions open here (RocksDB's estimate)",
                   ["table"])
TABLE_BYTES = Gauge("flywheel_table_bytes", "A state table's RocksDB memory (memtables, block_cache, index_filters) "
                    "and disk (sst_files), over its partitions open here", ["table", "kind"])
# Counters whose rates /status shows: (name, the counter).
RATES = (("received", obs.RECEIVED), ("valid", obs.VALID), ("invalid", obs.INVALID), ("late", obs.LATE_EVENTS),
         ("duplicates", obs.DUPLICATES), ("replayed", obs.REPLAYED))


def _total(counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


class WorkerStatus(Service):
    def __init__(self, app: faust.App, *, topics: Topics, sink: Sink, retry: RetryPolicy, stages: dict[str, str],
                 max_lag: int, tables: dict[str, faust_seams.StoreTable] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.app = app
        self.topics = topics
        self.sink = sink
        self.retry = retry
        self.stages = stages  # stage name → its topic
        self.max_lag = max_lag
        self.tables = tables or {}
        self.table_stats: dict[str, dict[str, int]] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.rates: dict[str, float] = {}
        self._last: tuple[float, dict[str, float]] | None = None
        self.refreshed: float | None = None

    @Service.task
    async def _refresh_forever(self) -> None:
        while not self.should_stop:
            try:
                await self.refresh()
            except Exception as exc:  # Kafka unreachable: the Kafka check says so; keep the last numbers
                log.debug("status refresh failed: %r", exc)
            await self.sleep(REFRESH_SECONDS)

    async def refresh(self) -> None:
        names = set(self.stages.values())
        consumer = self.app.consumer
        tps = sorted(tp for tp in consumer.assignment() if tp.topic in names)
        ends = await consumer.highwaters(*tps) if tps else {}
        lag = {}
        for tp in tps:
            position = await consumer.position(tp)
            end = ends.get(tp)
            if position is not None and end is not None:
                lag[(tp.topic, tp.partition)] = max(0, end - position)
        for topic, partition in self.lag.keys() - lag.keys():
            LAG.remove(topic, str(partition))
        for (topic, partition), n in lag.items():
            LAG.labels(topic, str(partition)).set(n)
        self.lag = lag
        now, totals = time.monotonic(), {name: _total(counter) for name, counter in RATES}
        if self._last is not None:
            elapsed = max(1e-6, now - self._last[0])
            self.rates = {name: (totals[name] - self._last[1][name]) / elapsed for name in totals}
        self._last = (now, totals)
        self.table_stats = {name: table.stats() for name, table in self.tables.items()}
        for name, stats in self.table_stats.items():
            TABLE_KEYS.labels(name).set(stats["keys"])
            for kind in ("memtables", "block_cache", "index_filters", "sst_files"):
                if kind in stats:
                    TABLE_BYTES.labels(name, kind).set(stats[kind])
        self.refreshed = time.time()

    # ---- readiness checks (web/health.py) --------------------------------------------------------------
    async def clickhouse(self) -> str | None:
        blocked = self.sink.blocked()
        if blocked:
            return "clickhouse: inserts failing for " + ", ".join(
                f"{table} ({seconds:.0f} s)" for table, seconds in sorted(blocked.items()))
        return None

    async def recovery(self) -> str | None:
        if not faust_seams.recovered(self.app):
            remaining = faust_seams.recovery_remaining(self.app)
            if remaining:
                return "starting: restoring tables (" + ", ".join(
                    f"{table} {left:,} changelog records to read" for table, left in sorted(remaining.items())) + ")"
            return "starting: waiting for partitions"
        if not self.app.flow_control.is_active():
            return "rebalancing"
        return None

    async def behind(self) -> str | None:
        raw = sum(n for (topic, _), n in self.lag.items() if topic == self.topics.raw)
        if raw > self.max_lag:
            return (f"lag: {raw:,} records of {self.topics.raw} not yet fetched "
                    f"(FLYWHEEL_READY_MAX_LAG={self.max_lag:,})")
        return None

    # ---- /status -----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        stages = {}
        for name, topic in self.stages.items():
            by_partition = {str(p): n for (t, p), n in sorted(self.lag.items()) if t == topic}
            failing = self.retry.failing.get(name)
            stages[name] = {"topic": topic, "lag": sum(by_partition.values()), "lag_by_partition": by_partition,
                            "failing": failing}
        received = self.rates.get("received", 0.0)
        return {
            "stages": stages,
            "rates_per_s": {k: round(v, 1) for k, v in self.rates.items()},
            "invalid_share": round(self.rates.get("invalid", 0.0) / received, 4) if received else None,
            "late_share": round(self.rates.get("late", 0.0) / received, 4) if received else None,
            "sink_blocked_s": {t: round(s, 1) for t, s in self.sink.blocked().items()},
            "restoring": faust_seams.recovery_remaining(self.app),
            "tables": self.table_stats,
            "as_of": self.refreshed,
        }
