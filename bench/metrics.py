"""Metrics benchmark (issues 5 and 6): what funnels, retention and active users cost in the stream.

    make bench-metrics                       # = .venv/bin/python bench/metrics.py (default: ~8-10 min)
    .venv/bin/python bench/metrics.py --parts stage,state --persons 100000
    .venv/bin/python bench/metrics.py --pipeline-events 60000 --pipeline-runs 2 --latency-reps 20

Measurements, chosen with --parts (default: all):

stage     The aggregate stage alone, in-process (no Kafka, no ClickHouse): identified records go through
          the real AggregateStage.process in batches, with a dict as the `persons` table, a sink stub
          that keeps nothing and a producer stub (hand-offs are fed back as later records, as Kafka
          would deliver them). Events/s with the metrics of schemas/metrics.yaml ("on") vs an empty
          metrics file ("off": active users only), alternating, --stage-repeats times; plus a cProfile
          of one "on" pass over the first --profile-records records.
state     After the "on" pass: bytes of each person's stored value (orjson of PersonState.to_json),
          the Python memory (tracemalloc) of the person states, the same values written to RocksDB
          with Faust's options (on-disk size), and the time to restore partials from the checkpoints and to
          count them from the whole table (what a worker does when a partition is assigned). Projected per
          million persons.
pipeline  A local Kafka and one `flywheel worker` (embedded ClickHouse), metrics on vs off, same
          events.raw: events/s until flywheel.events holds every event, worker CPU per event.
latency   A worker idle on a running pipeline: a 4-step checkout journey of a fresh person (timestamps
          now) is sent; flywheel.funnel_daily is polled until step 4 of today grows. Per
          --latency-flush value (FLYWHEEL_SINK_FLUSH_SECONDS), --latency-reps times.
(1 worker vs 2 workers, with a `flywheel store`: bench/pipeline.py, `make bench`.)

The stream (all parts): --persons persons over --days days; each has 1-3 devices, about half return on
later days, 40% sign up (identify + Signed Up) and log in on their other devices later (each first login
of a device is a link: a merge marker and a state hand-off). Sessions look like flywheel.sample's:
page, product views, adds to cart, checkout and order once signed up. Seeded: same arguments, same stream.

Results: bench/results/metrics-<time>.json and .txt. The machine may be shared: every part records the
load average and how busy the machine was, so a noisy number can be recognised.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import yaml
from flywheel import devkafka, query
from flywheel.config import Settings, Topics
from flywheel.experiments import assign
from flywheel.metrics.definitions import Metrics, load_metrics, parse_metrics
from flywheel.metrics.person import PersonState
from flywheel.model.envelope import Limits
from flywheel.model.identity import IdentityMap
from flywheel.model.plan import load_plan
from flywheel.model.validate import Raw, validate
from flywheel.runtime.partitioner import partition_of
from flywheel.stages.aggregate import BEGIN, AggregateStage, is_bookkeeping
from flywheel.stages.tables import MemoryTable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as pl  # noqa: E402  (bench/pipeline.py: Kafka, worker and CPU machinery)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METRICS_ON = REPO / "schemas" / "metrics.yaml"
PARTS = ("stage", "state", "pipeline", "latency")
CATEGORIES = ["shoes", "shirts", "bags", "hats"]
PAGES = ["Home", "Category", "Search", "Help"]
log = pl.log


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


# --------------------------------------------------------------------------- the stream


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def population(n_persons: int, *, days: int, seed: int, now: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Segment messages of `n_persons` persons over the last `days` days, in time order (day by day).

    Per person: 1-3 devices (60/30/10%); one session (55%) or a first session and ~1+Exp(4) more on
    later days (45%); sign-up (40%) in one of its sessions: identify (links the device) + Signed Up;
    later sessions on another device start with an identify (a login: one more link). Every timestamp is
    before `now` (the worker refuses events more than a day ahead of their arrival).
    """
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    start = now - timedelta(days=days, hours=2)
    run = f"{seed:x}{rng.getrandbits(32):08x}"
    by_day: list[list[tuple[int, int]]] = [[] for _ in range(days)]
    plans: list[tuple[int, int]] = []  # (devices, sign-up session index or -1)
    for p in range(n_persons):
        devices = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
        first = rng.randrange(days)
        sessions = [first]
        if rng.random() < 0.45:
            sessions += sorted(rng.randrange(first, days) for _ in range(1 + int(rng.expovariate(1 / 4))))
        plans.append((devices, rng.randrange(len(sessions)) if rng.random() < 0.4 else -1))
        for j, day in enumerate(sessions):
            by_day[day].append((p, j))
    anon_ids: dict[tuple[int, int], str] = {}
    linked: dict[int, set[int]] = {}
    last_t: dict[int, datetime] = {}

    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128)))

    for day, sessions in enumerate(by_day):
        out: list[tuple[datetime, int, dict[str, Any]]] = []
        for p, j in sessions:
            devices, signup = plans[p]
            device = 0 if j == 0 else rng.randrange(devices)
            t = start + timedelta(days=day, seconds=rng.uniform(0, 86_400 - 3_600))
            if p in last_t and last_t[p] > t:
                t = last_t[p] + timedelta(minutes=rng.uniform(5, 60))
            last_t[p] = _session(
                rng, out, uid, t, anon=anon_ids.get((p, device)) or anon_ids.setdefault((p, device), uid()),
                user=f"u-{run}-{p}", device=device, linked=linked.setdefault(p, set()),
                known=signup >= 0 and j >= signup, signs_up=j == signup, order_id=f"o-{run}-{p}-{j}")
        out.sort(key=lambda x: (x[0], x[1]))
        for _, _, message in out:
            yield message


def _session(rng: random.Random, out: list, uid, t: datetime, *, anon: str, user: str, device: int,
             linked: set[int], known: bool, signs_up: bool, order_id: str) -> datetime:
    """One visit on one device: appends (time, seq, message) to `out`, returns the time of its last event."""
    context = {"library": {"name": "flywheel-bench", "version": "1"}, "os": {"name": ("ios", "android", "web")[device]}}

    def emit(kind: str, with_user: bool, **fields: Any) -> None:
        nonlocal t
        t += timedelta(seconds=rng.uniform(2, 240))
        ids = {"anonymousId": anon, **({"userId": user} if with_user else {})}
        out.append((t, len(out), {"type": kind, **ids, "timestamp": _iso(t), "messageId": uid(),
                                  "context": context, **fields}))

    def login() -> None:
        emit("identify", True, traits={"plan": rng.choice(["free", "pro"])})
        linked.add(device)

    emit("page", device in linked, name=rng.choice(PAGES), properties={"path": "/"})
    if known and not signs_up and device not in linked:
        login()  # another device of a user: its first login links it
    added = False
    for _ in range(rng.randint(1, 5)):
        category, product = rng.choice(CATEGORIES), f"p-{rng.randint(1, 200)}"
        price = round(rng.uniform(5, 200), 2)
        emit("track", device in linked, event="Product Viewed",
             properties={"product_id": product, "category": category, "price": price})
        if rng.random() < 0.35:
            added = True
            emit("track", device in linked, event="Product Added",
                 properties={"product_id": product, "category": category, "price": price, "quantity": 1})
    if signs_up:
        login()
        emit("track", True, event="Signed Up", properties={"method": "email"})
    if known and added and rng.random() < 0.6:
        emit("track", True, event="Checkout Started", properties={"items": 1})
        if rng.random() < 0.7:
            emit("track", True, event="Order Completed", properties={
                "order_id": order_id, "revenue": round(rng.uniform(10, 400), 2), "currency": "EUR"})
    return t


def with_exposures(messages: list[dict[str, Any]], metrics: Metrics, rate: float, seed: int) -> list[dict]:
    """The stream with an `Experiment Viewed` of each of `metrics`' experiments right after a session's first
    page (a page starts a session in `population`), for `rate` of the sessions, drawn per experiment; the
    variation by flywheel.experiments.assign on the device's anonymous id."""
    if not rate or not metrics.experiments:
        return messages
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for m in messages:
        out.append(m)
        if m["type"] != "page":
            continue
        for e in metrics.experiments:
            if rng.random() < rate:
                variation = assign(e.name, m["anonymousId"], dict(e.variations))
                out.append({**{k: m[k] for k in ("anonymousId", "userId", "timestamp", "context") if k in m},
                            "type": "track", "event": "Experiment Viewed", "messageId": f"{m['messageId']}-{e.name}",
                            "properties": {"experiment_id": e.experiment_id, "variation_id": variation}})
    return out


Record = tuple[int, bytes, bytes]  # (partition of events.identified, value, key): one identified record


def _sized(data: bytes) -> bytes:
    """A right-sized copy: orjson ≥ 3.12 returns bytes whose allocation is at least 4 KiB (its write
    buffer, not shrunk), so a million kept records would take 4+ GB instead of ~0.5."""
    return bytes(memoryview(data))


def identified(messages: Iterable[dict[str, Any]], partitions: int) -> tuple[list[Record], dict[str, int]]:
    """What the ingest stage writes to events.identified: validated events with their person, and a merge
    marker (keyed by the anonymous id) after each first link; (partition, value) in arrival order."""
    plan = load_plan(REPO / "schemas" / "tracking_plan.yaml")
    limits = Limits()
    ids = IdentityMap()
    now = datetime.now(UTC)
    out: list[Record] = []
    counts: Counter[str] = Counter()
    persons: set[str] = set()
    for offset, message in enumerate(messages):
        outcome = validate(Raw(orjson.dumps(message), "bench", now, "raw", 0, offset), plan, limits)
        ev = outcome.event  # type: ignore[union-attr]  (the generator only makes valid events)
        result = ids.apply(ev)
        ev["personId"] = result.person_id
        persons.add(result.person_id)
        key = result.person_id.encode()
        out.append((partition_of(key, partitions), _sized(orjson.dumps(ev)), key))
        counts["events"] += 1
        if result.link is not None:
            anon = result.link.anonymous_id
            marker = {"type": "merge", "from": anon, "into": result.link.user_id,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]}
            out.append((partition_of(anon.encode(), partitions), _sized(orjson.dumps(marker)), anon.encode()))
            counts["merge_markers"] += 1
    counts["distinct_person_ids"] = len(persons)
    return out, dict(counts)


# --------------------------------------------------------------------------- stage (in-process)


class FakeMessage:
    """What AggregateStage.process reads of a fetched Kafka record: .partition and .value."""

    __slots__ = ("partition", "value")

    def __init__(self, partition: int, value: bytes):
        self.partition = partition
        self.value = value


class FakeTable(MemoryTable):
    """The persons table in memory."""

    def __init__(self) -> None:
        super().__init__("flywheel-persons-changelog")

    def items(self):
        return [(k, v) for store in self.data.values() for k, v in store.items()]


class FakeOutbox:
    """runtime/outbox.py's Outbox without Kafka: counts the records per topic; a state hand-off (or a switch
    report) on events.identified is queued for its partition, where Kafka would deliver it later."""

    def __init__(self, published: Counter, handoffs: deque, identified: str, partitions: int):
        self.published, self.handoffs = published, handoffs
        self.identified, self.partitions = identified, partitions

    def add(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int | None = None) -> None:
        self.published[topic] += 1
        if topic == self.identified:
            self.handoffs.append((partition if partition is not None else partition_of(key, self.partitions), value,
                                  key))

    async def send(self) -> dict:
        return {}


class NullSink:
    """stages.ports.ClickHouseWriter: counts rows; nothing is stored (so no late-looking event was)."""

    def __init__(self) -> None:
        self.rows = self.late = 0

    async def write(self, table: str, rows: list[dict]) -> None:
        self.rows += len(rows)
        self.late += sum(r["late"] for r in rows)

    async def counted(self, message_ids) -> set[str]:
        return set()


async def no_retry(attempt, name, size):
    return await attempt()


def stage_topics() -> Topics:
    return Topics()


def distinct_batches(window: list[Record]) -> list[list[Record]]:
    """The records of a window as batches that hold each person at most once, in rounds: the first record of
    every person, then every second one... Each person's records keep their order, so does every key
    (merge markers still follow their anonymous id's events); only different persons' records swap within
    the window. This is what a live worker sees: a 1-second batch of a busy stream rarely holds one
    person twice, so every event costs a person touch (state read, contributions before and after, write)."""
    groups: dict[tuple[int, bytes], list[Record]] = {}
    for r in window:
        groups.setdefault((r[0], r[2]), []).append(r)
    out: list[list[Record]] = []
    depth = 0
    while True:
        batch = [g[depth] for g in groups.values() if len(g) > depth]
        if not batch:
            return out
        out.append(batch)
        depth += 1


async def _drive(stage: AggregateStage, records: list[Record], batch: int, handoffs: deque,
                 sink: NullSink, batching: str) -> tuple[int, int, list[float]]:
    """Feed the records in windows of `batch` (hand-offs first, as Kafka delivered them meanwhile): one batch
    per window ("fixed"), or the window split by distinct_batches ("distinct"). Returns (batches, person
    touches: the sum over batches of the distinct persons in each, CPU us per event in each tenth of the
    input)."""
    i = batches = touches = 0
    progress = [(0, time.process_time(), 0)]  # (records consumed, CPU s, events) after each window
    while i < len(records) or handoffs:
        window = [handoffs.popleft() for _ in range(min(batch, len(handoffs)))]
        take = batch - len(window)
        window += records[i:i + take]
        i = min(len(records), i + take)
        for chunk in (distinct_batches(window) if batching == "distinct" else [window]):
            touches += len({(p, k) for p, _, k in chunk})
            await stage.process([FakeMessage(p, v) for p, v, _ in chunk])
            batches += 1
        progress.append((i, time.process_time(), sink.rows))
    progress[-1] = (len(records) + 1, *progress[-1][1:])  # the last hand-offs belong to the last tenth
    tenths: list[float] = []
    prev = progress[0]
    for t in range(1, 11):
        point = next(x for x in progress if x[0] >= t * len(records) / 10)
        if point[2] > prev[2]:
            tenths.append(round((point[1] - prev[1]) / (point[2] - prev[2]) * 1e6, 1))
            prev = point
    return batches, touches, tenths


def stage_pass(records: list[Record], metrics: Metrics, *, partitions: int, batch: int, batching: str,
               profile: cProfile.Profile | None = None) -> tuple[dict[str, Any], AggregateStage]:
    """One pass of `records` through a fresh AggregateStage; wall and CPU time of the whole pass."""
    topics = stage_topics()
    handoffs: deque = deque()
    published: Counter[str] = Counter()

    async def outbox() -> FakeOutbox:
        return FakeOutbox(published, handoffs, topics.identified, partitions)

    sink = NullSink()
    stage = AggregateStage(metrics=metrics, persons=FakeTable(), sink=sink, outbox=outbox, topics=topics,
                           retry=no_retry)
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    batches, touches, tenths = asyncio.run(_drive(stage, records, batch, handoffs, sink, batching))
    if profile is not None:
        profile.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    events = sink.rows
    return {
        "events": events, "records": len(records) + published[topics.identified], "batches": batches,
        "touches_per_event": round(touches / events, 3), "late_events": sink.late, "cpu_us_per_event_by_tenth": tenths,
        "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
        "events_per_s": round(events / wall), "cpu_us_per_event": round(cpu / events * 1e6, 1),
        "handoffs": published[topics.identified],
        "published": {"funnels": published[topics.funnels], "retention": published[topics.retention],
                      "active_users": published[topics.active_users], "segments": published[topics.segments]},
        "alert_series": published[topics.alert_series],
        "persons_stored": sum(1 for k, _ in stage.persons.items() if not is_bookkeeping(k)),
    }, stage


def run_stage(records: list[Record], on: Metrics, off: Metrics, args, batching: str,
              profile: bool) -> tuple[dict, AggregateStage]:
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    last_on: AggregateStage | None = None
    for r in range(args.stage_repeats):
        order = ("on", "off") if r % 2 == 0 else ("off", "on")
        for mode in order:
            la = loadavg()
            busy0 = pl.machine_ticks()
            result, stage = stage_pass(records, on if mode == "on" else off, partitions=args.partitions,
                                       batch=args.batch, batching=batching)
            busy1 = pl.machine_ticks()
            result["loadavg"] = la
            result["machine_busy"] = round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3)
            runs[mode].append(result)
            log(f"stage ({batching}) {mode:>3} pass {r + 1}: {result['events_per_s']:,} ev/s "
                f"({result['cpu_us_per_event']} us CPU/event; by tenth of the stream "
                f"{result['cpu_us_per_event_by_tenth']}; "
                f"{result['touches_per_event']} person touches/event; {result['seconds']} s, load {la[0]}, "
                f"machine busy {result['machine_busy']:.0%})")
            if mode == "on":
                last_on = stage
            del stage
            gc.collect()
    out: dict[str, Any] = {"runs": runs}
    for mode in runs:
        out[mode] = {"events_per_s": spread([x["events_per_s"] for x in runs[mode]]),
                     "cpu_us_per_event": spread([x["cpu_us_per_event"] for x in runs[mode]])}
    # CPU time is the steadier basis on a shared machine: on/off ratio of the medians of both
    out["ratio_on_off_events_per_s"] = round(out["on"]["events_per_s"]["median"]
                                             / out["off"]["events_per_s"]["median"], 3)
    out["ratio_on_off_cpu"] = round(out["on"]["cpu_us_per_event"]["median"]
                                    / out["off"]["cpu_us_per_event"]["median"], 3)
    if profile and args.profile_records:
        out["profile"] = profile_stage(records[:args.profile_records], on, args, batching)
    if args.what_if_cache:
        out["what_if_cached_day_bounds"] = what_if_cached(records, on, off, args, batching)
    assert last_on is not None
    return out, last_on


@contextmanager
def cached_metric_properties() -> Iterator[None]:
    """Bench-only what-if (not a change of streams/): Metrics.reach_days / horizon_days / lateness_days are
    properties recomputed at every call (a max over the funnels and retentions); here each is computed
    once per Metrics object. Same values, so the same results: only the cost changes."""
    names = ("reach_days", "horizon_days", "lateness_days")
    originals = {name: Metrics.__dict__[name] for name in names}
    cache: dict[tuple[int, str], int] = {}
    for name, prop in originals.items():
        def getter(self, prop=prop, name=name):
            key = (id(self), name)
            value = cache.get(key)
            if value is None:
                value = cache[key] = prop.fget(self)
            return value
        setattr(Metrics, name, property(getter))
    try:
        yield
    finally:
        for name, prop in originals.items():
            setattr(Metrics, name, prop)


def what_if_cached(records: list[Record], on: Metrics, off: Metrics, args, batching: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with cached_metric_properties():
        for mode, metrics in (("on", on), ("off", off)):
            result, stage = stage_pass(records, metrics, partitions=args.partitions, batch=args.batch,
                                       batching=batching)
            out[mode] = {k: result[k] for k in ("events_per_s", "cpu_us_per_event", "seconds")}
            log(f"what-if ({batching}, Metrics day bounds cached) {mode:>3}: {result['events_per_s']:,} ev/s, "
                f"{result['cpu_us_per_event']} us CPU/event")
            del stage
    return out


def profile_stage(records: list[Record], metrics: Metrics, args, batching: str, top: int = 18) -> dict[str, Any]:
    """cProfile of one "on" pass: the stage's own functions by cumulative and self time."""
    prof = cProfile.Profile()
    result, _ = stage_pass(records, metrics, partitions=args.partitions, batch=args.batch,
                           batching=batching, profile=prof)
    stats = pstats.Stats(prof)
    total = max(v[3] for v in stats.stats.values())  # cumulative of the outermost frame ≈ profiled time

    def name(func: tuple[str, int, str]) -> str:
        path, line, fn = func
        short = path.split("/streams/flywheel/", 1)[-1] if "/streams/flywheel/" in path else Path(path).name
        return f"{fn} ({short}:{line})"

    rows = [(name(f), v[1], v[2], v[3]) for f, v in stats.stats.items()]  # (name, calls, self, cumulative)
    by_self = sorted(rows, key=lambda r: -r[2])[:top]
    ours = [r for r in rows if "flywheel" in r[0] or ".py:" in r[0] and any(
        m in r[0] for m in ("person.py", "partials.py", "funnel.py", "aggregate.py", "definitions.py", "cells.py",
                            "rows.py"))]
    by_cum = sorted(ours, key=lambda r: -r[3])[:top]
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    path = RESULTS / f"metrics-stage-{args.stamp}-{batching}.pstats"
    stats.dump_stats(path)
    return {
        "records": len(records), "events_per_s_under_cprofile": result["events_per_s"],
        "profiled_seconds": round(total, 3), "file": str(path),
        "top_self": [[n, c, round(s, 3), round(s / total, 3)] for n, c, s, _ in by_self],
        "top_cumulative_flywheel": [[n, c, round(cu, 3), round(cu / total, 3)] for n, c, _, cu in by_cum],
    }


# --------------------------------------------------------------------------- state size


def measure_state(stage: AggregateStage, metrics: Metrics, args, tmp: Path) -> dict[str, Any]:
    items = [(k, v) for k, v in stage.persons.items() if not is_bookkeeping(k)]
    sizes = [len(v) for _, v in items]
    keys = [len(k) for k, _ in items]
    n = len(items)
    parsed = [orjson.loads(v) for _, v in items]
    events_kept = [len(d["m"]) for d in parsed]
    funnel_kept = [len(d["f"]) for d in parsed]
    days_kept = [len(d["d"]) for d in parsed]
    share = Counter()
    for d in parsed:
        for field in d:
            share[field] += len(orjson.dumps(d[field])) + len(field) + 4
    total_bytes = sum(sizes)
    out: dict[str, Any] = {
        "persons": n,
        "value_bytes": {"mean": round(total_bytes / n, 1), "p50": pct(sizes, 50), "p99": pct(sizes, 99),
                        "max": max(sizes)},
        "key_bytes_mean": round(sum(keys) / n, 1),
        "field_share_of_bytes": {k: round(v / total_bytes, 3) for k, v in share.most_common()},
        "applied_events_kept": {"mean": round(sum(events_kept) / n, 2), "p50": pct(events_kept, 50),
                                "p99": pct(events_kept, 99)},
        "funnel_events_kept": {"mean": round(sum(funnel_kept) / n, 2), "p99": pct(funnel_kept, 99)},
        "active_days_kept": {"mean": round(sum(days_kept) / n, 2), "p99": pct(days_kept, 99)},
    }
    del parsed
    gc.collect()
    # Python memory: the states as objects, and the table as a dict of bytes (a memory:// store)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    states = [PersonState.from_json(orjson.loads(v), metrics) for _, v in items]
    objects = tracemalloc.get_traced_memory()[0] - base
    del states
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    as_bytes = {_sized(k): _sized(v) for k, v in items}  # right-sized copies, not the same objects
    dict_bytes = tracemalloc.get_traced_memory()[0] - base
    del as_bytes
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    as_written = {_sized(k): orjson.dumps(orjson.loads(v)) for k, v in items}  # as the stage writes them
    written_bytes = tracemalloc.get_traced_memory()[0] - base
    del as_written
    tracemalloc.stop()
    out["python_bytes_per_person"] = {"PersonState objects": round(objects / n),
                                      "dict of right-sized key/value bytes": round(dict_bytes / n),
                                      "dict of values as orjson.dumps returns them": round(written_bytes / n)}
    out["rocksdb"] = rocksdb_size(items, tmp / "rocksdb")
    # what a worker does on assignment: load each partition's partials from its checkpoint (O(cells)),
    # and what it does when the checkpoint is torn: count them from every person state
    gc.collect()
    for how, mark in (("checkpoint", None), ("count", BEGIN)):
        if mark is not None:  # a newer begin mark than the end's: the checkpoint is not trusted
            for p in range(args.partitions):
                stage.persons.data[p][mark + str(p).encode()] = b"999999999"
        stage.revoked(range(args.partitions))
        t0, c0 = time.perf_counter(), time.process_time()

        async def restore() -> None:
            stage.assigned(range(args.partitions))
            await asyncio.gather(*stage._repairs.values())
        asyncio.run(restore())
        out[f"restore_partials_{how}"] = {
            "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2),
            "us_per_person": round((time.process_time() - c0) / n * 1e6, 1),
            "cells": sum(len(p.counts) for p in stage.partials.parts.values())}
    per_m = 1_000_000
    out["projection_per_million_persons"] = {
        "stored_key_plus_value_MB": round((total_bytes + sum(keys)) / n * per_m / 1e6),
        "rocksdb_on_disk_MB": round(out["rocksdb"]["bytes_on_disk"] / n * per_m / 1e6),
        "memory_store_MB": round(dict_bytes / n * per_m / 1e6),
        "memory_store_orjson_as_returned_MB": round(written_bytes / n * per_m / 1e6),
        "all_states_as_python_objects_MB": round(objects / n * per_m / 1e6),
        "restore_partials_from_checkpoint_cpu_s": out["restore_partials_checkpoint"]["cpu_seconds"],
        "count_partials_cpu_s": round(out["restore_partials_count"]["cpu_seconds"] / n * per_m),
        "how": ("measured per person at this population, times 1e6 (linear: each person's state depends on "
                "its own events only, not on the population); the rocksdb figure is the SST files after a "
                "flush and full compaction with Faust's RocksDB options (one DB, not one per partition; no "
                "WAL); the changelog topic in Kafka holds ~the stored key+value bytes again after compaction. "
                "Not projected: the RSS growth of a process reading the RocksDB copy (rocksdb.rss_*), which "
                "is not proportional to the persons (bounded by Faust's RocksDB caches)"),
    }
    return out


_READ_ALL = """
import sys, time
from faust.stores.rocksdb import RocksDBOptions
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
import random
db = RocksDBOptions(use_rocksdict=True).open(sys.argv[1])
before = rss()
keys = []
for k, v in db.items():
    keys.append(k)
after_scan = rss()
random.Random(1).shuffle(keys)
for k in keys:
    db[k]
print(before, after_scan, rss(), len(keys))
"""


def rocksdb_size(items: list[tuple[bytes, bytes]], path: Path) -> dict[str, Any]:
    """The values written as a Faust RocksDB store would (rocksdict, Faust's options), flushed and compacted;
    then, in a fresh process, every value read once by a scan (what counting partials from the states does), then once
    more by key in random order (what the stage's table reads do): the RSS growth after each (the key
    list itself included, ~100 B per person) is what RocksDB keeps in the process (block cache: 2 GiB per
    partition DB by Faust's default)."""
    from faust.stores.rocksdb import RocksDBOptions

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    db = RocksDBOptions(use_rocksdict=True).open(path)
    try:
        for k, v in items:
            db[k] = v
        db.flush()
        db.compact_range(None, None)
    finally:
        db.close()
    sst = sum(f.stat().st_size for f in path.rglob("*.sst"))
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.endswith(".log"))
    out = subprocess.run([sys.executable, "-c", _READ_ALL, str(path)], capture_output=True, text=True, check=True)
    before, after_scan, after_gets, n = (int(x) for x in out.stdout.split())
    shutil.rmtree(path, ignore_errors=True)
    return {"bytes_on_disk": total, "sst_bytes": sst, "bytes_per_person": round(total / len(items), 1),
            "rss_growth_after_scan_bytes": after_scan - before, "rss_growth_after_gets_bytes": after_gets - before,
            "rss_growth_after_gets_per_person": round((after_gets - before) / max(1, n), 1)}


# --------------------------------------------------------------------------- workers on a local Kafka


def worker_settings(bootstrap: str, partitions: int, raw_topic: str | None, tag: str, data_dir: Path, *,
                    metrics: Path, app_tag: str | None = None, **extra: Any) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, partitions=partitions, app_id=f"mb-{app_tag or tag}",
                    data_dir=data_dir, http_port=pl.free_port(), admin_port=pl.free_port(),
                    topics=pl.topics_for(f"mb-{app_tag or tag}", raw_topic),
                    metrics=metrics, **extra)


def preload(bootstrap: str, topic: str, partitions: int, messages: list[dict]) -> dict[str, float]:
    """Send the messages to a new topic through the project's Producer (as bench/pipeline.py does)."""
    from flywheel.producer import Producer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    started = time.monotonic()
    with Producer(bootstrap, topic=topic, source="bench",
                  linger_ms=50, batch_size=512 * 1024, max_in_flight_requests_per_connection=5) as producer:
        for message in messages:
            producer.send(message)
    seconds = time.monotonic() - started
    held = pl.topic_size(bootstrap, topic)
    if held != len(messages):
        raise SystemExit(f"{topic} holds {held} records, expected {len(messages)}")
    return {"events": len(messages), "seconds": round(seconds, 2), "events_per_s": round(len(messages) / seconds)}


class Worker:
    """One `flywheel worker` child (this venv's python: its command line names this worktree)."""

    def __init__(self, settings: Settings, extra_env: dict[str, str] | None = None):
        self.settings = settings
        self.extra_env = extra_env or {}
        self.log_path = settings.data_dir / "worker.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.spawned = time.monotonic()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.cli", "worker"], env=pl.worker_env(self.settings, self.extra_env),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SystemExit(f"worker {self.settings.data_dir} exited with {self.proc.returncode}:\n{self.tail()}")

    def ready(self) -> bool:
        self.check()
        return "Worker ready" in self.log_path.read_text(errors="replace")

    def wait_ready(self, deadline: float) -> float:
        while not self.ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"worker {self.settings.data_dir} not ready in time:\n{self.tail()}")
            time.sleep(0.05)
        return time.monotonic()

    def sql(self, text: str, timeout: float = 60) -> list[list]:
        return query.run(self.settings, text, timeout=timeout)[1]

    def scalar(self, text: str) -> Any:
        return self.sql(text)[0][0]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_for(predicate, *, deadline: float, what: str, interval: float = 0.25) -> Any:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (query.QueryError, OSError) as exc:  # /sql not advertised yet
            last = exc
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what} (last error: {last})")


# --------------------------------------------------------------------------- pipeline: metrics on vs off


def run_pipeline(broker: devkafka.Broker, broker_pid: int, raw_topic: str, n: int, files: dict[str, Path],
                 tmp: Path, args, deadline: float) -> dict[str, Any]:
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(args.pipeline_runs):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            tag = f"{args.tag}p{r}{mode}"
            settings = worker_settings(broker.bootstrap, args.partitions, raw_topic, tag, tmp / tag,
                                       metrics=files[mode])
            la = loadavg()
            p = pl.pipeline(settings, n, deadline=deadline, poll=0.5, broker_pid=broker_pid)
            p.pop("series", None)
            p["loadavg_start"] = la
            p["late_events"] = stopped_store_scalar(settings, "SELECT countIf(late = 1) FROM flywheel.events FINAL")
            runs[mode].append(p)
            log(f"pipeline {mode:>3} run {r + 1}: {p['events_per_s']:,} ev/s (steady {p['steady_events_per_s']}), "
                f"{p['worker_cpu_ms_per_event']} ms worker CPU/event, worker {p['worker_cores']} cores, "
                f"broker {p['broker_cores']}, machine busy {p['machine_busy']:.0%}, load {la[0]}"
                + ("" if p["complete"] else "  INCOMPLETE"))
            if not p["complete"]:
                return {"runs": runs, "incomplete": True}
    out: dict[str, Any] = {"events": n, "runs": runs}
    for mode in runs:
        out[mode] = {k: spread([x[k] for x in runs[mode]])
                     for k in ("events_per_s", "steady_events_per_s", "worker_cpu_ms_per_event")}
    out["ratio_on_off_events_per_s"] = round(out["on"]["events_per_s"]["median"]
                                             / out["off"]["events_per_s"]["median"], 3)
    out["ratio_on_off_cpu"] = round(out["on"]["worker_cpu_ms_per_event"]["median"]
                                    / out["off"]["worker_cpu_ms_per_event"]["median"], 3)
    return out


def stopped_store_scalar(settings: Settings, sql: str) -> Any:
    """A query on the embedded ClickHouse of a stopped worker, in a child process (chdb: one data dir per
    process)."""
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "sql", "--format", "tsv", sql], cwd=REPO,
                         env=pl.worker_env(settings, {}), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return f"unavailable: {out.stderr.strip()[-300:]}"
    return int(out.stdout.split()[-1])


# --------------------------------------------------------------------------- latency to funnel_daily


def journey(now: datetime) -> tuple[list[dict], str]:
    """Product Viewed → Product Added → Checkout Started → Order Completed of a fresh person, ending now."""
    anon = f"lat-{uuid.uuid4()}"
    steps = [("Product Viewed", {"product_id": "p-1", "category": "hats", "price": 10.0}),
             ("Product Added", {"product_id": "p-1", "category": "hats", "price": 10.0, "quantity": 1}),
             ("Checkout Started", {"items": 1}),
             ("Order Completed", {"order_id": f"o-{anon}", "revenue": 10.0, "currency": "EUR"})]
    first = now - timedelta(seconds=3)
    msgs = [{"type": "track", "anonymousId": anon, "event": name, "properties": props,
             "timestamp": _iso(first + timedelta(seconds=i)), "messageId": str(uuid.uuid4())}
            for i, (name, props) in enumerate(steps)]
    return msgs, first.date().isoformat()


def run_latency(broker: devkafka.Broker, tmp: Path, flush: float, args, deadline: float) -> dict[str, Any]:
    from flywheel.producer import Producer

    tag = f"{args.tag}lat{str(flush).replace('.', '_')}"
    settings = worker_settings(broker.bootstrap, args.partitions, None, tag, tmp / tag, metrics=METRICS_ON,
                               sink_flush_seconds=flush)
    worker = Worker(settings).start()
    try:
        worker.wait_ready(deadline)
        rng = random.Random(args.seed)

        def step4(day: str) -> int:
            rows = worker.sql("SELECT persons FROM flywheel.funnel_daily WHERE funnel = 'checkout' AND "
                              f"day = toDate('{day}') AND step = 4")
            return int(rows[0][0]) if rows else 0

        samples: list[dict[str, float]] = []
        with Producer(broker.bootstrap, topic=settings.topics.raw, source="bench", linger_ms=0) as producer:
            for rep in range(args.latency_reps + 1):  # the first one warms the worker up (not counted)
                msgs, day = journey(datetime.now(UTC))
                before = wait_for(lambda day=day: (step4(day),), deadline=deadline, what="/sql")[0]
                t0 = time.monotonic()
                for m in msgs:
                    producer.send(m)
                producer.flush()
                acked = time.monotonic()
                polls = 0
                while True:
                    polls += 1
                    if step4(day) > before:
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"latency: step 4 of {day} never grew:\n{worker.tail()}")
                    time.sleep(args.latency_poll)
                seen = time.monotonic()
                if rep:
                    samples.append({"from_ack_s": round(seen - acked, 3), "from_send_s": round(seen - t0, 3),
                                    "polls": polls})
                    log(f"latency (flush {flush} s) {rep}/{args.latency_reps}: {seen - acked:.2f} s "
                        f"after Kafka acked the journey")
                time.sleep(rng.uniform(0.2, 1.5))  # no phase lock with the flush timers
    finally:
        worker.stop()
    lat = [s["from_ack_s"] for s in samples]
    return {"sink_flush_seconds": flush, "reps": len(samples), "poll_s": args.latency_poll,
            "p50_s": round(statistics.median(lat), 3), "max_s": max(lat), "min_s": min(lat),
            "samples": samples, "loadavg_end": loadavg()}


# --------------------------------------------------------------------------- report


def _r(d: dict | None, key: str = "median") -> str:
    return "-" if not d else f"{d[key]:,}"


def _range(d: dict | None) -> str:
    return "-" if not d else f"{d['median']:,} (range {d['min']:,}–{d['max']:,})"


def render(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    off_file = cfg.get("metrics_off")
    if off_file in (None, "(none)"):
        off_file = "an empty metrics file (active users only)"
    lines = [
        f"Flywheel metrics bench {doc['started']} ({doc.get('commit', '?')}): {os.cpu_count()} CPUs, load average "
        f"at start {doc['loadavg_start']}, at end {doc.get('loadavg_end')}",
        f"metrics on = {cfg['metrics_on']}, off = {off_file}; "
        f"{cfg['partitions']} partitions",
    ]
    stream = cfg["stream"]
    if stream:
        lines.append(f"in-process stream: {cfg['persons']:,} persons over {cfg['days']} days (seed {cfg['seed']}) = "
                     f"{stream['events']:,} events, {stream['merge_markers']:,} links (merge markers)")
    for batching, st in (doc.get("stage") or {}).items():
        lines += [
            "",
            f"1. aggregate stage in-process (AggregateStage.process, windows of {cfg['batch']} records, batching "
            f"{batching}, dict table, no I/O), "
            f"{len(st['runs']['on'])} pass(es) each:",
            *[f"   metrics {m:<3}: {_range(st[m]['events_per_s'])} ev/s, "
              f"{_range(st[m]['cpu_us_per_event'])} us CPU/event" for m in ("on", "off")],
            f"   on/off: {st['ratio_on_off_events_per_s']:.2f}x the rate (wall), {st['ratio_on_off_cpu']:.2f}x the CPU "
            f"per event",
        ]
        r = st["runs"]["on"][-1]
        busy = ", ".join(f"{m} {x['machine_busy']:.0%}" for m in ("on", "off") for x in st["runs"][m])
        lines.append(f"   per pass: {r['records']:,} records ({r['handoffs']:,} hand-offs), {r['batches']} batches, "
                     f"{r['touches_per_event']} person touches per event (live 1-s batches: ~1), {r['late_events']} "
                     "late events; published with "
                     f"metrics on: {r['published']}; machine busy: {busy}")
        for m in ("on", "off"):
            lines.append(f"   us CPU/event by tenth of the stream, {m:<3}: "
                         + " | ".join("/".join(str(x["cpu_us_per_event_by_tenth"][t]) for x in st["runs"][m])
                                      for t in range(len(st["runs"][m][0]["cpu_us_per_event_by_tenth"]))))
        wi = st.get("what_if_cached_day_bounds")
        if wi:
            lines.append(f"   what-if, Metrics.reach_days/horizon_days/lateness_days computed once (bench-only patch): "
                         f"on {wi['on']['cpu_us_per_event']} us CPU/event ({wi['on']['events_per_s']:,} ev/s), "
                         f"off {wi['off']['cpu_us_per_event']} us ({wi['off']['events_per_s']:,} ev/s)")
        prof = st.get("profile")
        if prof:
            lines += [f"   cProfile of one 'on' pass over {prof['records']:,} records "
                      f"({prof['profiled_seconds']} s profiled; {prof['file']}):",
                      "     cumulative (flywheel functions):"]
            lines += [f"       {share:6.1%}  {name}  [{calls:,} calls]"
                      for name, calls, _, share in prof["top_cumulative_flywheel"][:12]]
            lines += ["     self time:"]
            lines += [f"       {share:6.1%}  {name}  [{calls:,} calls]"
                      for name, calls, _, share in prof["top_self"][:12]]
    s = doc.get("state")
    if s:
        v = s["value_bytes"]
        proj = s["projection_per_million_persons"]
        lines += [
            "",
            f"2. person state after the stream ({s['persons']:,} stored persons, metrics on):",
            f"   stored value (orjson of PersonState.to_json): mean {v['mean']} B, p50 {v['p50']} B, p99 {v['p99']} B, "
            f"max {v['max']} B; key {s['key_bytes_mean']} B",
            f"   share of the bytes by field: {s['field_share_of_bytes']}",
            f"   kept per person: applied-event hashes mean {s['applied_events_kept']['mean']} (p99 "
            f"{s['applied_events_kept']['p99']}), funnel events mean {s['funnel_events_kept']['mean']}, "
            f"active days mean {s['active_days_kept']['mean']}",
            f"   Python memory per person: {s['python_bytes_per_person']}",
            f"   RocksDB (Faust options, flushed + compacted): {s['rocksdb']['bytes_per_person']} B/person on disk; a "
            f"fresh process grows by {s['rocksdb']['rss_growth_after_scan_bytes'] / 1e6:.1f} MB scanning every value, "
            f"{s['rocksdb']['rss_growth_after_gets_bytes'] / 1e6:.1f} MB after also reading each by key "
            f"({s['rocksdb']['rss_growth_after_gets_per_person']} B/person)",
            f"   partials restored at assignment: from the checkpoints "
            f"{s['restore_partials_checkpoint']['cpu_seconds']} s CPU ({s['restore_partials_checkpoint']['cells']:,} "
            f"cells); counted from every state (a torn checkpoint) {s['restore_partials_count']['cpu_seconds']} s CPU "
            f"({s['restore_partials_count']['us_per_person']} us/person)",
            f"   per million persons: stored key+value {proj['stored_key_plus_value_MB']} MB, RocksDB on disk "
            f"{proj['rocksdb_on_disk_MB']} MB, memory:// store {proj['memory_store_MB']} MB "
            f"({proj['memory_store_orjson_as_returned_MB']} MB holding orjson.dumps' own buffers), "
            f"all states as Python objects {proj['all_states_as_python_objects_MB']} MB, partials counted from "
            f"the states {proj['count_partials_cpu_s']} s CPU",
        ]
    p = doc.get("pipeline")
    if p and "on" in p:
        lines += [
            "",
            f"3. pipeline, one worker, {p['events']:,} events in events.raw → rows in flywheel.events "
            f"({len(p['runs']['on'])} run(s) each):",
            f"   metrics on : {_range(p['on']['events_per_s'])} ev/s (steady {_r(p['on']['steady_events_per_s'])}), "
            f"{_range(p['on']['worker_cpu_ms_per_event'])} ms worker CPU/event",
            f"   metrics off: {_range(p['off']['events_per_s'])} ev/s (steady {_r(p['off']['steady_events_per_s'])}), "
            f"{_range(p['off']['worker_cpu_ms_per_event'])} ms worker CPU/event",
            f"   on/off: {p['ratio_on_off_events_per_s']:.2f}x the rate, {p['ratio_on_off_cpu']:.2f}x the worker "
            "CPU per event",
        ]
        for mode in ("on", "off"):
            for x in p["runs"][mode]:
                lines.append(f"     {mode:>3}: {x['seconds']} s, worker {x['worker_cores']} cores, broker "
                             f"{x['broker_cores']}, machine busy {x['machine_busy']:.0%}, "
                             f"load {x['loadavg_start'][0]}; {x.get('late_events')} events late")
    elif p:
        lines += ["", "3. pipeline: INCOMPLETE (budget)"]
    lat = doc.get("latency")
    if lat:
        lines += ["", "4. latency: journey acked by Kafka → step 4 of its day grows in flywheel.funnel_daily "
                      "(idle worker, metrics on):"]
        for x in lat:
            lines.append(f"   FLYWHEEL_SINK_FLUSH_SECONDS={x['sink_flush_seconds']}: p50 {x['p50_s']} s, "
                         f"max {x['max_s']} s, min {x['min_s']} s ({x['reps']} journeys, polled every {x['poll_s']} s)")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--persons", type=int, default=5000, help="persons of the in-process stream (stage, state)")
    parser.add_argument("--days", type=int, default=28, help="days the streams span (ending now)")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of events.raw / events.identified")
    parser.add_argument("--batch", type=int, default=1000, help="records per AggregateStage.process call (stage)")
    parser.add_argument("--batching", default="distinct,fixed",
                        help="stage, comma-separated: distinct = split each window of --batch records into batches "
                             "of distinct persons, as a live worker's 1-second batches are; fixed = each window is "
                             "one batch (a backfill: a person's session often in one batch)")
    parser.add_argument("--stage-repeats", type=int, default=1, help="on+off passes of the stage")
    parser.add_argument("--profile-records", type=int, default=20000, help="records of the profiled pass (0: none)")
    parser.add_argument("--what-if-cache", action="store_true",
                        help="stage: one more on+off pass with Metrics' day bounds computed once (bench-only patch)")
    parser.add_argument("--pipeline-events", type=int, default=30000, help="events in events.raw (pipeline)")
    parser.add_argument("--pipeline-runs", type=int, default=2, help="on+off worker runs")
    parser.add_argument("--latency-reps", type=int, default=10, help="journeys per flush setting")
    parser.add_argument("--latency-flush", default="1.0,0.1", help="FLYWHEEL_SINK_FLUSH_SECONDS values to measure")
    parser.add_argument("--latency-poll", type=float, default=0.1, help="seconds between funnel_daily polls")
    parser.add_argument("--budget", type=float, default=1500, help="seconds before Kafka parts give up")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--metrics-on", type=Path, default=METRICS_ON, help="the metrics file of the 'on' runs")
    parser.add_argument("--metrics-off", type=Path, default=None,
                        help="the metrics file of the 'off' runs (default: none at all); e.g. the same file "
                             "without the feature being measured")
    parser.add_argument("--exposures", type=float, default=0.0,
                        help="pipeline: this share of the sessions opens with an `Experiment Viewed` of each "
                             "experiment of the 'on' metrics file (bench/experiments.py)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(args.batching.split(",")) - {"distinct", "fixed"}:
        parser.error("--batching: distinct, fixed or both (comma-separated)")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if "state" in parts and "stage" not in parts:
        parser.error("the state part measures the person table the stage part leaves: add stage")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops Kafka and the workers
    started = datetime.now(UTC)
    budget_end = time.monotonic() + args.budget
    args.stamp = started.strftime("%Y%m%d-%H%M%S")
    args.tag = uuid.uuid4().hex[:6]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-metrics-bench-"))
    on = load_metrics(args.metrics_on)
    off = load_metrics(args.metrics_off) if args.metrics_off else parse_metrics({})
    files = {"on": args.metrics_on, "off": args.metrics_off or tmp / "metrics-off.yaml"}
    if not args.metrics_off:
        files["off"].write_text(yaml.safe_dump({}))
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "commit": git_commit(), "loadavg_start": loadavg(),
        "argv": sys.argv[1:],
        "config": {"persons": args.persons, "days": args.days, "seed": args.seed, "partitions": args.partitions,
                   "batch": args.batch, "batching": args.batching, "metrics_on": str(args.metrics_on),
                   "metrics_off": str(args.metrics_off or "(none)"),
                   "parts": parts,
                   "sink_batch_size": Settings().sink_batch_size, "stream": {}},
    }
    broker = None
    try:
        if "stage" in parts:
            log(f"generating {args.persons:,} persons over {args.days} days and their identified records")
            t0 = time.monotonic()
            records, counts = identified(population(args.persons, days=args.days, seed=args.seed), args.partitions)
            doc["config"]["stream"] = {**counts, "prepare_seconds": round(time.monotonic() - t0, 1),
                                       "events_per_person": round(counts["events"] / args.persons, 2)}
            log(f"{counts['events']:,} events, {counts['merge_markers']:,} merge markers "
                f"({time.monotonic() - t0:.0f} s to prepare)")
            doc["stage"] = {}
            for i, batching in enumerate(args.batching.split(",")):
                doc["stage"][batching], last_on = run_stage(records, on, off, args, batching, profile=i == 0)
            del records
            if "state" in parts:
                log("measuring the person state")
                doc["state"] = measure_state(last_on, on, args, tmp)
            del last_on
            gc.collect()
        kafka_parts = [p for p in parts if p in ("pipeline", "latency")]
        if kafka_parts:
            broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
            log(f"starting Kafka at {broker.bootstrap} in {tmp}")
            broker_pid = devkafka.start(broker)
            doc["config"]["kafka"] = devkafka.kafka_version()
            raw_topic = f"mb-{args.tag}.events.raw"
            messages: list[dict] = []
            if "pipeline" in kafka_parts:
                persons = max(1, round(args.pipeline_events / 16))
                messages = with_exposures(list(population(persons, days=args.days, seed=args.seed + 1)), on,
                                          args.exposures, args.seed)[:args.pipeline_events]
                while len(messages) < args.pipeline_events:  # the estimate of events per person was short
                    persons = round(persons * 1.2) + 1
                    messages = with_exposures(list(population(persons, days=args.days, seed=args.seed + 1)), on,
                                              args.exposures, args.seed)[:args.pipeline_events]
                log(f"pre-loading {len(messages):,} events ({persons:,} persons) into {raw_topic}")
                doc["preload"] = preload(broker.bootstrap, raw_topic, args.partitions, messages)
                doc["preload"]["persons"] = persons
                n = len(messages)
            if "pipeline" in kafka_parts:
                doc["pipeline"] = run_pipeline(broker, broker_pid, raw_topic, n, files, tmp, args, budget_end)
            if "latency" in kafka_parts:
                doc["latency"] = [run_latency(broker, tmp, float(f), args, budget_end)
                                  for f in args.latency_flush.split(",") if f.strip()]
    finally:
        if broker is not None:
            log("stopping Kafka")
            devkafka.stop(broker)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["loadavg_end"] = loadavg()
    doc["seconds_total"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    text = render(doc)
    (RESULTS / f"metrics-{args.stamp}.json").write_text(json.dumps(doc, indent=1, default=str))
    (RESULTS / f"metrics-{args.stamp}.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nresults: {RESULTS}/metrics-{args.stamp}.json and .txt ({doc['seconds_total']} s in all)")


if __name__ == "__main__":
    main()
