"""Definitions benchmark (issue 18): what a definition added while running costs — the switch and the backfill.

    make bench-definitions                      # = .venv/bin/python bench/definitions.py
    .venv/bin/python bench/definitions.py --persons 3000 --days 20

A local Kafka and one `flywheel worker` (embedded ClickHouse) on tests/integration/metrics_gen.py's journeys
(--persons over --days, every metric of its metrics file on). Once every event is in ClickHouse,
`flywheel metrics import` adds a funnel, a retention and a segment whose conditions no state has history for
(one of them a cohort event before). Measured from the import:

- the switch: until the worker's partitions have counted their cells again under the new set (its log);
- the backfill: until the leader's job is done (its log), the events it sent back, and the worker's CPU
  seconds over the whole of it — CPU µs per backfilled event, and per stored event;
- then whether every view equals its oracle under the new definitions (flywheel metrics verify's check).

The hot path's share of the feature is a dispatch per record and an idempotent insert where person.apply
kept times (bench/metrics.py measures the aggregate stage's CPU per event; compare runs before and after).

Results: bench/results/definitions-<time>.json and .txt.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
import metrics as mb  # noqa: E402  (bench/metrics.py: the worker harness)
import pipeline as pl  # noqa: E402
from flywheel.metrics import verify  # noqa: E402
from flywheel.metrics.definitions import parse_metrics  # noqa: E402
from metrics_gen import METRICS_YAML_ONE_STORE_EACH, NOW, journeys, ms  # noqa: E402

ADDED = {
    "funnels": [{"name": "signup_to_order", "window": "3d",
                 "steps": [{"event": "Signed Up"}, {"event": "Product Added"}, {"event": "Order Completed"}]}],
    "retention": [{"name": "adders_checkout", "cohort_event": "Product Added", "return_event": "Checkout Started",
                   "period": "day", "horizon": 5}],
    "segments": [{"name": "repeat_adders", "all": [{"performed": "Product Added", "count": {"gte": 2},
                                                     "within": "30d"}]}],
}


def log_after(path: Path, mark: int, pattern: str) -> re.Match | None:
    return re.search(pattern, path.read_text(errors="replace")[mark:])


def run(args, tmp: Path) -> dict[str, Any]:
    from flywheel import devkafka
    from flywheel.producer import Producer

    old = yaml.safe_load(METRICS_YAML_ONE_STORE_EACH)
    new = {**old, **{k: [*old.get(k, []), *v] for k, v in ADDED.items()}}
    old_file, new_file = tmp / "old.yaml", tmp / "new.yaml"
    old_file.write_text(yaml.safe_dump(old, sort_keys=False))
    new_file.write_text(yaml.safe_dump(new, sort_keys=False))
    clock = tmp / "clock"
    clock.write_text(str(ms(NOW)))
    messages, _ = journeys(n_persons=args.persons, days=args.days, seed=args.seed)
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
    pl.log(f"starting Kafka at {broker.bootstrap}; {len(messages):,} events of {args.persons:,} persons")
    devkafka.start(broker)
    settings = mb.worker_settings(broker.bootstrap, args.partitions, None, f"defs{int(time.time())}", tmp / "w",
                                  metrics=old_file, clock_file=clock)
    worker = mb.Worker(settings).start()
    try:
        worker.wait_ready(time.monotonic() + 600)
        with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="bench") as p:
            for m in messages:
                p.send(m)
        mb.wait_for(lambda: worker.scalar("SELECT count() FROM flywheel.events FINAL") == len(messages),
                    deadline=time.monotonic() + 1800, what="every event in ClickHouse", interval=1)
        time.sleep(3)  # the aggregate's last publications
        mark = len(worker.log_path.read_text(errors="replace"))
        cpu0, t0 = pl.proc_cpu_seconds(worker.pid), time.monotonic()
        imported = subprocess.run([sys.executable, "-m", "flywheel.cli", "metrics", "import", str(new_file),
                                   "--author", "bench"], env=pl.worker_env(settings, {}), capture_output=True,
                                  text=True, timeout=300)
        if imported.returncode:
            raise RuntimeError(imported.stdout + imported.stderr)
        t_import = time.monotonic() - t0
        switched = mb.wait_for(lambda: log_after(worker.log_path, mark, r"partials of partitions .* restored in "
                                                                        r"([\d.]+)s"),
                               deadline=time.monotonic() + 600, what="the switch", interval=0.1)
        t_switch = time.monotonic() - t0
        done = mb.wait_for(lambda: log_after(worker.log_path, mark, r"backfill of revision \d+ done: (\d+) events"),
                           deadline=time.monotonic() + 3600, what="the backfill", interval=0.1)
        t_done = time.monotonic() - t0
        # the last backfilled events through ingest and aggregate: until the views equal the oracles
        metrics = parse_metrics(new)
        equal = mb.wait_for(lambda: (lambda v, o: v == o)(verify.views(worker.sql),
                                                           verify.oracles(worker.sql, metrics, ms(NOW))),
                            deadline=time.monotonic() + 600, what="views equal to the oracles", interval=1)
        t_equal = time.monotonic() - t0
        cpu = pl.proc_cpu_seconds(worker.pid) - cpu0
        backfilled = int(done.group(1))
    finally:
        worker.stop()
        devkafka.stop(broker)
    return {"events": len(messages), "persons": args.persons, "days": args.days, "partitions": args.partitions,
            "import_s": round(t_import, 2), "switch_s": round(t_switch, 2),
            "recount_s": float(switched.group(1)), "backfill_done_s": round(t_done, 2),
            "views_equal_s": round(t_equal, 2), "views_equal_oracles": bool(equal), "backfilled_events": backfilled,
            "worker_cpu_s": round(cpu, 2),
            "cpu_us_per_backfilled_event": round(cpu / max(1, backfilled) * 1e6, 1),
            "cpu_us_per_stored_event": round(cpu / len(messages) * 1e6, 1),
            "backfilled_events_per_s": round(backfilled / max(1e-9, t_done - t_switch), 1),
            "loadavg_end": mb.loadavg()}


def render(doc: dict[str, Any]) -> str:
    r = doc["run"]
    return "\n".join([
        f"Flywheel definitions bench {doc['started']} ({doc['commit']}), {doc['cpus']} CPUs",
        f"{r['events']:,} stored events of {r['persons']:,} persons over {r['days']} days, "
        f"{r['partitions']} partitions; a funnel, a retention and a segment with new conditions imported while running",
        f"  import command {r['import_s']} s; switch (cells counted again) after {r['switch_s']} s "
        f"(the recount itself {r['recount_s']} s)",
        f"  backfill done after {r['backfill_done_s']} s: {r['backfilled_events']:,} events sent back "
        f"({r['backfilled_events_per_s']:,}/s); views equal the oracles: {r['views_equal_oracles']} "
        f"(after {r['views_equal_s']} s)",
        f"  worker CPU {r['worker_cpu_s']} s: {r['cpu_us_per_backfilled_event']} us per backfilled event, "
        f"{r['cpu_us_per_stored_event']} us per stored event (load at the end {r['loadavg_end'][0]})",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=2000)
    parser.add_argument("--days", type=int, default=12)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    doc: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "commit": mb.git_commit(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-defs-") as tmp:
        doc["run"] = run(args, Path(tmp))
    pl.save_results("definitions", doc, render(doc))


if __name__ == "__main__":
    main()
