"""stages/sink.py: one attempt per insert — a transient failure raises (the batch's delivery retries it,
runtime/retry.py) — and rows ClickHouse refuses are isolated and dead-lettered to events.invalid."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from flywheel.clickhouse import ClickHouseUnavailable
from flywheel.runtime.retry import RetryPolicy
from flywheel.stages.sink import Sink


class BadData(Exception):
    code = 117


class FlakyClickHouse:
    """A stand-in for the insert call only: down for `down` attempts, refuses rows marked bad."""

    label = "flaky"

    def __init__(self, down: int = 0):
        self.down = down
        self.attempts = 0
        self.stored: list[dict] = []

    def insert(self, table, rows):
        self.attempts += 1
        if self.down > 0:
            self.down -= 1
            raise ClickHouseUnavailable("Connection refused")
        if any(r.get("bad") for r in rows):
            raise BadData("Code: 117. DB::Exception: Cannot parse")
        self.stored.extend(rows)


class Outbox:
    def __init__(self, sent: list):
        self.sent = sent
        self.records: list = []

    def add(self, topic, key, value, *, partition=None):
        self.records.append((topic, orjson.loads(value)))

    async def send(self):
        self.sent += self.records
        return {}


def write(ch, rows, table="flywheel.events"):
    """The dead letters sent: (topic, record)."""
    dead: list = []

    async def outbox():
        return Outbox(dead)

    async def main():
        sink = Sink(ch, ThreadPoolExecutor(1), is_bad_data=RetryPolicy.is_bad_data, outbox=outbox,
                    invalid_topic="events.invalid")
        await sink.write(table, rows)

    asyncio.run(main())
    return dead


def test_a_transient_failure_raises_and_the_next_attempt_lands():
    ch = FlakyClickHouse(down=1)
    rows = [{"i": i} for i in range(10)]
    with pytest.raises(ClickHouseUnavailable):
        write(ch, rows)
    assert ch.stored == [] and ch.attempts == 1  # one attempt: retrying is the batch's delivery's job
    assert write(ch, rows) == []
    assert ch.stored == rows


@pytest.mark.parametrize("bad_at", [[0], [9], [3, 4], [0, 5, 9]])
def test_refused_rows_are_isolated_and_dead_lettered_the_rest_lands(bad_at):
    ch = FlakyClickHouse()
    rows = [{"i": i, "bad": i in bad_at} for i in range(10)]
    dead = write(ch, rows)
    assert [orjson.loads(r["payload"])["i"] for _, r in dead] == bad_at
    assert all(t == "events.invalid" and r["reasons"][0].startswith("Code: 117") for t, r in dead)
    assert all(r["origin"] == "sink:flywheel.events:" and r["payloadEncoding"] == "utf-8" for _, r in dead)
    assert sorted(r["i"] for r in ch.stored) == [i for i in range(10) if i not in bad_at]


def test_an_empty_batch_does_not_touch_clickhouse():
    ch = FlakyClickHouse()
    write(ch, [])
    assert ch.attempts == 0


def test_closed_values_reads_each_cells_latest_value_and_finds_its_own_correction_on_real_chdb(tmp_path):
    from flywheel import paths
    from flywheel.clickhouse.embedded import EmbeddedClickHouse
    from flywheel.clickhouse.migrate import apply
    from flywheel.metrics.cells import record, row
    from flywheel.metrics.definitions import MAU, parse_metrics

    metrics = parse_metrics({"funnels": [{"name": "f", "window": "1h", "steps": [{"event": "A"}, {"event": "B"}]}]})
    f = metrics.funnels[0]
    ch = EmbeddedClickHouse(tmp_path / "chdb")
    try:
        apply(ch, paths.sql_dir() / "migrations")
        for cell, partition, persons, version, correction in [
                ((f, 20_400, 1), 2, 5, 10, ""), ((f, 20_400, 1), 2, 7, 20, ""), ((f, 20_400, 1), 3, 9, 25, ""),
                ((MAU, 20_401), 2, 4, 30, ""), ((MAU, 20_401), 2, 3, 31, "r1")]:
            kind, _, rec = record(cell, partition, persons, version, correction)
            ch.insert(kind.table, [row(kind, rec)])
        sink = Sink(ch, ThreadPoolExecutor(1), is_bad_data=RetryPolicy().is_bad_data, outbox=None, invalid_topic="x")
        cells = [(f, 20_400, 1), (MAU, 20_401), (f, 20_401, 2)]
        assert asyncio.run(sink.closed_values(2, cells, "r1")) == {(f, 20_400, 1): (7, 20, False),
                                                                  (MAU, 20_401): (4, 30, True)}
        assert asyncio.run(sink.closed_values(2, cells, "r2")) == {(f, 20_400, 1): (7, 20, False),
                                                                  (MAU, 20_401): (3, 31, False)}
    finally:
        ch.close()
