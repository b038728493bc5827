"""`flywheel sql` keeps answering through a kill -9 and a restart of the worker, and the worker starts even
when a command holds embedded ClickHouse at that instant (README "Operations", docs/design.md §7)."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from events_gen import generate
from flywheel.producer import Producer
from helpers import REPO, WorkerProcess, settings_env, wait_until

pytestmark = pytest.mark.integration

COUNT = "SELECT count() FROM flywheel.events FINAL"


def flywheel_sql(env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "sql", COUNT, "--format", "tsv"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


class QueryLoop:
    """`flywheel sql` again and again, as an operator's script would: every answer kept."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.answers: list[tuple[int, str, str]] = []  # (exit code, stdout, stderr)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            proc = flywheel_sql(self.env)
            out, err = proc.communicate(timeout=300)
            self.answers.append((proc.returncode, out, err))

    def start(self) -> QueryLoop:
        self.thread.start()
        return self

    def answered(self, n: int, what: str) -> None:
        """Until `n` more queries have finished from now."""
        target = len(self.answers) + n
        wait_until(lambda: len(self.answers) >= target, timeout=300, what=f"{n} queries {what}")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=320)


@contextmanager
def held(clickhouse_dir: Path) -> Iterator[None]:
    """Hold the directory's lock as a process with the engine open does (a `flywheel sql` run directly):
    ClickHouse flocks <dir>/status while it runs (and removes the file when it closes)."""
    with open(clickhouse_dir / "status", "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits for a query of the loop that has it open
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def test_queries_answer_through_a_kill_and_a_restart_and_the_worker_starts(pipeline_settings):
    traffic = generate(2000, retry_rate=0.0, n_invalid=0, seed=5)
    expected = f"count()\n{len(traffic.valid_ids)}"  # --format tsv: the header, the row
    env = settings_env(pipeline_settings)
    worker = WorkerProcess(pipeline_settings).start()
    loop = QueryLoop(env)
    try:
        with Producer(pipeline_settings.kafka_bootstrap, topic=pipeline_settings.topics.raw, source="test") as p:
            for key, value in traffic.records:
                p.send_raw(value, key=key)
        wait_until(lambda: worker.scalar(COUNT) == len(traffic.valid_ids), timeout=180, what="the events")
        loop.start().answered(2, "through the running worker")

        worker.kill()
        loop.answered(2, "with no worker (the engine opened directly)")

        with held(pipeline_settings.clickhouse_dir):
            worker.start(wait_ready=False)
            wait_until(lambda: "is held by another process" in worker.log_tail(20), timeout=120,
                       what="the starting worker waiting for the held directory")
            # The worker has named itself in worker.json: a query now waits for its /sql, saying so.
            waiting = flywheel_sql(env)
            first = waiting.stderr.readline()
            assert first.startswith(f"waiting: the worker (pid {worker.proc.pid}) is starting"), first
        out, err = waiting.communicate(timeout=300)
        assert (waiting.returncode, out.strip()) == (0, expected), err

        worker.wait_ready()
        loop.answered(2, "after the restart")
        loop.stop()

        failed = [(code, out, err[-500:]) for code, out, err in loop.answers if code != 0 or out.strip() != expected]
        assert failed == [], f"{len(failed)} of {len(loop.answers)} queries failed"
        assert worker.proc.poll() is None
    finally:
        loop.stop()
        worker.stop()
