"""runtime/status.py: a worker's readiness checks and its /status, over a Faust app without a broker."""

from __future__ import annotations

import asyncio

import faust
import orjson
from flywheel.config import Topics
from flywheel.runtime.faust_seams import install_transport
from flywheel.runtime.retry import RetryPolicy
from flywheel.runtime.status import WorkerStatus

TOPICS = Topics()


class Sink:
    def __init__(self):
        self.waiting: dict[str, float] = {}

    def blocked(self) -> dict[str, float]:
        return dict(self.waiting)


def test_readiness_says_what_is_wrong_and_status_shows_it():
    async def main():
        app = faust.App("status-test", broker="kafka://127.0.0.1:1", store="memory://")
        install_transport(app, {})
        sink, policy = Sink(), RetryPolicy()
        status = WorkerStatus(app, topics=TOPICS, sink=sink, retry=policy, max_lag=1000,
                              stages={"ingest": TOPICS.raw, "aggregate": TOPICS.identified})
        assert await status.recovery() == "starting: waiting for partitions"
        app.tables.recovery.completed.set()
        app.flow_control.resume()
        assert await status.recovery() is None
        app.flow_control.suspend()
        assert await status.recovery() == "rebalancing"

        assert await status.clickhouse() is None
        sink.waiting = {"flywheel.events": 12.4}
        assert await status.clickhouse() == "clickhouse: inserts failing for flywheel.events (12 s)"

        status.lag = {(TOPICS.raw, 0): 700, (TOPICS.raw, 1): 400, (TOPICS.identified, 0): 5000}
        assert await status.behind() == (f"lag: 1,100 records of {TOPICS.raw} not yet fetched "
                                         "(FLYWHEEL_READY_MAX_LAG=1,000)")

        async def failing():
            raise ConnectionError("ClickHouse is unreachable")

        task = asyncio.ensure_future(RetryPolicy.run(policy, failing, name="aggregate", size=3))
        while "aggregate" not in policy.failing:
            await asyncio.sleep(0.01)
        task.cancel()
        doc = orjson.loads(orjson.dumps(status.status()))  # what /status sends
        assert doc["stages"]["ingest"] == {"topic": TOPICS.raw, "lag": 1100, "lag_by_partition": {"0": 700, "1": 400},
                                           "failing": None}
        assert doc["stages"]["aggregate"]["failing"]["error"] == "ConnectionError('ClickHouse is unreachable')"
        assert doc["sink_blocked_s"] == {"flywheel.events": 12.4}

    asyncio.run(main())
