"""Clean shutdown, many times (issue: workers crashed at exit on SIGTERM).

    .venv/bin/python bench/shutdown.py [--cycles 20] [--events 500]

Starts its own Kafka, then runs tests/integration/shutdown_cycles.py's loop: per cycle a worker starts,
takes --events events, is killed with SIGKILL and restarted every other cycle, catches up, and gets a
SIGTERM. Prints each cycle's exit codes and, at the end, the events stored against the events sent.
A clean run: every SIGTERM exit 0, stored = sent.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "integration")]

from flywheel import devkafka  # noqa: E402
from helpers import free_port, unique_settings  # noqa: E402
from shutdown_cycles import run_cycles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--events", type=int, default=500, help="events sent per cycle")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-bench-shutdown-"))
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    started = time.monotonic()
    try:
        devkafka.start(broker)
        cycles = run_cycles(unique_settings(broker.bootstrap, tmp / "worker"), args.cycles, args.events)
    finally:
        devkafka.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)
    for i, c in enumerate(cycles):
        print(f"cycle {i:>2}: {'kill -9 ' + str(c.killed) + ', restart, ' if c.killed is not None else ''}"
              f"SIGTERM exit {c.terminated}")
    codes = Counter(c.terminated for c in cycles)
    last = cycles[-1]
    print(f"\n{args.cycles} SIGTERMs: exit codes {dict(codes)}; {sum(c.killed is not None for c in cycles)} kill -9; "
          f"events stored {last.rows:,} of {last.sent:,} sent; {time.monotonic() - started:.0f} s")
    sys.exit(0 if codes == Counter({0: args.cycles}) and last.rows == last.sent else 1)


if __name__ == "__main__":
    main()
