"""Start, load, kill -9, restart, SIGTERM, again and again: what tests/integration/test_shutdown.py runs a few
times and bench/shutdown.py many times. Each SIGTERM must end the worker with exit 0, and no event may be
lost or counted twice."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass

from flywheel.config import Settings
from flywheel.producer import Producer
from helpers import WorkerProcess, wait_until


@dataclass
class Cycle:
    killed: int | None  # exit code of the kill -9 (-9), or None when the cycle had no kill
    terminated: int  # exit code after SIGTERM: 0 is a clean shutdown
    rows: int  # distinct events in ClickHouse after the cycle
    sent: int  # distinct events sent so far


def run_cycles(settings: Settings, cycles: int, events_per_cycle: int = 500) -> list[Cycle]:
    worker = WorkerProcess(settings)
    out: list[Cycle] = []
    sent = 0
    try:
        for i in range(cycles):
            worker.start()
            with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="cycles") as p:
                for n in range(events_per_cycle):
                    p.track(user_id=f"user-{i}-{n % 50}", event="Page Viewed", messageId=f"c{i}-{n}")
            sent += events_per_cycle
            killed = None
            if i % 2 == 0:  # every other cycle: killed mid-load first, then restarted
                wait_until(lambda: worker.scalar("SELECT count() FROM flywheel.events") > 0, timeout=120,
                           what="the first rows", interval=0.2)
                worker.kill()
                killed = worker.proc.returncode
                worker.start()
            wait_until(lambda s=sent: worker.scalar("SELECT uniqExact(message_id) FROM flywheel.events") == s,
                       timeout=240, what=f"cycle {i}: {sent} events")
            worker.proc.send_signal(signal.SIGTERM)
            try:
                worker.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
            out.append(Cycle(killed, worker.proc.returncode, 0, sent))
        worker.start()  # what is stored after all of it
        rows = worker.scalar("SELECT uniqExact(message_id) FROM flywheel.events")
        out[-1].rows = rows
        return out
    finally:
        worker.stop()
