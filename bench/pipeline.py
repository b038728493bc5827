"""Pipeline throughput benchmark (issues 2, 19): events.raw → rows in ClickHouse vs. a bare Kafka consumer and
a minimal Python pipeline, with one worker and with two.

    make bench                                    # = .venv/bin/python bench/pipeline.py
    .venv/bin/python bench/pipeline.py --events 200000 --runs 2 --budget 1200
    git worktree add /tmp/base 7ae8eae && make bench BENCH_ARGS="--baseline /tmp/base --runs 4"
                                                  # before and after, alternating, in one run

One invocation, one machine, one topic:

1. starts a local Kafka (flywheel.devkafka) on free ports in a temporary directory (removed at the end);
2. pre-loads N realistic, valid events (flywheel.sample.journeys) into a fresh events.raw through
   flywheel.producer.Producer and checks the topic holds exactly N records;
3. per run:
   - ceiling: a bare AIOKafkaConsumer (fresh group id, earliest, read_committed like the worker,
     getmany loop, no decoding) reads the same N records; rate = N / (first record → N-th record);
   - peer (unless --no-peer): bench/peer.py, a minimal Python pipeline (aiokafka → orjson → pydantic
     envelope → dedup in RocksDB → batch insert into its own chdb), in its own process, timing itself;
   - pipeline: one `flywheel worker` subprocess (embedded ClickHouse, its own data dir, group id and
     downstream topics) consumes the same events.raw; rate = N / ("Worker ready" in its log → count()
     in flywheel.events reaches N), count() polled through flywheel.query.run (the worker's /sql)
     every --poll s. At the end: N distinct message ids, no invalid rows;
   - for each --workers count above 1: that many workers of one app id and a `flywheel store` owning
     their embedded ClickHouse start on an empty events.raw of their own and settle (else the first one
     ready would take a head start and the start-up rebalance would be measured); then the pre-loaded
     records are copied into it in bulk (~1 s, inside the window, which opens at the copy); CPU per event
     counts every worker and the store;
4. a profiled pipeline run (FLYWHEEL_PROFILE: pyinstrument, worker main thread, 1 ms samples) on a
   separate events.raw holding --profile-events events of the same generator (pyinstrument's
   per-call hook slows the worker several-fold, so it does not run on the measured topic); its
   samples are cut to the consumption window and summarised by pipeline stage, package and function;
5. writes bench/results/pipeline-<time>.json, .txt and .pyisession, and prints the text.

--budget bounds the whole invocation: a pipeline run still short of N rows when the budget runs out
is stopped and reported as incomplete (its rate = rows so far / seconds), and the profiled run is
skipped when too little time is left. The machine may be shared: each run records the worker's and
the broker's CPU use and how busy the whole machine was, so a noisy number can be recognised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flywheel import devkafka, query
from flywheel.config import Settings, Topics

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET_RATIO = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", flush=True)


def save_results(name: str, doc: dict[str, Any], text: str) -> None:
    """bench/results/<name>-<time>.json and .txt; the text printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{name}-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"{name}-{stamp}.txt").write_text(text)
    print(text)
    log(f"results: {RESULTS}/{name}-{stamp}.json and .txt")


# --------------------------------------------------------------------------- machine measurements


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Batches:
    """Records to one topic through aiokafka's batch API: a record batch per partition, sent when full;
    `flush` sends the rest and awaits every send."""

    def __init__(self, producer, topic: str, partitions: int):
        self.producer, self.topic = producer, topic
        self.batches = {p: producer.create_batch() for p in range(partitions)}
        self.pending: list = []

    async def add(self, partition: int, key: bytes, value: bytes, headers=None) -> None:
        if self.batches[partition].append(key=key, value=value, timestamp=None, headers=headers) is None:  # full
            self.pending.append(await self.producer.send_batch(self.batches[partition], self.topic,
                                                               partition=partition))
            self.batches[partition] = self.producer.create_batch()
            self.batches[partition].append(key=key, value=value, timestamp=None, headers=headers)

    async def flush(self) -> None:
        for p, batch in self.batches.items():
            if batch.record_count():
                self.pending.append(await self.producer.send_batch(batch, self.topic, partition=p))
            self.batches[p] = self.producer.create_batch()
        await asyncio.gather(*self.pending)
        self.pending = []


async def _copy(bootstrap: str, source: str, target: str, n: int) -> None:
    """The n records of `source` into `target`, partition for partition, keys, values and headers as they are."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=f"bench-copy-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    try:
        out = Batches(producer, target, len(consumer.partitions_for_topic(source) or ()))
        copied = 0
        while copied < n:
            for tp, records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).items():
                for r in records:
                    await out.add(tp.partition, r.key, r.value, list(r.headers))
                copied += len(records)
        await out.flush()
    finally:
        await consumer.stop()
        await producer.stop()


def settled(procs: dict[str, tuple[subprocess.Popen, Path]]) -> str | None:
    """The workers' last assignments, if they are all of one generation (else None)."""
    last = {}
    for name, (_, log_path) in procs.items():
        if name.startswith("worker"):
            text = log_path.read_text(errors="replace")
            lines = [line for line in text.splitlines() if "assigned (generation" in line]
            if not lines:
                return None
            last[name] = lines[-1].split("assigned (generation", 1)[1]
    generations = {text.split(")", 1)[0] for text in last.values()}
    return "\n".join(sorted(last.values())) if len(generations) == 1 else None


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


class Usage:
    """CPU used by some processes and by the whole machine between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def start(self) -> Usage:
        self.t0 = time.monotonic()
        self.cpu0 = {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}
        self.m0 = machine_ticks()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy1, total1 = machine_ticks()
        out: dict[str, float] = {}
        for name, pid in self.pids.items():
            used = proc_cpu_seconds(pid) - self.cpu0[name]
            out[f"{name}_cpu_seconds"] = round(used, 2)
            out[f"{name}_cores"] = round(used / wall, 3)
        out["machine_busy"] = round((busy1 - self.m0[0]) / max(1, total1 - self.m0[1]), 3)
        return out


# --------------------------------------------------------------------------- setup


def topics_for(tag: str, raw: str | None = None) -> Topics:
    """Every topic the run's own (a later run's sinks must not read an earlier run's metrics), but events.raw
    when given."""
    return Topics.prefixed(f"bench-{tag}.", **({"raw": raw} if raw else {}))


METRICS: Path | None = None  # --metrics: the definitions every run's worker stores and uses (default: the file's)


def run_settings(bootstrap: str, partitions: int, raw_topic: str | None, tag: str, data_dir: Path) -> Settings:
    """One pipeline run: the given events.raw, everything else its own (group, topics, data, port)."""
    return Settings(
        kafka_bootstrap=bootstrap, partitions=partitions, app_id=f"bench-{tag}", data_dir=data_dir,
        http_port=free_port(), admin_port=free_port(), topics=topics_for(tag, raw_topic),
        **({"metrics": METRICS} if METRICS is not None else {}),
    )


def preload(bootstrap: str, topic: str, partitions: int, n: int, seed: int) -> dict[str, float]:
    """Send n valid sample events to a new topic through the project's Producer."""
    from flywheel.producer import Producer
    from flywheel.sample import journeys
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    started = time.monotonic()
    with Producer(bootstrap, topic=topic, source="bench",
                  linger_ms=50, batch_size=512 * 1024, max_in_flight_requests_per_connection=5) as producer:
        for message in journeys(n, seed=seed, days=7):
            producer.send(message)
    seconds = time.monotonic() - started
    held = topic_size(bootstrap, topic)
    if held != n:
        raise SystemExit(f"{topic} holds {held} records, expected {n}")
    return {"seconds": round(seconds, 2), "events_per_s": round(n / seconds)}


def topic_size(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        starts = consumer.beginning_offsets(parts)
        return sum(ends[p] - starts[p] for p in parts)
    finally:
        consumer.close()


# --------------------------------------------------------------------------- the ceiling


async def _bare_consume(bootstrap: str, topic: str, n: int, timeout: float) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bench-ceiling-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False, isolation_level="read_committed",
    )
    started = time.monotonic()
    await consumer.start()
    try:
        seen = nbytes = 0
        first = None
        while seen < n:
            if time.monotonic() > started + timeout:
                raise SystemExit(f"bare consumer read only {seen} of {n} records in {timeout:.0f}s")
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                if records and first is None:
                    first = time.monotonic()
                seen += len(records)
                nbytes += sum(len(r.value) for r in records)
        done = time.monotonic()
    finally:
        await consumer.stop()
    return {
        "events_per_s": round(n / (done - first)),
        "seconds": round(done - first, 3),
        "seconds_with_group_join": round(done - started, 3),
        "mb_per_s": round(nbytes / (done - first) / 1e6, 2),
    }


def ceiling(settings: Settings, n: int, timeout: float) -> dict[str, Any]:
    usage = Usage({"consumer": os.getpid()}).start()
    result = asyncio.run(_bare_consume(settings.kafka_bootstrap, settings.topics.raw, n, timeout))
    result.update(usage.stop())
    result["cpu_us_per_event"] = round(result.pop("consumer_cpu_seconds") / n * 1e6, 1)
    return result


# --------------------------------------------------------------------------- the pipeline


def worker_env(settings: Settings, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return env | settings.as_env() | extra


def scalar(settings: Settings, sql: str) -> Any:
    return query.run(settings, sql, timeout=60)[1][0][0]


def distinct(settings: Settings) -> int:
    return scalar(settings, "SELECT uniqExact(message_id) FROM flywheel.events")


def metric_values(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("flywheel_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metric_sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def spawn(command: str, settings: Settings, extra: dict[str, str], tree: Path | None) -> tuple[subprocess.Popen, Path]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / f"{command}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", command], env=worker_env(settings, extra),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tree or REPO,
        )
    return proc, log_path


def wait_ready(procs: dict[str, tuple[subprocess.Popen, Path]], name: str, marker: str, deadline: float) -> None:
    """Until `marker` is in the process's log; SystemExit with its log's tail if it exits or `deadline` passes."""
    proc, log_path = procs[name]
    while marker not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            why = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready within the budget"
            raise SystemExit(f"{name} {why}\n--- {name} log ({log_path}) ---\n{tail}")
        time.sleep(0.05)


def start(settings: Settings, workers: int, procs: dict[str, tuple[subprocess.Popen, Path]], deadline: float, *,
          extra: dict[str, str] | None = None, tree: Path | None = None) -> list[Settings]:
    """`workers` workers of `settings`' app id, each its own data dir and ports — more than one with a `flywheel
    store` owning the embedded ClickHouse they insert into — added to `procs` (name → process, log) and waited
    for (`wait_ready`). Returns their settings; the first's are where
    queries go (through the store, if any)."""
    if workers > 1:
        store = settings.model_copy(update={"data_dir": settings.data_dir / "store", "admin_port": free_port()})
        procs["store"] = spawn("store", store, {}, tree)
        wait_ready(procs, "store", "store ready", deadline)
        settings = settings.model_copy(update={"clickhouse_url": f"flywheel://{store.data_dir.resolve()}"})
    each = [settings] + [settings.model_copy(update={
        "data_dir": settings.data_dir / f"w{i}", "http_port": free_port(), "admin_port": free_port()})
        for i in range(2, workers + 1)]
    for i, s in enumerate(each, 1):
        procs[f"worker{i}" if i > 1 else "worker"] = spawn("worker", s, extra or {}, tree)
    for name in list(procs):
        if name.startswith("worker"):
            wait_ready(procs, name, "Worker ready", deadline)
    return each


def pipeline(settings: Settings, n: int, *, deadline: float, poll: float, broker_pid: int,
             profile: Path | None = None, tree: Path | None = None, workers: int = 1,
             preloaded: str | None = None) -> dict[str, Any]:
    """Run one worker until flywheel.events holds n rows (or `deadline`, monotonic, passes). `tree`: run the
    worker of another checkout (--baseline) instead of this one's. `workers` > 1: that many workers of one
    app id (own data dirs and ports) and a `flywheel store` owning the embedded ClickHouse they insert into
    (FLYWHEEL_CLICKHOUSE_URL=flywheel:///<its dir>); the CPU per event counts every one of these processes.
    `preloaded`: the workers start on their own empty events.raw and settle (one generation's assignment,
    unchanged for 3 s); the window opens when this topic's n records are copied into theirs (in bulk,
    ~1 s: inside the window), so that no worker has a head start and no start-up rebalance is counted."""
    extra = {"FLYWHEEL_PROFILE": str(profile)} if profile else {}
    metrics_ports = [settings.admin_port]
    if tree is not None:
        extra |= {"PYTHONPATH": str(tree / "streams"), "FLYWHEEL_HOME": str(tree)}
        if "admin_port" not in (tree / "streams" / "flywheel" / "config.py").read_text():
            metrics_ports = [settings.http_port]  # a release before the admin listener: /metrics beside /v1/*
    spawned = time.monotonic()
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def fail(why: str) -> SystemExit:
        tails = []
        for name, (_, log_path) in procs.items():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            tails.append(f"--- {name} log ({log_path}) ---\n{tail}")
        return SystemExit("\n".join([why, *tails]))

    try:
        each = start(settings, workers, procs, deadline, extra=extra, tree=tree)
        settings = each[0]
        if workers > 1:
            metrics_ports = [s.admin_port for s in each]
        if preloaded is not None:
            seen, since = None, time.monotonic()
            while time.monotonic() - since < 3.0:
                now = settled(procs)
                if now is None or now != seen:
                    seen, since = now, time.monotonic()
                if time.monotonic() > deadline:
                    raise fail("the workers did not settle on one assignment before the budget ran out")
                time.sleep(0.2)
        ready, ready_wall = time.monotonic(), time.time()
        usage = Usage({name: proc.pid for name, (proc, _) in procs.items()} | {"broker": broker_pid}).start()
        if preloaded is not None:
            asyncio.run(_copy(settings.kafka_bootstrap, preloaded, settings.topics.raw, n))
        series: list[tuple[float, int, int]] = []  # (s since ready, raw records ingested, rows)
        first_row = ingested_at = None
        count = 0
        while count < n and time.monotonic() < deadline:
            for name, (proc, _) in procs.items():
                if proc.poll() is not None:
                    raise fail(f"{name} exited with {proc.returncode} during the run")
            try:
                count = scalar(settings, "SELECT count() FROM flywheel.events")
                if count >= n:  # a rebalance redelivers some records: their rows twice until merged
                    count = distinct(settings)
                received = int(sum(metric_sum(metric_values(p), "flywheel_events_received_total")
                                   for p in metrics_ports))
            except (query.QueryError, OSError):  # /sql not advertised yet
                count = received = 0
            now = time.monotonic()
            series.append((round(now - ready, 2), received, count))
            if count and first_row is None:
                first_row = (now, count)
            if received >= n and ingested_at is None:
                ingested_at = now
            if count < n:
                time.sleep(poll)
        done, done_wall = time.monotonic(), time.time()
        cpu = usage.stop()
        rss = {f"{name}_rss_mb": round(rss_bytes(proc.pid) / 2**20) for name, (proc, _) in procs.items()}
        rows, count = scalar(settings, "SELECT count() FROM flywheel.events"), distinct(settings)
        invalid = scalar(settings, "SELECT count() FROM flywheel.invalid_events")
        metrics = [metric_values(p) for p in metrics_ports]
    finally:
        for proc, _ in reversed(list(procs.values())):  # workers first, the store last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # a profiled worker writes its profile now
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    complete = count >= n
    if count > n or invalid or (workers == 1 and rows != count):  # one worker: no rebalance, no row twice
        raise fail(f"expected {n} distinct valid rows; got {count} distinct of {rows} rows, {invalid} invalid")
    inserts = sum(m.get('flywheel_sink_insert_seconds_count{table="flywheel.events"}', 0.0) for m in metrics)
    insert_s = sum(m.get('flywheel_sink_insert_seconds_sum{table="flywheel.events"}', 0.0) for m in metrics)
    seconds = done - ready
    steady = None
    if first_row is not None and done > first_row[0]:
        steady = round((count - first_row[1]) / (done - first_row[0]))
    flywheel_cpu = sum(v for k, v in cpu.items() if k.endswith("_cpu_seconds") and not k.startswith("broker"))
    return {
        "complete": complete,
        "workers": workers,
        "rows": count,
        "rows_stored_twice": rows - count,  # redelivered after a rebalance, until merged
        "events_per_s": round(count / seconds),
        "seconds": round(seconds, 2),
        "startup_seconds": round(ready - spawned, 2),
        "first_row_after_s": round(first_row[0] - ready, 2) if first_row else None,
        "all_ingested_after_s": round(ingested_at - ready, 2) if ingested_at else None,
        "steady_events_per_s": steady,
        **cpu,
        **rss,
        "flywheel_cores": round(flywheel_cpu / seconds, 3),
        "worker_cpu_ms_per_event": round(flywheel_cpu / max(1, count) * 1e3, 3),
        "cpu_us_per_event": round(flywheel_cpu / max(1, count) * 1e6, 1),
        "inserts": int(inserts),
        "rows_per_insert": round(count / inserts) if inserts else None,
        "insert_seconds_total": round(insert_s, 2),
        "insert_share_of_window": round(insert_s / seconds, 3),
        "duplicates_dropped": int(sum(metric_sum(m, "flywheel_events_duplicate_total") for m in metrics)),
        "partials_published": int(sum(metric_sum(m, "flywheel_partials_published_total") for m in metrics)),
        "sink_rows": {k.split('"')[1]: int(sum(x.get(k, 0) for x in metrics)) for k in metrics[0]
                      if k.startswith("flywheel_sink_rows_total{")},
        "window_wall": [ready_wall, done_wall],
        "series": series,
        "logs": {name: str(log_path) for name, (_, log_path) in procs.items()},
    }


# --------------------------------------------------------------------------- the peer


def peer(settings: Settings, n: int, data_dir: Path, timeout: float) -> dict[str, Any]:
    """bench/peer.py on the same events.raw, in its own process (it measures its own window and CPU)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "peer.py"), settings.kafka_bootstrap,
                           settings.topics.raw, str(n), str(data_dir)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the peer pipeline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rows"] != n:
        raise SystemExit(f"the peer pipeline stored {result['rows']} rows of {n}: {result}")
    return result


# --------------------------------------------------------------------------- the profile

Frame = tuple[str, str]  # (function, file path) of one pyinstrument frame


def _frame(identifier: str) -> Frame:
    """pyinstrument frame id "function\\0file\\0line[\\1attributes]" → (function, file)."""
    parts = identifier.split("\x01", 1)[0].split("\x00")
    return parts[0], parts[1] if len(parts) > 1 else ""


def package_of(path: str) -> str:
    """flywheel/<module>, a third-party package's name, stdlib:<module> or <built-in>."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/streams/flywheel/" in path:
        return "flywheel/" + path.split("/streams/flywheel/", 1)[1]
    if "/lib/python3" in path:
        rest = path.split("/lib/python3", 1)[1].split("/", 2)
        return "stdlib:" + (rest[1].removesuffix(".py") if len(rest) > 1 else path)
    return path


def _has(func: str | tuple[str, ...], file_part: str) -> Callable[[list[Frame]], bool]:
    funcs = (func,) if isinstance(func, str) else func
    return lambda stack: any(f in funcs and file_part in p for f, p in stack)


def _in(file_part: str) -> Callable[[list[Frame]], bool]:
    return lambda stack: any(file_part in p for _, p in stack)


def _idle(stack: list[Frame]) -> bool:
    func, path = stack[-1]
    return path.startswith("<") and func.endswith((".poll", ".select"))


# Where the worker's main thread spends its time; an indented stage is part of the one above it.
STAGES: list[tuple[str, Callable[[list[Frame]], bool]]] = [
    ("ingest stage (stages/ingest.py)", _in("flywheel/stages/ingest.py")),
    ("  validate (model/)", _in("flywheel/model/validate.py")),
    ("  dedup + identity tables (stages/tables.py, RocksDB)", lambda s: _in("flywheel/stages/tables.py")(s)
     or _has(("get", "write", "scan"), "flywheel/runtime/faust_seams.py")(s)),
    ("  outputs: record batches (runtime/outbox.py)", _in("flywheel/runtime/outbox.py")),
    ("aggregate stage (stages/aggregate.py, metrics/)", _in("flywheel/stages/aggregate.py")),
    ("  person state + partials (metrics/)", _in("flywheel/metrics/")),
    ("  person table reads and writes (stages/tables.py, RocksDB)", lambda s: _in("flywheel/stages/tables.py")(s)
     or _has(("get", "write", "scan"), "flywheel/runtime/faust_seams.py")(s)),
    ("  rows + ClickHouse insert hand-off (model/rows.py, stages/sink.py)",
     lambda s: _in("flywheel/model/rows.py")(s) or _in("flywheel/stages/sink.py")(s)),
    ("  outputs + person changelog (runtime/outbox.py)", _in("flywheel/runtime/outbox.py")),
    ("sinks of partials, identity, invalid (stages/sink.py)", _in("flywheel/stages/sink.py")),
    ("Faust fetcher: consumer → batches", lambda s: _has(("on_message", "getmany"), "/faust/")(s)
     or _has(("_drain_messages", "_deliver"), "flywheel/runtime/faust_seams.py")(s)),
    ("batch plumbing (runtime/delivery.py, retry.py: queue, coalescing, acks)",
     lambda s: _in("flywheel/runtime/delivery.py")(s) or _in("flywheel/runtime/retry.py")(s)),
    ("Faust streams (none expected: every topic is a batch topic)", _in("/faust/streams.py")),
    ("producer: aiokafka sender", lambda s: any(
        ("/aiokafka/producer/" in p) or (f in ("_handle_pending", "_on_published") and "/faust/" in p)
        for f, p in s)),
    ("HTTP (the bench polling /sql and /metrics)", _has("_handle_request", "/aiohttp/")),
    ("event loop idle (epoll)", _idle),
]


def summarise_profile(path: Path, window: list[float], top: int = 15) -> dict[str, Any]:
    """Stage shares, self time per package and function, in the consumption window only."""
    from pyinstrument.session import Session

    session = Session.load(path)
    at = session.start_time
    selfs: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0.0
    for identifiers, seconds in session.frame_records:
        at += seconds
        if not window[0] <= at <= window[1]:
            continue
        total += seconds
        stack = [_frame(i) for i in identifiers]
        func, file = stack[-1]
        selfs[f"{func} ({package_of(file)})"] += seconds
        packages[package_of(file)] += seconds
        matched = parent = False  # a stack counts for its first top-level stage and that one's sub-stages
        for name, matches in STAGES:
            top_level = not name.startswith(" ")
            if top_level:
                parent = not matched and matches(stack)
                matched = matched or parent
                if parent:
                    stages[name] += seconds
            elif parent and matches(stack):
                stages[name] += seconds
        if not matched:
            stages["other: asyncio/mode scheduling, commits, timers"] += seconds

    def table(counter: Counter[str], k: int | None) -> list[list[Any]]:
        return [[name, round(s, 3), round(s / total, 3)] for name, s in counter.most_common(k)]

    order = [name for name, _ in STAGES] + ["other: asyncio/mode scheduling, commits, timers"]
    return {
        "sampled_seconds": round(total, 2),
        "stages": [[name, round(stages[name], 3), round(stages[name] / total, 3)] for name in order if total],
        "top_packages_self": table(packages, 12),
        "top_self": table(selfs, top),
        "file": str(path),
    }


# --------------------------------------------------------------------------- report


def render(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        f"Flywheel pipeline bench {doc['started']}: {cfg['events']} events, {cfg['partitions']} partitions, "
        f"{os.cpu_count()} CPUs, load average at start {doc['loadavg_start']}",
        f"pre-load through flywheel.producer.Producer: {doc['preload']['events_per_s']} ev/s",
        "",
        "run  pipeline ev/s  ceiling ev/s   ratio  | worker CPU ms/ev  ceiling CPU us/ev | pipeline s, "
        "worker cores, broker cores, machine busy",
    ]
    for i, run in enumerate(doc["runs"], 1):
        p, c = run["pipeline"], run["ceiling"]
        flag = "" if p["complete"] else f"  INCOMPLETE: {p['rows']} rows when the budget ran out"
        lines.append(
            f"{i:>3}  {p['events_per_s']:>13,}  {c['events_per_s']:>12,}  {run['ratio']:>6.2%} "
            f"| {p['worker_cpu_ms_per_event']:>16} {c['cpu_us_per_event']:>18} | "
            f"{p['seconds']} s, {p['worker_cores']}, {p['broker_cores']}, {p['machine_busy']:.0%}{flag}"
        )
    lines += ["", "side by side, per run (CPU: every process of the pipeline, the broker's apart; per core = "
                  "1 / CPU per event):",
              f"{'run':>3}  {'pipeline':<28} {'events/s':>9} {'CPU us/ev':>10} {'ev/s per core':>13} "
              f"{'cores':>6} {'broker cores':>12}  ratios"]
    for i, run in enumerate(doc["runs"], 1):
        c, p = run["ceiling"], run["pipeline"]
        rows = [("bare aiokafka consumer", c["events_per_s"], c["cpu_us_per_event"], c["consumer_cores"], None, "")]
        if "peer" in run:
            q = run["peer"]
            rows.append(("peer (bench/peer.py)", q["events_per_s"], q["cpu_us_per_event"], q["cores"], None,
                         f"{q['events_per_s'] / c['events_per_s']:.1%} of bare"))
        ratios = f"{run['ratio']:.1%} of bare" + (f", {run['vs_peer']:.1%} of peer" if "vs_peer" in run else "")
        rows.append(("Flywheel, 1 worker", p["events_per_s"], p["cpu_us_per_event"], p["flywheel_cores"],
                     p["broker_cores"], ratios))
        for key in sorted(k for k in run if k.startswith("workers_")):
            x = run[key]
            k = x["workers"]
            rows.append((f"Flywheel, {k} workers + store", x["events_per_s"], x["cpu_us_per_event"],
                         x["flywheel_cores"], x["broker_cores"],
                         f"{x['vs_one']:.2f}x 1 worker" + ("" if x["complete"] else " INCOMPLETE")))
        for name, rate, us, cores, broker, ratio in rows:
            per_core = f"{1e6 / us:,.0f}" if us else "-"
            lines.append(f"{i:>3}  {name:<28} {rate:>9,} {us:>10} {per_core:>13} {cores:>6} "
                         f"{broker if broker is not None else '':>12}  {ratio}")
    base = [r for r in doc["runs"] if "baseline" in r]
    if base:
        lines += ["", f"baseline ({cfg['baseline']}) in the same runs, alternating with this tree:",
                  "run  baseline ev/s  this tree ev/s  this/baseline | baseline CPU ms/ev  this tree CPU ms/ev"]
        for i, run in enumerate(base, 1):
            b, p = run["baseline"], run["pipeline"]
            lines.append(f"{i:>3}  {b['events_per_s']:>13,}  {p['events_per_s']:>14,}  {run['vs_baseline']:>13.2f} "
                         f"| {b['worker_cpu_ms_per_event']:>18} {p['worker_cpu_ms_per_event']:>20}")
    ratios = [r["ratio"] for r in doc["runs"]]
    if ratios:
        verdict = "meets it" if min(ratios) >= TARGET_RATIO else "BELOW"
        lines.append(f"target: pipeline >= {TARGET_RATIO:.0%} of the ceiling -> {verdict} "
                     f"(ratios {', '.join(f'{r:.2%}' for r in ratios)})")
        p = doc["runs"][-1]["pipeline"]
        lines.append(
            f"last run: all raw records ingested {p['all_ingested_after_s']} s after ready, first row "
            f"{p['first_row_after_s']} s; {p['inserts']} inserts of ~{p['rows_per_insert']} rows took "
            f"{p['insert_seconds_total']} s ({p['insert_share_of_window']:.0%} of the window, on the "
            "ClickHouse thread)"
        )
    prof = doc.get("profile")
    if prof and "summary" in prof:
        s, pp = prof["summary"], prof["pipeline"]
        lines += [
            "",
            f"profile: worker main thread, consumption window only, {pp['rows']} events on a separate topic "
            f"(under pyinstrument: {pp['events_per_s']:,} ev/s, {s['sampled_seconds']} s sampled)",
            "  by stage (share of main-thread wall time; indented = part of the line above):",
            *[f"    {share:6.1%}  {name}" for name, _, share in s["stages"]],
            "  self time by package:",
            *[f"    {share:6.1%}  {name}" for name, _, share in s["top_packages_self"]],
            "  top functions by self time:",
            *[f"    {share:6.1%}  {name}" for name, _, share in s["top_self"]],
            f"  whole profile: .venv/bin/pyinstrument --load {s['file']}",
        ]
    elif prof:
        lines += ["", f"profile: {prof['skipped']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000, help="records pre-loaded into events.raw")
    parser.add_argument("--runs", type=int, default=2, help="ceiling + pipeline measurements")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of the bench topics")
    parser.add_argument("--profile-events", type=int, default=15_000,
                        help="events for the profiled run (0: no profile)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole invocation")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between count() polls")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--metrics", type=Path, default=None,
                        help="metrics file of every run (default FLYWHEEL_METRICS's; the throughput issue's: "
                             "bench/throughput-metrics.yaml)")
    parser.add_argument("--workers", type=lambda v: [int(k) for k in v.split(",")], default=[1, 2],
                        help="comma-separated worker counts per run (more than 1: with a `flywheel store`)")
    parser.add_argument("--no-peer", action="store_true", help="skip the minimal peer pipeline (bench/peer.py)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of another revision (git worktree add DIR REV): each run also measures "
                             "its worker on the same topic, alternating which goes first")
    args = parser.parse_args()
    global METRICS
    METRICS = args.metrics.resolve() if args.metrics is not None else None

    started = datetime.now(UTC)
    budget_end = time.monotonic() + args.budget
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    tag = uuid.uuid4().hex[:6]
    stamp = started.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw_topic = f"bench-{tag}.events.raw"
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "config": {"events": args.events, "partitions": args.partitions, "topic": raw_topic,
                   "metrics": str(METRICS or Settings().metrics),
                   "budget_s": args.budget, "sink_batch_size": Settings().sink_batch_size,
                   "baseline": str(args.baseline) if args.baseline else None},
        "runs": [],
    }
    try:
        log(f"starting Kafka at {broker.bootstrap} in {tmp}")
        broker_pid = devkafka.start(broker)
        doc["config"]["kafka"] = devkafka.kafka_version()
        log(f"pre-loading {args.events} events into {raw_topic}")
        doc["preload"] = preload(broker.bootstrap, raw_topic, args.partitions, args.events, args.seed)
        log(f"pre-loaded at {doc['preload']['events_per_s']} ev/s")
        profile_reserve = 90 if args.profile_events else 0
        for i in range(1, args.runs + 1):
            settings = run_settings(broker.bootstrap, args.partitions, raw_topic, f"{tag}r{i}",
                                    tmp / f"run{i}")
            c = ceiling(settings, args.events, timeout=60)
            log(f"run {i}: bare consumer {c['events_per_s']:,} ev/s ({c['cpu_us_per_event']} us CPU per event)")
            run: dict[str, Any] = {"ceiling": c}
            if not args.no_peer:
                run["peer"] = peer(settings, args.events, tmp / f"peer{i}",
                                   timeout=max(60, budget_end - time.monotonic()))
                log(f"run {i}: peer pipeline {run['peer']['events_per_s']:,} ev/s "
                    f"({run['peer']['cpu_us_per_event']} us CPU per event)")
            trees = [None] if args.baseline is None else ([args.baseline, None] if i % 2 else [None, args.baseline])
            for tree in trees:
                s = settings if tree is None else run_settings(broker.bootstrap, args.partitions, raw_topic,
                                                               f"{tag}b{i}", tmp / f"base{i}")
                p = pipeline(s, args.events, deadline=budget_end - profile_reserve, poll=args.poll,
                             broker_pid=broker_pid, tree=tree)
                name = "this tree" if tree is None else "baseline"
                log(f"run {i}: {name} {p['events_per_s']:,} ev/s ({p['rows']} rows in {p['seconds']} s, "
                    f"{p['worker_cpu_ms_per_event']} ms worker CPU per event)")
                run["pipeline" if tree is None else "baseline"] = p
            p = run["pipeline"]
            for k in args.workers:
                if k == 1 or not p["complete"]:
                    continue
                s = run_settings(broker.bootstrap, args.partitions, None, f"{tag}r{i}w{k}", tmp / f"run{i}w{k}")
                run[f"workers_{k}"] = x = pipeline(s, args.events, deadline=budget_end - profile_reserve,
                                                   poll=args.poll, broker_pid=broker_pid, workers=k,
                                                   preloaded=raw_topic)
                x["vs_one"] = round(x["events_per_s"] / p["events_per_s"], 3)
                log(f"run {i}: {k} workers + store {x['events_per_s']:,} ev/s ({x['vs_one']:.2f}x one; "
                    f"{x['cpu_us_per_event']} us CPU per event over every Flywheel process)")
            run["ratio"] = round(p["events_per_s"] / c["events_per_s"], 5)
            if "peer" in run:
                run["vs_peer"] = round(p["events_per_s"] / run["peer"]["events_per_s"], 4)
            if "baseline" in run:
                run["vs_baseline"] = round(p["events_per_s"] / run["baseline"]["events_per_s"], 3)
            log(f"run {i}: pipeline {run['ratio']:.2%} of the ceiling")
            doc["runs"].append(run)
            if not p["complete"]:
                log("the budget ran out: no further runs")
                break
        if args.profile_events:
            left = budget_end - time.monotonic()
            if left < 60:
                doc["profile"] = {"skipped": f"skipped: only {left:.0f} s of the --budget left"}
            else:
                prof_topic = f"bench-{tag}.profile.events.raw"
                preload(broker.bootstrap, prof_topic, args.partitions, args.profile_events, args.seed + 1)
                prof_path = RESULTS / f"pipeline-{stamp}.pyisession"
                settings = run_settings(broker.bootstrap, args.partitions, prof_topic, f"{tag}prof",
                                        tmp / "profiled")
                p = pipeline(settings, args.profile_events, deadline=budget_end - 15, poll=args.poll,
                             broker_pid=broker_pid, profile=prof_path)
                log(f"profiled run: {p['events_per_s']:,} ev/s under pyinstrument")
                doc["profile"] = {"pipeline": p, "summary": summarise_profile(prof_path, p["window_wall"])}
    finally:
        log("stopping Kafka")
        devkafka.stop(broker)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["seconds_total"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    text = render(doc)
    (RESULTS / f"pipeline-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"pipeline-{stamp}.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nresults: {RESULTS}/pipeline-{stamp}.json and .txt ({doc['seconds_total']} s in all)")


if __name__ == "__main__":
    main()
