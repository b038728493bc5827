"""Latency under sustained load (issue 19): event → live cell, while the pipeline takes R events/s.

    make bench-latency                                  # = .venv/bin/python bench/latency.py
    .venv/bin/python bench/latency.py --rates 2000,3500,5000 --seconds 60 --workers 1,2

Per rate and worker count, on a local Kafka with fresh topics and bench/throughput-metrics.yaml:

1. the worker(s) start (more than one: with a `flywheel store` owning their embedded ClickHouse);
2. background traffic: flywheel.sample journeys of the last day (every event activity, many in the
   funnels, segments and experiments of the metrics file), sent at R events/s in 10 ms slices through
   the project's Producer, pre-serialised;
3. probes, 4 per second: a fresh anonymous visitor's page view dated three days ago, a day no background
   event touches. Each adds exactly one person to the daily-active-users cell of that day on the
   events.identified partition its person id hashes to, so the k-th probe of partition p is live when
   metrics.active_users carries that cell with persons >= k (what services subscribe to; ClickHouse's
   views follow within FLYWHEEL_SINK_FLUSH_SECONDS). Latency = that record read back − the probe handed to
   the producer;
4. the first --warmup seconds of probes are not counted (start-up, first batches).

Reported: the rate actually sent, probe latency p50/p95/p99/max, whether the pipeline kept up (events
ingested by the end vs sent; latency of the last probes vs the first), CPU of every Flywheel process and the
broker. Results: bench/results/latency-<time>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as pl  # noqa: E402  (bench/pipeline.py: Kafka, processes, CPU)
from flywheel import devkafka  # noqa: E402
from flywheel.model.envelope import kafka_key  # noqa: E402
from flywheel.runtime.partitioner import partition_of  # noqa: E402

PROBES_PER_S = 4


class CellWatch(threading.Thread):
    """Reads metrics.active_users from its end; records when each partition's DAU cell of `day` reaches k."""

    def __init__(self, bootstrap: str, topic: str, day: str):
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        parts = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic) or ()]
        self.consumer.assign(parts)
        self.consumer.seek_to_end(*parts)
        for tp in parts:
            self.consumer.position(tp)  # resolve the end now, before anything is sent
        self.day = day
        self.seen: dict[tuple[int, int], float] = {}  # (partition, k) → monotonic time first seen
        self.best: dict[int, int] = {}
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            for records in self.consumer.poll(timeout_ms=50).values():
                now = time.monotonic()
                for r in records:
                    v = orjson.loads(r.value)
                    if v.get("kind") != "dau" or v.get("day") != self.day:
                        continue
                    p, n = v["partition"], v["persons"]
                    for k in range(self.best.get(p, 0) + 1, n + 1):
                        self.seen.setdefault((p, k), now)
                    self.best[p] = max(self.best.get(p, 0), n)
        self.consumer.close()


def background(n: int, seed: int) -> list[tuple[str | None, bytes]]:
    from flywheel.sample import journeys

    start = datetime.now(UTC) - timedelta(days=1)
    out = []
    for m in journeys(n, seed=seed, days=1, start=start):
        m.setdefault("messageId", str(uuid.uuid4()))
        out.append((kafka_key(m), orjson.dumps(m)))
    return out[:n]


def one(broker: devkafka.Broker, broker_pid: int, tmp: Path, rate: int, workers: int, args) -> dict[str, Any]:
    from flywheel.producer import Producer

    tag = f"{uuid.uuid4().hex[:6]}r{rate}w{workers}"
    settings = pl.run_settings(broker.bootstrap, args.partitions, f"lat-{tag}.events.raw", tag, tmp / tag)
    if args.linger is not None:
        settings = settings.model_copy(update={"aggregate_linger_seconds": args.linger})
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    n = int(rate * args.seconds)
    pl.log(f"rate {rate}/s, {workers} worker(s): generating {n:,} background events")
    traffic = background(n, args.seed)
    try:
        each = pl.start(settings, workers, procs, time.monotonic() + 240)
        settings = each[0]
        time.sleep(args.settle)  # the group's assignment settles before the load starts

        probe_day = (datetime.now(UTC) - timedelta(days=3)).replace(hour=12, minute=0, second=0, microsecond=0)
        watch = CellWatch(broker.bootstrap, settings.topics.active_users, probe_day.date().isoformat())
        watch.start()
        probes: list[dict[str, Any]] = []  # partition, k, sent (monotonic), at (s since the load started)
        per_partition: dict[int, int] = {}
        usage = pl.Usage({name: p.pid for name, (p, _) in procs.items()} | {"broker": broker_pid,
                                                                         "sender": os.getpid()}).start()
        with Producer(broker.bootstrap, topic=settings.topics.raw, source="bench", linger_ms=5,
                      max_in_flight_requests_per_connection=5) as producer:
            t0 = time.monotonic()
            sent = i = 0
            next_probe = t0
            while sent < n:
                now = time.monotonic()
                due = min(n, int((now - t0) * rate) + 1)
                while sent < due:
                    key, value = traffic[sent]
                    producer.send_raw(value, key=key)
                    sent += 1
                if now >= next_probe:
                    anon = f"probe-{tag}-{i}"
                    producer.send({"type": "page", "anonymousId": anon, "name": "Probe",
                                   "timestamp": probe_day.isoformat().replace("+00:00", "Z")})
                    p = partition_of(anon.encode(), args.partitions)
                    per_partition[p] = per_partition.get(p, 0) + 1
                    probes.append({"partition": p, "k": per_partition[p], "sent": time.monotonic(),
                                   "at": round(time.monotonic() - t0, 2)})
                    i += 1
                    next_probe += 1 / PROBES_PER_S
                time.sleep(0.01)
            load_seconds = time.monotonic() - t0
        ended = time.monotonic()
        while time.monotonic() < ended + args.drain and not all((pr["partition"], pr["k"]) in watch.seen
                                                                  for pr in probes):
            time.sleep(0.2)
        cpu = usage.stop()
        watch.stopping = True
        watch.join(timeout=10)
        received = sum(pl.metric_sum(pl.metric_values(s.admin_port), "flywheel_events_received_total")
                       for s in each)
    finally:
        for p, _ in reversed(list(procs.values())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    counted = [pr for pr in probes if pr["at"] >= args.warmup]
    lat = sorted(watch.seen[(pr["partition"], pr["k"])] - pr["sent"] for pr in counted
                 if (pr["partition"], pr["k"]) in watch.seen)
    missing = len(counted) - len(lat)

    def q(x: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(x * len(lat)))], 3) if lat else None

    tail = [watch.seen[(pr["partition"], pr["k"])] - pr["sent"] for pr in counted[-PROBES_PER_S * 5:]
            if (pr["partition"], pr["k"]) in watch.seen]
    head = [watch.seen[(pr["partition"], pr["k"])] - pr["sent"] for pr in counted[:PROBES_PER_S * 5]
            if (pr["partition"], pr["k"]) in watch.seen]
    return {
        "rate": rate, "workers": workers, "sent": n + len(probes), "load_seconds": round(load_seconds, 2),
        "sent_per_s": round((n + len(probes)) / load_seconds), "received_by_drain_end": int(received),
        "probes": len(counted), "probes_missing": missing,
        "p50_s": q(0.5), "p95_s": q(0.95), "p99_s": q(0.99), "max_s": round(lat[-1], 3) if lat else None,
        "first_5s_median_s": round(statistics.median(head), 3) if head else None,
        "last_5s_median_s": round(statistics.median(tail), 3) if tail else None,
        "flywheel_cores": round(sum(cpu[f"{name}_cores"] for name in procs), 3), **cpu,
    }


def render(doc: dict[str, Any]) -> str:
    lines = [f"Flywheel latency bench {doc['started']}: event -> live cell (metrics.active_users) under load, "
             f"{doc['config']['partitions']} partitions, {os.cpu_count()} CPUs, metrics {doc['config']['metrics']}",
             "",
             "rate/s  workers  sent/s  p50 s  p95 s  p99 s  max s | first 5 s  last 5 s (median s) | "
             "Flywheel cores  broker cores  sender cores  kept up"]
    for r in doc["runs"]:
        kept = r["probes_missing"] == 0 and r["received_by_drain_end"] >= r["sent"]
        verdict = "yes" if kept else f"NO: {r['probes_missing']} probes unseen"
        lines.append(f"{r['rate']:>6}  {r['workers']:>7}  {r['sent_per_s']:>6}  {r['p50_s']!s:>5}  {r['p95_s']!s:>5}  "
                     f"{r['p99_s']!s:>5}  {r['max_s']!s:>5} | {r['first_5s_median_s']!s:>9}  "
                     f"{r['last_5s_median_s']!s:>8}          | {r['flywheel_cores']:>14}  {r['broker_cores']:>12}  "
                     f"{r['sender_cores']:>12}  {verdict}")
    lines.append("target: p99 < 2 s at 5,000 events/s sustained")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2000,5000", help="comma-separated events/s")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (more than 1: with a store)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds of load per run")
    parser.add_argument("--warmup", type=float, default=10, help="seconds of probes not counted at the start")
    parser.add_argument("--settle", type=float, default=8, help="seconds between the workers ready and the load")
    parser.add_argument("--drain", type=float, default=60, help="seconds to wait for the last probes after the load")
    parser.add_argument("--linger", type=float, default=None, help="FLYWHEEL_AGGREGATE_LINGER_SECONDS of the workers")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--metrics", type=Path, default=pl.REPO / "bench" / "throughput-metrics.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = parser.parse_args()
    pl.METRICS = args.metrics.resolve()
    started = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-latency-"))
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
    doc: dict[str, Any] = {"started": started.isoformat(timespec="seconds"),
                           "config": {**{k: str(v) for k, v in vars(args).items()}}, "runs": []}
    try:
        broker_pid = devkafka.start(broker)
        for workers in [int(w) for w in args.workers.split(",")]:
            for rate in [int(r) for r in args.rates.split(",")]:
                r = one(broker, broker_pid, tmp, rate, workers, args)
                pl.log(f"rate {rate}/s, {workers} worker(s): p50 {r['p50_s']} s, p99 {r['p99_s']} s, max "
                       f"{r['max_s']} s; {r['probes_missing']} probes unseen; {r['flywheel_cores']} Flywheel cores")
                doc["runs"].append(r)
    finally:
        devkafka.stop(broker)
        if args.keep:
            pl.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = render(doc)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    pl.RESULTS.mkdir(parents=True, exist_ok=True)
    (pl.RESULTS / f"latency-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (pl.RESULTS / f"latency-{stamp}.txt").write_text(text + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()
