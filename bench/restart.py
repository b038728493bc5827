"""Restart, rebalance and ClickHouse-outage benchmark: a worker with a big `persons` table.

    make bench-restart                                    # = .venv/bin/python bench/restart.py
    .venv/bin/python bench/restart.py --persons 1000000 --outage-seconds 300
    .venv/bin/python bench/restart.py --persons 20000 --outage-seconds 20      # a quick look
    .venv/bin/python bench/restart.py --persons 300000 --outage-seconds 60 --asyncio-debug   # who holds the loop

The issue's acceptance: with a million persons in the table, measure restart → first published cell,
the slowest /health answer during a rebalance and during a 5-minute ClickHouse outage. Targets: /health
within 1 s throughout; first cell ≤ 10 s after assignment.

One invocation, one machine:

1. fill: a local Kafka (flywheel.devkafka, free ports, temporary directory) and a clickhouse-server;
   the pipeline topics of a fresh app id (ensure_topics); N person states written straight into the
   `persons` changelog (no events through the pipeline): per person one or two events over the last
   28 days applied with the real code (PersonState, apply, Metrics.matching of schemas/metrics.yaml),
   value = orjson of state.to_json(), partition = partition_of(person id, partitions), the way the
   worker's own table writes land. No checkpoint records: what a table of the previous release looks
   like (sent with aiokafka's batch API: kafka-python's KafkaProducer costs ~100 us of CPU per record).
   Then --pre-events real events (track, userId = an existing person) through events.raw with
   flywheel.producer.Producer, so the first start has traffic;
2. first start (no checkpoint): one `flywheel worker` on an empty data dir: Faust recovers the whole
   changelog into RocksDB, the aggregate stage counts every partition's partials from the states and
   re-publishes every cell;
3. restart (checkpoint): SIGTERM, start again on the same data dir: partials loaded from checkpoints;
4. fresh start (checkpoint): SIGTERM, the data dir emptied, start again: a worker without local state
   recovers the changelog, which now holds the checkpoints the first start wrote;
5. rebalance: a traffic thread sends --rate events/s; a second worker (same app id, own data dir and
   ports) joins; both are measured until every partition is published again (the second worker's
   standby replicas go on recovering after that, into the next phase: Faust does not log their end);
6. ClickHouse outage: traffic on, the server is stopped for --outage-seconds and started again; the
   sink must say it is blocked (/metrics flywheel_sink_blocked) and every event of the traffic
   (rebalance and outage phases) must reach flywheel.events; /health is reported for the whole phase,
   while the server was down, and after it was back (the backlog being caught up).

Measured per phase: wall seconds, the workers' CPU seconds (/proc/<pid>/stat), assignment (the worker's
"assigned (generation N)" line) → first metrics.* record published, → every owned partition
published, process start → "Recovery complete" / "Worker ready", and /health on every worker's admin
listener polled every 100 ms by a separate process (a request that fails or times out at 5 s counts as
5 s; before a worker's first answer nothing counts); the slowest answers are listed with the worker's
last log line before them, and with --asyncio-debug with the coroutines that held the event loop.
Metrics records are read with a kafka-python consumer from the end offsets taken before the first
start; a record's time is its Kafka timestamp (the worker's clock at send).

ClickHouse: Debian's clickhouse-server 18.16 (tests/helpers.py ClickHouseServer; scripts/ensure-
clickhouse-server installs it). The production schema needs a current ClickHouse, so the worker runs
with FLYWHEEL_SQL_DIR at tests/integration/sql_18_16 (events, invalid_events, identity, the partial
tables: no views).

The machine may be shared (2 cores here, other tests may run): every phase records the load average
and how busy the whole machine was, beside the CPU seconds of the workers, broker and ClickHouse.
Results: bench/results/restart-<time>.json (and .txt with the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from flywheel import devkafka
from flywheel.config import Settings
from flywheel.metrics.definitions import load_metrics
from flywheel.metrics.person import PersonState, apply
from flywheel.model.clock import DAY_MS
from flywheel.runtime.partitioner import partition_of
from flywheel.runtime.topics import PERSONS, changelog_topic, ensure_topics

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
import pipeline as pl  # noqa: E402  (bench/pipeline.py: CPU and machine measurements, topic names)
from helpers import ClickHouseServer, WorkerProcess, free_port  # noqa: E402  (tests/helpers.py)

RESULTS = BENCH / "results"
SQL_18_16 = REPO / "tests" / "integration" / "sql_18_16" / "migrations"
HEALTH_TARGET_S = 1.0
FIRST_CELL_TARGET_S = 10.0
FAIL_S = 5.0  # a /health request that fails or times out counts as this
METRIC_KINDS = ("funnels", "retention", "active_users")
PRE, TRAFFIC = "pre", "trf"  # messageId prefixes: events sent before the first start, traffic during phases


# /health poller: its own process, so the bench's threads (producer, consumer) cannot delay it.
POLLER = r"""
import sys, time, urllib.request
port, out, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
f = open(out, "a", buffering=1)
url = f"http://127.0.0.1:{port}/health"
nxt = time.monotonic()
while True:
    at = time.time(); t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read(); status = str(r.status)
    except Exception as exc:
        status = type(exc).__name__
    f.write(f"{at:.3f} {time.monotonic() - t0:.4f} {status}\n")
    nxt = max(nxt + interval, time.monotonic())
    time.sleep(max(0.0, nxt - time.monotonic()))
"""


def log(message: str) -> None:
    print(f"[restart {datetime.now():%H:%M:%S}] {message}", flush=True)


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- 1. fill


EVENT_MIX = [  # (event, properties, weight): what a shop's persons do; the metrics of schemas/metrics.yaml
    ("Page Viewed", {"path": "/"}, 30),
    ("Product Viewed", {"product_id": "p-1", "category": "shoes", "price": 50.0}, 20),
    ("Product Viewed", {"product_id": "p-2", "category": "books", "price": 12.0}, 15),
    ("Product Added", {"product_id": "p-1", "category": "shoes", "price": 50.0, "quantity": 1}, 10),
    ("Checkout Started", {"items": 1}, 5),
    ("Order Completed", {"order_id": "o-1", "revenue": 50.0, "currency": "EUR"}, 8),
    ("Signed Up", {"method": "email"}, 12),
]
_NAMES = [e for e, _, w in EVENT_MIX for _ in range(w)]
_PROPS = [p for _, p, w in EVENT_MIX for _ in range(w)]


def person_id(i: int) -> str:
    return f"person-{i:08d}"


def fill_persons(settings: Settings, n: int, seed: int) -> dict[str, Any]:
    """N person states straight into the persons changelog, on the partition each person's events take."""
    return asyncio.run(_fill_persons(settings, n, seed))


async def _fill_persons(settings: Settings, n: int, seed: int) -> dict[str, Any]:
    # aiokafka's batch API (the worker's client): kafka-python's KafkaProducer.send costs ~100 us of CPU per
    # record here (~10k records/s with linger and 1 MB batches), a million records would take minutes.
    from aiokafka import AIOKafkaProducer

    metrics = load_metrics(settings.metrics)
    rng = random.Random(seed)
    topic = changelog_topic(settings, PERSONS)
    now = int(time.time() * 1000)
    span = 28 * DAY_MS
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks=1, linger_ms=100,
                                max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
    await producer.start()
    await producer.partitions_for(topic)  # metadata first: a batch sent before it is only warned about
    started = time.monotonic()
    cpu0 = time.process_time()
    nbytes = 0
    per_partition = [0] * settings.partitions
    matching_cache: dict[int, list] = {}
    batches = pl.Batches(producer, topic, settings.partitions)
    try:
        for i in range(n):
            pid = person_id(i)
            state = PersonState()
            for k in range(1 if rng.random() < 0.5 else 2):
                j = rng.randrange(len(_NAMES))
                matched = matching_cache.get(j)
                if matched is None:
                    matched = matching_cache[j] = metrics.matching(_NAMES[j], _PROPS[j])
                apply(state, f"fill-{i}-{k}", now - rng.randrange(span), matched, metrics)
            key = pid.encode()
            value = orjson.dumps(state.to_json())
            p = partition_of(key, settings.partitions)
            per_partition[p] += 1
            nbytes += len(key) + len(value)
            await batches.add(p, key, value)
            if i and i % 200_000 == 0:
                log(f"  {i:,} persons sent ({i / (time.monotonic() - started):,.0f}/s)")
                await batches.flush()
        await batches.flush()
    finally:
        await producer.stop()
    seconds = time.monotonic() - started
    held = pl.topic_size(settings.kafka_bootstrap, topic)
    if held != n:
        raise SystemExit(f"{topic} holds {held} records, expected {n}")
    return {"persons": n, "seconds": round(seconds, 1), "persons_per_s": round(n / seconds),
            "bench_cpu_seconds": round(time.process_time() - cpu0, 1), "mb": round(nbytes / 1e6, 1),
            "avg_value_bytes": round(nbytes / n), "per_partition": per_partition, "topic": topic}


def track_event(rng: random.Random, persons: int, ts_ms: int, prefix: str) -> dict[str, Any]:
    j = rng.randrange(len(_NAMES))
    return {"type": "track", "event": _NAMES[j], "userId": person_id(rng.randrange(persons)),
            "properties": dict(_PROPS[j]), "timestamp": iso(ts_ms),
            "messageId": f"{prefix}-{uuid.UUID(int=rng.getrandbits(128))}"}


def send_events(settings: Settings, n: int, persons: int, seed: int) -> dict[str, Any]:
    from flywheel.producer import Producer

    rng = random.Random(seed)
    started = time.monotonic()
    now = int(time.time() * 1000)
    with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="bench-restart",
                  linger_ms=50, batch_size=512 * 1024, max_in_flight_requests_per_connection=5) as producer:
        for _ in range(n):
            producer.send(track_event(rng, persons, now - rng.randrange(3_600_000), PRE))
    return {"events": n, "seconds": round(time.monotonic() - started, 2)}


class Traffic(threading.Thread):
    """`rate` events/s into events.raw (flywheel.producer.Producer) until stopped."""

    def __init__(self, settings: Settings, persons: int, rate: float, seed: int):
        super().__init__(daemon=True, name="traffic")
        self.settings, self.persons, self.rate = settings, persons, rate
        self.rng = random.Random(seed)
        self.sent = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from flywheel.producer import Producer

        try:
            with Producer(self.settings.kafka_bootstrap, topic=self.settings.topics.raw, source="bench-restart",
                          linger_ms=20) as producer:
                started = time.monotonic()
                while not self.stop_event.is_set():
                    due = int((time.monotonic() - started) * self.rate)
                    while self.sent < due:
                        producer.send(track_event(self.rng, self.persons, int(time.time() * 1000), TRAFFIC))
                        self.sent += 1
                    time.sleep(0.02)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> int:
        self.stop_event.set()
        self.join(timeout=120)
        if self.error is not None:
            raise RuntimeError(f"the traffic thread failed: {self.error!r}")
        return self.sent


# --------------------------------------------------------------------------- observers


class MetricsWatch(threading.Thread):
    """Every record published to metrics.* from the end offsets at start: (Kafka ms, partition field, topic)."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="metrics-watch")
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                      max_poll_records=5000)
        topics = [getattr(settings.topics, k) for k in METRIC_KINDS]
        tps = [TopicPartition(t, p) for t in topics for p in self.consumer.partitions_for_topic(t)]
        self.consumer.assign(tps)
        for tp, end in self.consumer.end_offsets(tps).items():
            self.consumer.seek(tp, end)
        self.records: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            got = self.consumer.poll(timeout_ms=200)
            batch = []
            for tp, records in got.items():
                for r in records:
                    batch.append((r.timestamp, int(orjson.loads(r.value)["partition"]), tp.topic))
            if batch:
                with self.lock:
                    self.records.extend(batch)

    def since(self, wall: float) -> list[tuple[int, int, str]]:
        ms = wall * 1000
        with self.lock:
            return [r for r in self.records if r[0] >= ms]

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self.consumer.close()


class HealthPoller:
    """GET /health every `interval` s from a child process; latencies read back per time window."""

    def __init__(self, port: int, path: Path, interval: float = 0.1):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-c", POLLER, str(port), str(path), str(interval)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def samples(self) -> list[tuple[float, float, str]]:
        out = []
        try:
            text = self.path.read_text()
        except OSError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((float(parts[0]), float(parts[1]), parts[2]))
        return out

    def stop(self) -> None:
        pl_terminate(self.proc)


def pl_terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def health_stats(samples: list[tuple[float, float, str]], start: float, end: float) -> dict[str, Any]:
    """Latencies in [start, end] (wall), from the first answer on; a failure counts as FAIL_S."""
    window = [s for s in samples if start <= s[0] <= end]
    first_ok = next((i for i, s in enumerate(window) if s[2] == "200"), None)
    if first_ok is None:
        return {"requests": 0, "max_ms": None, "p99_ms": None, "failures": 0, "first_answer_at": None}
    counted = window[first_ok:]
    lat = [s[1] if s[2] == "200" else FAIL_S for s in counted]
    worst = max(range(len(counted)), key=lambda i: lat[i])
    failures = [s for s in counted if s[2] != "200"]
    return {
        "requests": len(counted), "max_ms": round(lat[worst] * 1000, 1), "p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "p50_ms": round(pct(lat, 0.5) * 1000, 1), "over_1s": sum(1 for v in lat if v > HEALTH_TARGET_S),
        "failures": len(failures), "failure_kinds": sorted({s[2] for s in failures}),
        "first_answer_at": counted[0][0], "worst_at": counted[worst][0],
        "slow": sorted(([round(s[0], 2), round(v * 1000)] for s, v in zip(counted, lat, strict=True) if v > 0.25),
                       key=lambda x: -x[1])[:300],
    }


def merge_health(stats: list[dict[str, Any]]) -> dict[str, Any]:
    got = [s for s in stats if s.get("max_ms") is not None]
    if not got:
        return {"max_ms": None, "p99_ms": None}
    return {"max_ms": max(s["max_ms"] for s in got), "p99_ms": max(s["p99_ms"] for s in got),
            "over_1s": sum(s["over_1s"] for s in got), "failures": sum(s["failures"] for s in got)}


# --------------------------------------------------------------------------- workers


def parse_log_time(line: str) -> float | None:
    """The wall time of a worker log line: '[2026-11-30 06:56:43,123] ...' or '2026-11-30 06:56:43,123 ...'."""
    text = line.lstrip("[")[:23]
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


class Worker:
    """A `flywheel worker` child (tests/helpers.WorkerProcess) with its /health poller."""

    def __init__(self, name: str, settings: Settings, sql_dir: Path, *, asyncio_debug: bool = False):
        self.name = name
        self.settings = settings
        env = {"FLYWHEEL_SQL_DIR": str(sql_dir)}
        if asyncio_debug:  # asyncio logs every callback that holds the loop > 100 ms, naming its task
            env["PYTHONASYNCIODEBUG"] = "1"
        self.proc = WorkerProcess(settings, extra_env=env)
        self.poller = HealthPoller(settings.admin_port, settings.data_dir.parent / f"health-{name}.txt")
        self.spawned = 0.0
        self.cpu_before = 0.0

    def start(self) -> Worker:
        self.spawned = time.time()
        self.proc.start(wait_ready=False)
        self.cpu_before = 0.0
        return self

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def cpu(self) -> float:
        return pl.proc_cpu_seconds(self.pid)

    def alive(self) -> None:
        if self.proc.proc.poll() is not None:
            raise SystemExit(f"worker {self.name} exited with {self.proc.proc.returncode}:\n{self.proc.log_tail()}")

    def lines(self, since: float = 0.0) -> list[tuple[float, str]]:
        """This start's log lines with their times (lines without a time take the previous one's)."""
        text = self.proc.log_path.read_text(errors="replace").rsplit("===== start", 1)[-1]
        out, last = [], 0.0
        for line in text.splitlines():
            t = parse_log_time(line)
            last = t if t is not None else last
            if last >= since:
                out.append((last, line))
        return out

    def first(self, needle: str, since: float = 0.0) -> float | None:
        return next((t for t, line in self.lines(since) if needle in line), None)

    def all(self, needle: str, since: float = 0.0) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines(since) if needle in line]

    def repaired(self, since: float = 0.0) -> dict[int, dict[str, Any]]:
        """Partitions whose partials this worker restored since `since`: partition → how, cells, seconds.

        From the stage's one line per assignment: "partials of partitions [0, 1] restored in 0.52s: 2 from
        checkpoints, 0 counted from the person states; 1400 cells republished" — how is per assignment
        (checkpoint, count or mixed), cells the assignment's average per partition."""
        out = {}
        for t, line in self.all("partials of partitions ", since):
            try:
                rest = line.split("partials of partitions ", 1)[1]
                parts = [int(p) for p in rest.split("[", 1)[1].split("]", 1)[0].split(",")]
                secs = float(rest.split(" restored in ", 1)[1].split("s:", 1)[0])
                loaded = int(rest.split("s: ", 1)[1].split(" from checkpoints", 1)[0])
                counted = int(rest.split("checkpoints, ", 1)[1].split(" counted", 1)[0])
                cells = int(rest.split("; ", 1)[1].split(" cells", 1)[0])
            except (IndexError, ValueError):
                continue
            how = "checkpoint" if not counted else "count" if not loaded else "mixed"
            for p in parts:
                out[p] = {"how": how, "cells": cells // len(parts), "seconds": secs, "at": t}
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.proc.metric(name, **labels)

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.stop()
        return round(time.monotonic() - started, 2)


def settings_for(bootstrap: str, tag: str, data_dir: Path, partitions: int, clickhouse_url: str) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, partitions=partitions, app_id=f"bench-restart-{tag}",
                    data_dir=data_dir, http_port=free_port(), admin_port=free_port(),
                    topics=pl.topics_for(f"restart-{tag}"), clickhouse_url=clickhouse_url,
                    http_host="127.0.0.1")


class ClickHouseCounts:
    def __init__(self, url: str):
        self.url = url

    def rows(self, sql: str) -> list[tuple]:
        from flywheel.clickhouse.server import ServerClickHouse

        ch = ServerClickHouse(self.url)
        try:
            return ch.rows(sql)[1]
        finally:
            ch.close()

    def events(self, prefix: str | None = None) -> tuple[int, int]:
        """(rows, distinct message ids) in flywheel.events, of the events whose messageId has this prefix."""
        where = f" WHERE startsWith(message_id, '{prefix}-')" if prefix else ""
        return tuple(self.rows(f"SELECT count(), uniqExact(message_id) FROM flywheel.events{where}")[0])


# --------------------------------------------------------------------------- phases


def wait_phase(workers: list[Worker], watch: MetricsWatch, since: float, *, partitions: int, timeout: float,
               extra: Any = None, what: str) -> float:
    """Until every partition was restored (log) and published (metrics.*) by some worker since `since`,
    and `extra()` (if given) holds. Returns the wall time it became true."""
    deadline = time.monotonic() + timeout
    last_note = time.monotonic()
    while True:
        for w in workers:
            w.alive()
        repaired: dict[int, Any] = {}
        for w in workers:
            repaired.update(w.repaired(since))
        published = {p for _, p, _ in watch.since(since)}
        if len(repaired) == partitions and set(range(partitions)) <= published and (extra is None or extra()):
            return time.time()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.name} ---\n{w.proc.log_tail(30)}" for w in workers)
            raise SystemExit(f"{what}: not done after {timeout:.0f}s (restored {sorted(repaired)}, "
                             f"published {sorted(published)})\n{tails}")
        if time.monotonic() - last_note > 30:
            last_note = time.monotonic()
            log(f"  {what}: restored {sorted(repaired)}, published {sorted(published)}, load {loadavg()}")
        time.sleep(0.5)


def startup_facts(w: Worker, watch: MetricsWatch, since: float) -> dict[str, Any]:
    """Times from one worker's log and the metrics records, relative to its spawn and assignment."""
    assigned = w.all("assigned (generation ", since)
    recovery = w.first("Recovery complete", since)
    ready = w.first("Worker ready", since)
    repaired = w.repaired(since)
    first_assign = assigned[0][0] if assigned else None
    last_assign = assigned[-1][0] if assigned else None
    mine = set(repaired)
    recs = [r for r in watch.since(first_assign or since) if r[1] in mine]
    first_cell = min((r[0] / 1000 for r in recs), default=None)
    by_partition: dict[int, float] = {}
    for ms, p, _ in recs:
        by_partition[p] = min(by_partition.get(p, ms / 1000), ms / 1000)
    all_cells = max(by_partition.values()) if len(by_partition) == len(mine) and mine else None

    def rel(t: float | None, base: float | None) -> float | None:
        return round(t - base, 2) if t is not None and base is not None else None

    return {
        "assignments": len(assigned),
        "spawn_to_assignment_s": rel(first_assign, since),
        "spawn_to_recovery_complete_s": rel(recovery, since),
        "spawn_to_worker_ready_s": rel(ready, since),
        "assignment_to_recovery_complete_s": rel(recovery, first_assign),
        "assignment_to_first_cell_s": rel(first_cell, first_assign),
        "last_assignment_to_first_cell_s": rel(first_cell, last_assign),
        "assignment_to_all_partitions_published_s": rel(all_cells, first_assign),
        "recovery_complete_to_first_cell_s": rel(first_cell, recovery),
        "spawn_to_first_cell_s": rel(first_cell, since),
        "partitions": sorted(mine),
        "restored": {p: {k: v for k, v in r.items() if k != "at"} | {"after_assignment_s": rel(r["at"], first_assign)}
                     for p, r in sorted(repaired.items())},
        "first_cell_by_partition_after_assignment_s": {p: rel(t, first_assign)
                                                       for p, t in sorted(by_partition.items())},
        "cells_published": len(recs),
        "rss_mb": round(pl.rss_bytes(w.pid) / 2**20, 1),
        "tables": tables_of(w),
    }


def tables_of(w: Worker) -> dict[str, Any]:
    """The worker's state tables from /status: keys and RocksDB memory (MB)."""
    try:
        doc = orjson.loads(w.proc.get("/status"))
    except (OSError, ValueError):
        return {}
    return {name: {k: (v if k in ("keys", "partitions") else round(v / 2**20, 1)) for k, v in t.items()}
            for name, t in (doc.get("tables") or {}).items()}


def sample_usage(pids: dict[str, int]) -> dict[str, float]:
    return {name: pl.proc_cpu_seconds(pid) for name, pid in pids.items()}


def usage_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 1) for name in after}


def machine_busy(m0: tuple[int, int]) -> float:
    busy1, total1 = pl.machine_ticks()
    return round((busy1 - m0[0]) / max(1, total1 - m0[1]), 3)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-restart-"))
    tag = uuid.uuid4().hex[:6]
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(), "loadavg_start": loadavg(),
        "config": {"persons": args.persons, "partitions": args.partitions, "outage_seconds": args.outage_seconds,
                   "asyncio_debug": args.asyncio_debug,
                   "rate": args.rate, "pre_events": args.pre_events, "health_interval_s": args.health_interval},
        "phases": [],
    }
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    server: ClickHouseServer | None = None
    workers: list[Worker] = []
    watch: MetricsWatch | None = None
    traffic: Traffic | None = None
    traffic_sent = 0
    try:
        log(f"starting Kafka at {broker.bootstrap} and clickhouse-server in {tmp}")
        broker_pid = devkafka.start(broker)
        server = ClickHouseServer(tmp / "clickhouse-server")
        server.start()
        doc["config"]["kafka"] = devkafka.kafka_version()
        doc["config"]["clickhouse"] = "Debian clickhouse-server 18.16, schema tests/integration/sql_18_16"
        migrations = SQL_18_16.parent
        s1 = settings_for(broker.bootstrap, tag, tmp / "w1" / "data", args.partitions, server.url)
        ensure_topics(s1)
        doc["config"]["app_id"] = s1.app_id

        # ---- 1. fill
        log(f"fill: {args.persons:,} person states into {changelog_topic(s1, PERSONS)}")
        fill = fill_persons(s1, args.persons, args.seed)
        log(f"fill: {fill['persons']:,} persons in {fill['seconds']} s ({fill['persons_per_s']:,}/s, "
            f"{fill['mb']} MB, {fill['avg_value_bytes']} B per record)")
        fill["pre_events"] = send_events(s1, args.pre_events, args.persons, args.seed + 1)
        doc["fill"] = fill
        ch = ClickHouseCounts(server.url)
        watch = MetricsWatch(s1)
        watch.start()
        pids = {"broker": broker_pid, "clickhouse": server.proc.pid}

        def phase_record(name: str, t0: float, t1: float, cpu0: dict, m0: tuple, load0: list,
                         live: list[Worker], **extra: Any) -> dict[str, Any]:
            usage = usage_delta(cpu0, sample_usage(pids | {w.name: w.pid for w in live}))
            health = {w.name: health_stats(w.poller.samples(), t0, t1) for w in live}
            for w in live:
                h = health[w.name]
                h["slowest_in_context"] = slow_context(w, h, t0)
            stalls = {w.name: loop_stalls(w, t0, t1) for w in live}
            rec = {"phase": name, "persons": args.persons, "wall_s": round(t1 - t0, 1), "cpu_s": usage,
                   "loop_stalls": stalls,
                   "workers_cpu_s": round(sum(usage.get(w.name, 0.0) for w in live), 1),
                   "machine_busy": machine_busy(m0), "loadavg_start": load0, "loadavg_end": loadavg(),
                   "health": health, "health_all": merge_health(list(health.values())), **extra}
            doc["phases"].append(rec)
            return rec

        # ---- 2. first start on a table without checkpoint
        log("phase first-start: one worker, empty data dir, no checkpoint in the table")
        w1 = Worker("w1", s1, migrations, asyncio_debug=args.asyncio_debug)
        workers.append(w1)
        load0, m0, cpu0 = loadavg(), pl.machine_ticks(), sample_usage(pids)
        w1.start()
        t1 = wait_phase([w1], watch, w1.spawned, partitions=args.partitions, timeout=args.phase_timeout,
                        what="first start")
        # The events sent before the start: every one should be ingested and sunk.
        pre_deadline = time.monotonic() + max(args.settle, 60)
        while ch.events(PRE)[1] < args.pre_events and time.monotonic() < pre_deadline:
            time.sleep(1)
        time.sleep(args.settle)
        t_end = time.time()
        pre_rows = ch.events(PRE)[1]
        pre_received = w1.metric("flywheel_events_received_total", source="bench-restart")
        if pre_rows < args.pre_events:
            log(f"  only {pre_rows} of the {args.pre_events} events sent before the start are in flywheel.events "
                f"(the worker received {pre_received:.0f})")
        rec = phase_record("first start (no checkpoint)", w1.spawned, t_end, cpu0, m0, load0, [w1],
                           done_after_s=round(t1 - w1.spawned, 1), startup=startup_facts(w1, watch, w1.spawned),
                           pre_events_sent=args.pre_events, pre_events_in_clickhouse=pre_rows,
                           pre_events_received=pre_received)
        log(f"  {summary_line(rec)}")

        # ---- 4. restart with a checkpoint
        log("phase restart: SIGTERM, start again on the same data dir (checkpoints)")
        load0, m0 = loadavg(), pl.machine_ticks()
        stop_s = w1.stop()
        cpu0 = sample_usage(pids)
        w1.start()
        t1 = wait_phase([w1], watch, w1.spawned, partitions=args.partitions, timeout=args.phase_timeout,
                        what="restart")
        time.sleep(args.settle)
        rec = phase_record("restart (checkpoint)", w1.spawned, time.time(), cpu0, m0, load0, [w1],
                           sigterm_to_exit_s=stop_s, done_after_s=round(t1 - w1.spawned, 1),
                           startup=startup_facts(w1, watch, w1.spawned))
        log(f"  {summary_line(rec)}")

        # ---- 5. a fresh worker (no local state) on the table that now holds checkpoints
        log("phase fresh-start: SIGTERM, empty the data dir, start again (checkpoints from the changelog)")
        load0, m0 = loadavg(), pl.machine_ticks()
        w1.stop()
        for entry in s1.data_dir.iterdir():  # everything but the log
            if entry != w1.proc.log_path:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        cpu0 = sample_usage(pids)
        w1.start()
        t1 = wait_phase([w1], watch, w1.spawned, partitions=args.partitions, timeout=args.phase_timeout,
                        what="fresh start")
        time.sleep(args.settle)
        rec = phase_record("fresh start (checkpoint)", w1.spawned, time.time(), cpu0, m0, load0, [w1],
                           done_after_s=round(t1 - w1.spawned, 1), startup=startup_facts(w1, watch, w1.spawned))
        log(f"  {summary_line(rec)}")

        # ---- 6. rebalance: a second worker joins while events flow
        log(f"phase rebalance: traffic at {args.rate} ev/s, a second worker joins")
        traffic = Traffic(s1, args.persons, args.rate, args.seed + 2)
        traffic.start()
        time.sleep(args.settle)
        s2 = s1.model_copy(update={"data_dir": tmp / "w2" / "data", "http_port": free_port(),
                                   "admin_port": free_port()})
        w2 = Worker("w2", s2, migrations, asyncio_debug=args.asyncio_debug)
        workers.append(w2)
        load0, m0, cpu0 = loadavg(), pl.machine_ticks(), sample_usage(pids | {"w1": w1.pid})
        t0 = time.time()
        w2.start()
        cpu0["w2"] = 0.0

        def both_hold_partitions() -> bool:
            return bool(w2.repaired(t0)) and bool(w1.repaired(t0))

        t1 = wait_phase([w1, w2], watch, t0, partitions=args.partitions, timeout=args.phase_timeout,
                        extra=both_hold_partitions, what="rebalance")
        # Faust's standby replicas (one per partition) go on recovering in the background after "Worker
        # ready" (Faust does not log when they are done): they overlap the next phase.
        time.sleep(args.settle)
        rec = phase_record("rebalance (2nd worker joins)", t0, time.time(), cpu0, m0, load0, [w1, w2],
                           done_after_s=round(t1 - t0, 1),
                           startup=startup_facts(w2, watch, t0), w1_after_rebalance=startup_facts(w1, watch, t0))
        log(f"  {summary_line(rec)}")

        # ---- 7. ClickHouse outage
        log(f"phase outage: ClickHouse stopped for {args.outage_seconds} s, traffic at {args.rate} ev/s")
        load0, m0, cpu0 = loadavg(), pl.machine_ticks(), sample_usage(pids | {w.name: w.pid for w in workers})
        t0 = time.time()
        sent_before = traffic.sent
        server.stop()
        t_down = time.time()
        blocked: dict[str, float] = {}
        blocked_at: float | None = None
        while time.time() < t_down + args.outage_seconds:
            for w in workers:
                w.alive()
                try:
                    v = w.metric("flywheel_sink_blocked", table="flywheel.events")
                except OSError:
                    v = -1
                blocked[w.name] = max(blocked.get(w.name, 0.0), v)
                if v == 1 and blocked_at is None:
                    blocked_at = time.time()
            time.sleep(2)
        sent_during = traffic.sent - sent_before
        pids["clickhouse"] = 0
        server.start()
        t_up = time.time()
        pids["clickhouse"] = server.proc.pid
        cpu0["clickhouse"] = 0.0
        log("  ClickHouse is up again; stopping traffic, waiting for every event in flywheel.events")
        time.sleep(args.settle)
        traffic_sent = traffic.stop()
        traffic = None
        caught_up = None
        deadline = time.monotonic() + args.phase_timeout
        rows = (0, 0)
        while time.monotonic() < deadline:
            for w in workers:
                w.alive()
            rows = ch.events(TRAFFIC)
            if rows[1] >= traffic_sent:
                caught_up = time.time()
                break
            time.sleep(1)
        unblocked = {w.name: w.metric("flywheel_sink_blocked", table="flywheel.events") for w in workers}
        invalid = ch.rows("SELECT count() FROM flywheel.invalid_events")[0][0]
        back = {w.name: [line.split(": ", 1)[-1] for _, line in w.all("ClickHouse is back", t0)][:6] for w in workers}
        rec = phase_record(f"ClickHouse outage ({args.outage_seconds:.0f} s)", t0, time.time(), cpu0, m0, load0,
                           workers, outage_s=round(t_up - t_down, 1),
                           traffic_events_during_outage=sent_during,
                           sink_blocked_max=blocked,
                           sink_blocked_after_s=round(blocked_at - t_down, 1) if blocked_at else None,
                           sink_blocked_at_end=unblocked, clickhouse_back_logs=back,
                           traffic_events_sent=traffic_sent, events_rows=rows[0], events_distinct=rows[1],
                           invalid_rows=invalid, all_events_arrived=rows[1] == traffic_sent,
                           caught_up_after_clickhouse_start_s=round(caught_up - t_up, 1) if caught_up else None,
                           stopped_at=t_down, started_at=t_up,
                           health_during_outage={w.name: health_stats(w.poller.samples(), t_down, t_up)
                                                 for w in workers},
                           health_after_clickhouse_back={w.name: health_stats(w.poller.samples(), t_up, time.time())
                                                         for w in workers})
        log(f"  {summary_line(rec)}")
        if not rec["all_events_arrived"]:
            log(f"  NOT every event arrived: {rows[1]} distinct of {traffic_sent} sent")
    finally:
        if traffic is not None:
            try:
                traffic.stop()
            except RuntimeError as exc:
                log(str(exc))
        for w in workers:
            try:
                w.stop()
            finally:
                w.poller.stop()
        if watch is not None:
            watch.stop()
        if server is not None:
            server.stop()
        log("stopping Kafka")
        devkafka.stop(broker)
        logs = RESULTS / f"restart-{started:%Y%m%d-%H%M%S}-logs"
        if args.keep:
            log(f"kept {tmp}")
        else:
            logs.mkdir(parents=True, exist_ok=True)
            for w in workers:
                shutil.copy(w.proc.log_path, logs / f"{w.name}.log")
                shutil.copy(w.poller.path, logs / f"health-{w.name}.txt")
            shutil.rmtree(tmp, ignore_errors=True)
    doc["seconds_total"] = round(time.monotonic() - t_start, 1)
    doc["loadavg_end"] = loadavg()
    return doc


def slow_context(w: Worker, health: dict[str, Any], since: float, n: int = 8) -> list[list[Any]]:
    """The slowest /health answers, each with the worker's last log line before the request."""
    slow = sorted(health.get("slow", []), key=lambda s: -s[1])[:n]
    lines = w.lines(since - 5)
    out = []
    for at, ms in slow:
        before = [line for t, line in lines if t <= at]
        last = before[-1] if before else ""
        out.append([round(at - since, 2), ms, last.split("] ", 3)[-1][:160].strip()])
    return out


def loop_stalls(w: Worker, start: float, end: float) -> dict[str, Any]:
    """asyncio debug's 'Executing <...> took N seconds' lines in [start, end], by coroutine (--asyncio-debug)."""
    import re

    pattern = re.compile(r"Executing <(.*)> took ([0-9.]+) seconds")
    by_coro: dict[str, list[float]] = {}
    for t, line in w.lines(start):
        if t > end:
            break
        m = pattern.search(line)
        if not m:
            continue
        what = m.group(1)
        coro = re.search(r"coro=<([^ >]+)", what)
        cb = re.search(r"(?:Handle|TimerHandle) ([^ (]+)", what)
        key = coro.group(1) if coro else (cb.group(1) if cb else what[:80])
        by_coro.setdefault(key, []).append(float(m.group(2)))
    return {k: {"count": len(v), "max_s": round(max(v), 3), "total_s": round(sum(v), 2)}
            for k, v in sorted(by_coro.items(), key=lambda kv: -max(kv[1]))}


def verdict(rec: dict[str, Any]) -> str:
    ok = []
    h = rec["health_all"].get("max_ms")
    ok.append(h is not None and h <= HEALTH_TARGET_S * 1000)
    first = rec.get("startup", {}).get("assignment_to_first_cell_s")
    if "startup" in rec:
        ok.append(first is not None and first <= FIRST_CELL_TARGET_S)
    if "all_events_arrived" in rec:
        ok.append(bool(rec["all_events_arrived"]))
    return "yes" if all(ok) else "NO"


def summary_line(rec: dict[str, Any]) -> str:
    s = rec.get("startup", {})
    return (f"{rec['phase']}: {rec['wall_s']} s wall, workers {rec['workers_cpu_s']} CPU s, first cell "
            f"{s.get('assignment_to_first_cell_s')} s after assignment, /health max "
            f"{rec['health_all'].get('max_ms')} ms p99 {rec['health_all'].get('p99_ms')} ms -> {verdict(rec)}")


def render(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    fill = doc.get("fill", {})
    lines = [
        f"Flywheel restart bench {doc['started']}: {cfg['persons']:,} persons, {cfg['partitions']} partitions, "
        f"{doc['cpus']} CPUs, load average {doc['loadavg_start']} at start, {doc.get('loadavg_end')} at end; "
        f"{doc.get('seconds_total')} s in all",
        f"fill: {fill.get('persons', 0):,} person states into the persons changelog in {fill.get('seconds')} s "
        f"({fill.get('persons_per_s', 0):,}/s, {fill.get('mb')} MB) + {cfg['pre_events']} events via events.raw",
        f"targets: /health <= {HEALTH_TARGET_S * 1000:.0f} ms throughout (failure/timeout = {FAIL_S:.0f} s); "
        f"first cell <= {FIRST_CELL_TARGET_S:.0f} s after assignment",
        "",
        f"{'phase':<30} {'persons':>9} {'wall s':>7} {'CPU s':>6} {'1st cell':>8} {'all cells':>9} "
        f"{'recovered':>9} {'/health max':>11} {'p99':>7}  target met?",
        f"{'':<30} {'':>9} {'':>7} {'wrk':>6} {'s after':>8} {'s after':>9} {'s after':>9} {'ms':>11} {'ms':>7}",
        f"{'':<30} {'':>9} {'':>7} {'':>6} {'assign':>8} {'assign':>9} {'spawn':>9}",
    ]
    for rec in doc["phases"]:
        s = rec.get("startup", {})
        h = rec["health_all"]

        def f(v: Any) -> str:
            return "-" if v is None else str(v)

        lines.append(
            f"{rec['phase']:<30} {rec['persons']:>9,} {rec['wall_s']:>7} {rec['workers_cpu_s']:>6} "
            f"{f(s.get('assignment_to_first_cell_s')):>8} {f(s.get('assignment_to_all_partitions_published_s')):>9} "
            f"{f(s.get('spawn_to_recovery_complete_s')):>9} {f(h.get('max_ms')):>11} {f(h.get('p99_ms')):>7}  "
            f"{verdict(rec)}")
    lines.append("")
    for rec in doc["phases"]:
        s = rec.get("startup")
        per = ", ".join(f"{k} {v['max_ms']}/{v['p99_ms']} ms ({v.get('over_1s', 0)} > 1 s, "
                        f"{v.get('failures', 0)} failed)"
                        for k, v in rec["health"].items() if v.get("max_ms") is not None)
        lines.append(f"{rec['phase']}: CPU s {rec['cpu_s']}, machine busy {rec['machine_busy']:.0%}, load "
                     f"{rec['loadavg_start']} -> {rec['loadavg_end']}; /health max/p99 {per}")
        if s:
            how = sorted({v["how"] for v in s["restored"].values()})
            slowest = max((v["seconds"] for v in s["restored"].values()), default=None)
            lines.append(f"    partitions {s['partitions']} restored by {how} (slowest {slowest} s); assignments "
                         f"{s['assignments']}; spawn -> assignment {s['spawn_to_assignment_s']} s, -> recovery "
                         f"complete {s['spawn_to_recovery_complete_s']} s, -> first cell "
                         f"{s['spawn_to_first_cell_s']} s; recovery complete -> first cell "
                         f"{s['recovery_complete_to_first_cell_s']} s")
            tables = "; ".join(f"{n} {t.get('keys', 0):,} keys, RocksDB memtables {t.get('memtables')} MB, "
                               f"block cache {t.get('block_cache')} MB" for n, t in s.get("tables", {}).items())
            lines.append(f"    worker RSS {s.get('rss_mb')} MB; {tables}")
        for name, stalls in rec.get("loop_stalls", {}).items():
            for coro, st in list(stalls.items())[:6]:
                lines.append(f"    {name} loop held > 100 ms by {coro}: {st['count']}x, max {st['max_s']} s, "
                             f"total {st['total_s']} s")
        for name, h in rec["health"].items():
            for at, ms, last in h.get("slowest_in_context", [])[:4]:
                lines.append(f"    {name} /health {ms} ms at +{at} s, after: {last}")
        if "pre_events_sent" in rec:
            lines.append(f"    events sent before the start: {rec['pre_events_in_clickhouse']} of "
                         f"{rec['pre_events_sent']} in flywheel.events (the worker received "
                         f"{rec['pre_events_received']:.0f})")
        if "w1_after_rebalance" in rec:
            s1 = rec["w1_after_rebalance"]
            lines.append(f"    w1 after the rebalance: partitions {s1['partitions']}, assignment -> first cell "
                         f"{s1['assignment_to_first_cell_s']} s, all {s1['assignment_to_all_partitions_published_s']}"
                         f" s")
        if "all_events_arrived" in rec:
            lines.append(f"    sink blocked (max of flywheel_sink_blocked) {rec['sink_blocked_max']}, first seen "
                         f"{rec['sink_blocked_after_s']} s after the stop, at the end {rec['sink_blocked_at_end']}; "
                         f"{rec['events_distinct']:,} of the {rec['traffic_events_sent']:,} events of the traffic "
                         f"(rebalance and outage phases) are in "
                         f"flywheel.events ({rec['events_rows']:,} rows, {rec['invalid_rows']} invalid), caught up "
                         f"{rec['caught_up_after_clickhouse_start_s']} s after ClickHouse started")
            dur = merge_health(list(rec["health_during_outage"].values()))
            aft = merge_health(list(rec["health_after_clickhouse_back"].values()))
            lines.append(f"    /health while ClickHouse was down: max {dur['max_ms']} ms, p99 {dur['p99_ms']} ms; "
                         f"after it was back (catching up): max {aft['max_ms']} ms, p99 {aft['p99_ms']} ms")
    return "\n".join(lines)


def main() -> None:
    import logging

    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)  # the server's start-up probe, its stop
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=1_000_000, help="person states in the table")
    parser.add_argument("--outage-seconds", type=float, default=300, help="how long ClickHouse is down")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--pre-events", type=int, default=5000, help="events sent before the first start")
    parser.add_argument("--rate", type=float, default=300, help="events/s during the rebalance and the outage")
    parser.add_argument("--health-interval", type=float, default=0.1, help="seconds between /health requests")
    parser.add_argument("--settle", type=float, default=10, help="seconds measured after a phase is done")
    parser.add_argument("--phase-timeout", type=float, default=1800, help="seconds a phase may take at most")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    parser.add_argument("--asyncio-debug", action="store_true",
                        help="diagnosis, not measurement: run the workers with PYTHONASYNCIODEBUG=1 (asyncio logs each "
                             "callback holding the event loop > 100 ms) and summarise those per phase")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = run(args)
    stamp = datetime.fromisoformat(doc["started"]).strftime("%Y%m%d-%H%M%S")
    text = render(doc)
    (RESULTS / f"restart-{stamp}.json").write_text(json.dumps(doc, indent=1, default=str))
    (RESULTS / f"restart-{stamp}.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nresults: {RESULTS}/restart-{stamp}.json and .txt")


if __name__ == "__main__":
    main()
