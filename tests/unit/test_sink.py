"""Sink: retries transient failures until the insert lands, isolates rows ClickHouse refuses."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from flywheel.clickhouse import ClickHouseUnavailable
from flywheel.sink import Sink


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


def write(ch, rows, table="flywheel.events"):
    dead = []

    async def dead_letter(t, row, reason):
        dead.append((t, row, reason))

    async def main():
        sink = Sink(ch, ThreadPoolExecutor(1), dead_letter=dead_letter, first_backoff=0.001, max_backoff=0.01)
        await sink.write(table, rows)

    asyncio.run(main())
    return dead


def test_transient_failures_are_retried_until_the_batch_lands():
    ch = FlakyClickHouse(down=5)
    rows = [{"i": i} for i in range(10)]
    assert write(ch, rows) == []
    assert ch.stored == rows and ch.attempts == 6


@pytest.mark.parametrize("bad_at", [[0], [9], [3, 4], [0, 5, 9]])
def test_refused_rows_are_isolated_and_dead_lettered_the_rest_lands(bad_at):
    ch = FlakyClickHouse()
    rows = [{"i": i, "bad": i in bad_at} for i in range(10)]
    dead = write(ch, rows)
    assert [r["i"] for _, r, _ in dead] == bad_at
    assert all("ClickHouse refused the row" in reason for _, _, reason in dead)
    assert sorted(r["i"] for r in ch.stored) == [i for i in range(10) if i not in bad_at]


def test_an_empty_batch_does_not_touch_clickhouse():
    ch = FlakyClickHouse()
    write(ch, [])
    assert ch.attempts == 0
