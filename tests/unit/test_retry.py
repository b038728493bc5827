"""runtime/retry.py: the one retry policy — back-off, a hung attempt said and then cancelled, bad data
told apart from an unavailable service."""

from __future__ import annotations

import asyncio

import pytest
from flywheel.runtime.retry import RetryPolicy


def test_backoff_doubles_to_its_cap():
    policy = RetryPolicy(first_backoff=0.5, max_backoff=30)
    assert [policy.backoff(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize(("error", "bad"), [
    (RuntimeError("Code: 27. DB::Exception: Cannot parse input"), True),
    (RuntimeError("Code: 53. DB::Exception: Type mismatch"), True),
    (RuntimeError("Code: 210. DB::NetException: Connection refused"), False),
    (ConnectionError("Kafka went away"), False),
])
def test_bad_data_is_told_apart_from_an_unavailable_service(error, bad):
    assert RetryPolicy.is_bad_data(error) is bad


def test_run_retries_until_it_succeeds_and_logs_each_failure(caplog):
    attempts = []

    async def attempt():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("down")
        return "done"

    with caplog.at_level("ERROR", logger="flywheel.runtime.retry"):
        assert asyncio.run(RetryPolicy(first_backoff=0.001).run(attempt, name="sink_x", size=7)) == "done"
    assert len(attempts) == 3
    assert "sink_x: batch of 7 records failed (attempt 2, retrying" in caplog.text


def test_an_attempt_in_hand_too_long_says_where_it_waits(caplog):
    async def main():
        gate = asyncio.Event()

        async def insert_into_clickhouse():
            await gate.wait()

        policy = RetryPolicy(stuck_after=0.05, give_up_after=10)
        task = asyncio.ensure_future(policy.run(insert_into_clickhouse, name="sink_t", size=2))
        while "in hand" not in caplog.text:
            await asyncio.sleep(0.01)
        gate.set()
        await task

    with caplog.at_level("WARNING", logger="flywheel.runtime.retry"):
        asyncio.run(main())
    assert "sink_t: a batch of 2 records has been in hand" in caplog.text
    assert "in insert_into_clickhouse" in caplog.text  # the handler's own frame, not only the wrapper's


def test_an_attempt_that_hangs_is_cancelled_and_retried():
    attempts: list[str] = []

    async def main():
        never = asyncio.Event()

        async def attempt():
            attempts.append("started")
            if len(attempts) == 1:
                try:
                    await never.wait()  # a lost reply: this attempt would wait forever
                except asyncio.CancelledError:
                    attempts.append("cancelled")
                    raise

        await RetryPolicy(first_backoff=0.01, stuck_after=0.02, give_up_after=0.1).run(attempt, name="t", size=3)

    asyncio.run(main())
    assert attempts == ["started", "cancelled", "started"]


def test_a_stopping_worker_lets_the_attempt_in_hand_finish():
    finished = []

    async def main():
        async def attempt():
            await asyncio.sleep(0.05)
            finished.append(True)

        task = asyncio.ensure_future(RetryPolicy(stop_grace=5).run(attempt, name="t", size=1))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert finished == [True]
