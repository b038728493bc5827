"""Soak: months of simulated traffic through one worker — do the dedup table, its changelog and the
worker's memory stay flat once the dedup horizon is reached?

    make bench-soak                                     # = .venv/bin/python bench/soak.py
    .venv/bin/python bench/soak.py --events 2000000 --days 90
    .venv/bin/python bench/soak.py --events 100000 --days 20          # a quick look

One invocation, one machine: a local Kafka (flywheel.devkafka, free ports, temporary directory) and one
`flywheel worker` with embedded ClickHouse, as a user runs it. The traffic is a shop's: --days simulated
days of --events events in all; for --growth-days days new anonymous visitors (a fifth of the events),
a third of whom sign up (identify: an identity link), then no one new (the population is made: memory
that still grows then grows with events, not people); returning persons are picked with a recency bias
(a person last seen k days ago, k ~ exponential with mean 10). Each record's receivedAt header is the simulated time,
so the dedup table's arrival clock runs on simulated days. SDK retries: --retry-rate of each day's
events are sent again (same bytes) hours later — all must be dropped; and a few hundred after 3
horizons — none may be (the table has forgotten them; the README says so).

The day's events are sent (aiokafka's batch API), then the bench waits until the worker has read them
all and every stage's lag is 0, and samples — every --sample-every days:
- the tables' keys (RocksDB's estimate: overwrites not yet compacted away count too, so the persons
  table, rewritten at each event, shows several keys per person) and RocksDB memory (memtables, block
  cache, index and filters), from /status;
- each changelog topic's size on disk (the broker's partition directories);
- the worker's RSS (/proc/<pid>/status VmRSS) and ClickHouse's own tracked memory (MemoryTracking);
- events received, valid, duplicate.

Kafka compacts a changelog's closed segments on wall-clock time; months pass here in minutes, so the
bench creates the three changelog topics itself, compacted, with 8 MB segments rolled every 60 s and
tombstones kept 60 s: what the defaults (1 GB segments, 7 days, tombstones kept a day) do over weeks.

Results: bench/results/soak-<time>.json and .txt (the samples as a table, and the verdict).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from flywheel import devkafka
from flywheel.config import Settings
from flywheel.metrics.definitions import load_metrics
from flywheel.model.clock import DAY_MS
from flywheel.model.envelope import HEADER_RECEIVED_AT, HEADER_SOURCE, kafka_key
from flywheel.runtime.partitioner import partition_of
from flywheel.runtime.topics import FIRST_SEEN, IDENTITY, PERSONS, changelog_topic, ensure_topics

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
import pipeline as pl  # noqa: E402  (bench/pipeline.py: topic names, free ports)
from helpers import WorkerProcess  # noqa: E402  (tests/helpers.py)
from restart import EVENT_MIX  # noqa: E402  (the same shop)

RESULTS = BENCH / "results"
START_DAY = 20_400  # 2025-11-08: simulated time starts here (UTC day number)
TABLES = {"dedup": FIRST_SEEN, "identity": IDENTITY, "persons": PERSONS}
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "segment.bytes": str(8 * 2**20), "segment.ms": "60000",
                    "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "60000"}
FLAT = 1.25  # "flat": the later peak at most this much above the earlier one (see verdict)
_NAMES = [e for e, _, w in EVENT_MIX for _ in range(w)]
_PROPS = [p for _, p, w in EVENT_MIX for _ in range(w)]


def log(message: str) -> None:
    print(f"[soak {datetime.now():%H:%M:%S}] {message}", flush=True)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Shop:
    """The simulated traffic, day by day."""

    def __init__(self, events: int, days: int, retry_rate: float, seed: int, growth_days: int):
        self.rng = random.Random(seed)
        self.growth_days = growth_days
        self.per_day = events // days
        self.retry_rate = retry_rate
        self.cohorts: list[int] = []  # day → how many persons arrived that day
        self.sent: list[tuple[int, bytes, bytes]] = []  # recent (receivedAt, key, value): for retries

    def day(self, d: int) -> list[tuple[int, bytes, bytes]]:
        """Day d's records as (receivedAt ms, key, value), in arrival order: events, then retries."""
        rng, base = self.rng, (START_DAY + d) * DAY_MS
        new = self.per_day // 5 if d < self.growth_days else 0
        self.cohorts.append(new)
        out = []
        for i in range(self.per_day):
            at = base + int(i / self.per_day * DAY_MS)
            if (i % 5 == 0 and new) or d == 0:
                who = (d, rng.randrange(new))
            elif i % 5 == 0:  # past the growth days: the population is made, anyone may come back
                back = rng.randrange(self.growth_days)
                who = (back, rng.randrange(self.cohorts[back]))
            else:
                back = min(d, int(rng.expovariate(0.1)))
                while not self.cohorts[d - back]:  # a day without newcomers: someone earlier
                    back = rng.randrange(d + 1)
                who = (d - back, rng.randrange(self.cohorts[d - back]))
            anon = f"anon-{who[0]}-{who[1]}"
            if who[1] % 3 == 0 and i % 5 == 0:
                message = {"type": "identify", "anonymousId": anon, "userId": f"user-{who[0]}-{who[1]}",
                           "traits": {"plan": "free"}}
            else:
                j = rng.randrange(len(_NAMES))
                message = {"type": "track", "event": _NAMES[j], "anonymousId": anon, "properties": _PROPS[j]}
            message |= {"messageId": f"{d}-{i}-{rng.getrandbits(40):x}", "timestamp": iso(at - rng.randrange(5000))}
            out.append((at, (kafka_key(message) or "").encode(), orjson.dumps(message)))
        retries = [(at + rng.randrange(1, 6) * 3_600_000, key, value)  # the same bytes, 1-5 hours later
                   for at, key, value in rng.sample(out, int(len(out) * self.retry_rate))]
        retries = [(min(at, base + DAY_MS - 1), key, value) for at, key, value in retries]
        return out + sorted(retries)


async def send(bootstrap: str, topic: str, partitions: int, records: list[tuple[int, bytes, bytes]]) -> None:
    """Records to events.raw on their key's partition, with the headers the collector sets."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=50, max_batch_size=512 * 1024,
                                max_request_size=8 * 2**20)
    await producer.start()
    try:
        await producer.partitions_for(topic)
        batches = pl.Batches(producer, topic, partitions)
        for at, key, value in records:
            headers = [(HEADER_SOURCE, b"soak"), (HEADER_RECEIVED_AT, str(at).encode())]
            await batches.add(partition_of(key, partitions), key, value, headers)
        await batches.flush()
    finally:
        await producer.stop()


def create_changelogs(settings: Settings) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(changelog_topic(settings, t), settings.partitions, 1,
                                      topic_configs=CHANGELOG_CONFIG) for t in TABLES.values()])
    finally:
        admin.close()


def rss_parts(pid: int) -> dict[str, float]:
    """RssAnon (heaps: Python, RocksDB, ClickHouse) and RssFile (mapped code and files), in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def log_bytes(path: Path) -> int:
    """A partition directory's segment bytes (its .index/.timeindex files are preallocated, 10 MB each)."""
    return sum(f.stat().st_size for f in path.glob("*.log"))


def status(worker: WorkerProcess) -> dict[str, Any]:
    return orjson.loads(worker.get("/status"))


def wait_caught_up(worker: WorkerProcess, received: float, *, timeout: float, what: str) -> None:
    """Until the worker has read `received` records and a /status refreshed after that says every stage's
    lag is 0."""
    deadline = time.monotonic() + timeout
    read_at = None
    while True:
        if worker.proc.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: the worker did not catch up within {timeout:.0f} s:\n{worker.log_tail()}")
        if read_at is None and worker.metric("flywheel_events_received_total", source="soak") >= received:
            read_at = time.time()
        if read_at is not None:
            doc = status(worker)
            if (doc["as_of"] or 0) > read_at and all(s["lag"] == 0 for s in doc["stages"].values()):
                return
        time.sleep(1.0)


def sample(worker: WorkerProcess, broker_logs: Path, settings: Settings, day: int, started: float) -> dict[str, Any]:
    doc = status(worker)
    tables = doc.get("tables") or {}
    changelog_mb = {name: round(sum(log_bytes(p) for p in broker_logs.glob(f"{changelog_topic(settings, t)}-*"))
                                / 2**20, 1) for name, t in TABLES.items()}
    tracked = worker.scalar("SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'")
    rocksdb = sum(t.get(k, 0) for t in tables.values() for k in ("memtables", "block_cache", "index_filters"))
    return {
        "day": day, "seconds": round(time.monotonic() - started),
        "received": int(worker.metric("flywheel_events_received_total", source="soak")),
        "duplicates": int(worker.metric("flywheel_events_duplicate_total", source="soak")),
        "keys": {name: t.get("keys", 0) for name, t in tables.items()},
        "disk_mb": {name: round(t.get("sst_files", 0) / 2**20, 1) for name, t in tables.items()},
        "changelog_mb": changelog_mb,
        "rss_mb": round(pl.rss_bytes(worker.proc.pid) / 2**20, 1),
        "rocksdb_mb": round(rocksdb / 2**20, 1),
        "rocksdb_by_table_mb": {name: {k: round(t.get(k, 0) / 2**20, 1) for k in
                                       ("memtables", "block_cache", "index_filters")} for name, t in tables.items()},
        "clickhouse_mb": round(int(tracked) / 2**20, 1),
        "rss_parts_mb": rss_parts(worker.proc.pid),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-soak-"))
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
    devkafka.start(broker)
    tag = f"soak-{int(time.time())}"
    settings = Settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp / "worker", app_id=tag,
                        topics=pl.topics_for(tag), http_port=pl.free_port(), admin_port=pl.free_port(),
                        http_host="127.0.0.1", partitions=args.partitions, dedup_horizon_days=args.horizon_days,
                        store_memory_mb=args.store_memory_mb)
    worker = WorkerProcess(settings)
    shop = Shop(args.events, args.days, args.retry_rate, args.seed, args.growth_days)
    samples, sent, expected_dups = [], 0, 0
    forgotten: list[tuple[int, bytes, bytes]] = []  # sent again after 3 horizons: must not be dropped
    day1: list[tuple[int, bytes, bytes]] = []
    try:
        create_changelogs(settings)  # first: ensure_topics would create them with the broker's segment sizes
        ensure_topics(settings)
        worker.start()
        log(f"worker up (pid {worker.proc.pid}); {args.days} days of {shop.per_day:,} events, "
            f"horizon {args.horizon_days} days, store memory {args.store_memory_mb} MB")
        started = time.monotonic()
        for d in range(args.days):
            records = shop.day(d)
            retries = len(records) - shop.per_day
            if d == 1:
                day1 = records[:shop.per_day]
            if d == 3 * args.horizon_days + 1:  # day 1's events again, 3 horizons on
                forgotten = [((START_DAY + d) * DAY_MS + 60_000, key, value) for _, key, value in day1[:300]]
                records = records + forgotten
            asyncio.run(send(broker.bootstrap, settings.topics.raw, args.partitions, records))
            sent += len(records)
            expected_dups += retries
            wait_caught_up(worker, sent, timeout=args.day_timeout, what=f"day {d + 1}")
            if d % args.sample_every == args.sample_every - 1 or d == args.days - 1:
                s = sample(worker, broker.data_dir / "logs", settings, d + 1, started)
                samples.append(s)
                log(f"day {d + 1:3d}: {s['received']:,} received, {s['duplicates']:,} dropped; keys "
                    + ", ".join(f"{k} {v:,}" for k, v in s["keys"].items())
                    + f"; changelogs {s['changelog_mb']} MB; RSS {s['rss_mb']} MB "
                    f"(RocksDB {s['rocksdb_mb']}, ClickHouse {s['clickhouse_mb']})")
        seconds = time.monotonic() - started
        final = samples[-1]
        return {
            "args": vars(args), "seconds": round(seconds), "events_sent": sent,
            "events_per_s": round(sent / seconds), "samples": samples,
            "retries_sent": expected_dups, "retries_dropped": final["duplicates"],
            "forgotten_sent": len(forgotten),
            "persons": sum(shop.cohorts), "per_day": shop.per_day,
            "metrics_horizon_days": load_metrics(settings.metrics).horizon_days,
        }
    finally:
        worker.stop()
        devkafka.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)


def verdict(doc: dict[str, Any]) -> list[str]:
    """Flat: past its horizon, a measure's peak in the second half of the days is at most FLAT × its peak
    in the first half (RocksDB flushes and compactions make a sawtooth: peaks, not single samples). The
    dedup table and its changelog from two dedup horizons on (the table's full size); the worker's RSS
    also past the growth days (the population's) and the metrics' horizon (person states keep that many
    days of history, the partials that many days of cells)."""
    horizon = doc["args"]["horizon_days"]
    lines = [f"retries sent within the horizon: {doc['retries_sent']:,}; dropped as duplicates: "
             f"{doc['retries_dropped']:,}" + (" ✓" if doc["retries_dropped"] == doc["retries_sent"] else " ✗"),
             f"sent again after 3 horizons: {doc['forgotten_sent']} (not dropped: counted above if they were)"]
    table_from = 2 * horizon + 1
    rss_from = max(table_from, doc["args"]["growth_days"] + 1, doc.get("metrics_horizon_days", 0) + 1)
    for name, start, value in (("dedup table on disk MB", table_from, lambda s: s["disk_mb"]["dedup"]),
                               ("dedup changelog MB", table_from, lambda s: s["changelog_mb"]["dedup"]),
                               ("worker RSS MB", rss_from, lambda s: s["rss_mb"])):
        window = [s for s in doc["samples"] if s["day"] >= start]
        if len(window) < 4:
            lines.append(f"{name}: too few samples from day {start} to judge: run more days")
            continue
        half = len(window) // 2
        a, b = max(map(value, window[:half])), max(map(value, window[half:]))
        ok = b <= a * FLAT
        lines.append(f"{name}: peak days {window[0]['day']}–{window[half - 1]['day']} {a:,} → days "
                     f"{window[half]['day']}–{window[-1]['day']} {b:,} ({b / a if a else float('inf'):.2f}×) "
                     f"{'flat ✓' if ok else 'GROWS ✗'}")
    return lines


def render(doc: dict[str, Any]) -> str:
    from flywheel.query import format_table

    rows = [[s["day"], s["seconds"], f"{s['received']:,}", f"{s['duplicates']:,}",
             f"{s['keys']['dedup']:,}", s["disk_mb"]["dedup"], s["changelog_mb"]["dedup"], f"{s['keys']['persons']:,}",
             s["changelog_mb"]["persons"], f"{s['keys']['identity']:,}", s["rss_mb"], s["rocksdb_mb"],
             s["clickhouse_mb"]] for s in doc["samples"]]
    head = (f"soak: {doc['events_sent']:,} records over {doc['args']['days']} simulated days "
            f"({doc['per_day']:,} events a day, {doc['persons']:,} persons), dedup horizon "
            f"{doc['args']['horizon_days']} days, FLYWHEEL_STORE_MEMORY_MB={doc['args']['store_memory_mb']}; "
            f"{doc['seconds']} s, {doc['events_per_s']:,} records/s")
    table = format_table(["day", "s", "received", "dropped", "dedup keys≈", "dedup disk MB", "dedup log MB", "persons≈",
                          "persons log MB", "identity", "RSS MB", "RocksDB MB", "ClickHouse MB"], rows, "table")
    return "\n".join([head, table, *verdict(doc)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--horizon-days", type=int, default=7, help="FLYWHEEL_DEDUP_HORIZON_DAYS")
    parser.add_argument("--store-memory-mb", type=int, default=512, help="FLYWHEEL_STORE_MEMORY_MB")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--retry-rate", type=float, default=0.01)
    parser.add_argument("--sample-every", type=int, default=3, help="days between samples")
    parser.add_argument("--day-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--growth-days", type=int, default=15,
                        help="new persons arrive on the first N days only; then the population is made")
    args = parser.parse_args()
    doc = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(doc, indent=2))
    text = render(doc)
    (RESULTS / f"soak-{stamp}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
