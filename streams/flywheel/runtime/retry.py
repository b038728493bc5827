"""The one retry policy (docs/design.md §7): what is retried, how often, and what a hung attempt gets.

- Bad data — rows ClickHouse refuses as such (clickhouse/errors.py) — is never retried: the sink
  isolates the rows and dead-letters them (stages/sink.py).
- Anything else (Kafka or ClickHouse unreachable, timeouts, a bug) fails the attempt. The delivery of
  a batch (runtime/delivery.py) then gives the same records to its stage again after a back-off
  (doubling from FIRST_BACKOFF to MAX_BACKOFF), for as long as it takes; nothing is acked meanwhile.
  A stage is written so that such a retry redoes only the batch's own work (docs/design.md §7).
- An attempt still running after `stuck_after` is logged with where it waits; after `give_up_after`
  it is cancelled and retried like a failure, so one lost reply cannot stall a partition forever.

Nothing else in the package loops on failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flywheel import observability as obs
from flywheel.clickhouse.errors import is_bad_data

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    first_backoff: float = 0.5
    max_backoff: float = 30.0
    stuck_after: float = 30.0
    give_up_after: float = 120.0
    stop_grace: float = 30.0  # a stopping worker lets the attempt in hand finish this long
    # stage → {"since": epoch s, "attempts": n, "error": text} while its batch keeps failing (/status)
    failing: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @staticmethod
    def is_bad_data(exc: BaseException) -> bool:
        """Whether the data itself is refused (dead-letter it) rather than the service failing (retry)."""
        return is_bad_data(exc)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after the `attempt`-th failure (1-based)."""
        return min(self.first_backoff * 2 ** (attempt - 1), self.max_backoff)

    async def run(self, attempt: Callable[[], Awaitable[T]], *, name: str, size: int) -> T:
        """`attempt()` until it returns. `name` and `size` (records) are for the logs."""
        failures = 0
        while True:
            work = asyncio.ensure_future(attempt())
            try:
                result = await self._watch(work, name, size)
            except asyncio.CancelledError:
                # The worker is stopping: let the attempt's outputs land, within reason (nothing is acked).
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(work), self.stop_grace)
                raise
            except Exception as exc:  # classified by the stage itself; whatever reaches here is retried
                failures += 1
                wait = self.backoff(failures)
                self.failing.setdefault(name, {"since": time.time()}).update(attempts=failures, error=repr(exc)[:300])
                obs.STAGE_FAILING.labels(name).set(1)
                log.error("%s: batch of %d records failed (attempt %d, retrying in %.1fs; its partitions wait): %r",
                          name, size, failures, wait, exc, exc_info=failures == 1)
                await asyncio.sleep(wait)
                continue
            if failures:
                log.warning("%s: batch of %d records done after %d failed attempts", name, size, failures)
                self.failing.pop(name, None)
                obs.STAGE_FAILING.labels(name).set(0)
            return result

    async def _watch(self, work: asyncio.Future, name: str, size: int):
        """Await `work`; say where it waits while it takes long; cancel it after give_up_after."""
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({work}, timeout=self.stuck_after)
            if done:
                return work.result()
            waited += self.stuck_after
            log.warning("%s: a batch of %d records has been in hand for %.0f s; waiting in:\n%s",
                        name, size, waited, awaiting(work))
            if waited >= self.give_up_after:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                raise TimeoutError(f"no result after {waited:.0f} s; the attempt was cancelled")


def awaiting(task: asyncio.Future) -> str:
    """Where a task waits: its chain of awaited coroutines (Task.get_stack shows only the outermost)."""
    coro = getattr(task, "get_coro", lambda: None)()
    frames = []
    while coro is not None and hasattr(coro, "cr_frame"):
        if coro.cr_frame is not None:
            frames.append((coro.cr_frame, coro.cr_frame.f_lineno))
        coro = coro.cr_await
    lines = traceback.StackSummary.extract(frames).format()
    return "".join(lines) + f"  awaiting {coro!r}"
