"""UI benchmark (issue 17): how soon a chart moves after the event that changes it, and what 1,000 open
pages cost.

    make bench-ui                              # = .venv/bin/python bench/ui.py (~5 min)
    .venv/bin/python bench/ui.py --reps 20 --clients 1000 --fanout-seconds 60

A local Kafka, one `flywheel worker` (embedded ClickHouse; it serves /ui on its admin listener) and one
`flywheel ui` on its own (ClickHouse through the worker's /sql), both reading the same topics.

delay    --reps times: a 4-step checkout journey of a fresh person is produced to events.raw; three waiters
         run at once from Kafka's ack: the Server-Sent Events stream of /ui/funnels?days=1 on the worker's
         listener, the same on `flywheel ui`, and flywheel.funnel_daily polled every --poll seconds (what an
         analyst's SQL sees). Each stops when step 4 of checkout today grows. Side by side, with ratios.
feed     In-process, no Kafka: the UI consumer's work per record (`Feed.apply`) on fetched batches shaped
         like Kafka's (up to 500 records per partition): events.identified records of the bench stream
         (counted; the newest decoded for the live-events page) and metrics.funnels records (merged by
         version) — what a UI costs a worker per event while a page is open (nothing while none is).
burst    --burst-events events of the bench stream produced at once while `flywheel ui` has its overview
         open: the UI process's CPU until it has counted them all, per event — the whole cost of a UI with
         an open page (fetching, counting, the metric records the worker publishes meanwhile, pushes).
fanout   `flywheel ui` with no page open (its consumer running), then with --clients open pages (SSE
         streams of /ui/funnels), for --fanout-seconds each while a journey is produced every --interval
         seconds: CPU seconds per second and RSS of the `flywheel ui` process, and per journey the delay to
         the first and to the last of the open pages (every page must get every change).

Results: bench/results/ui-<time>.json and .txt, with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics as mb  # noqa: E402  (bench/metrics.py: the journey, the worker)
import pipeline as pl  # noqa: E402
from flywheel import devkafka  # noqa: E402
from flywheel.web.users import Users  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "bench password 1"
log = pl.log


class UIProcess:
    """`flywheel ui` as a child process, on its own port."""

    def __init__(self, settings, port: int):
        self.settings, self.port = settings, port
        self.log_path = settings.data_dir / "ui.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> UIProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "ui", "--port", str(self.port)],
                                         env=pl.worker_env(self.settings, {}), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


async def login(session, base: str) -> None:
    async with session.get(f"{base}/ui/login") as r:
        token = re.search(r'name="login_token" value="([^"]+)"', await r.text()).group(1)
    async with session.post(f"{base}/ui/login", data={"login_token": token, "name": "bench", "password": PASSWORD},
                            allow_redirects=False) as r:
        if r.status != 303:
            raise SystemExit(f"login to {base} failed: {r.status} {await r.text()}")


def step4(data: dict) -> int | None:
    """Persons at step 4 of checkout in a funnels page's data (None: no data yet)."""
    for f in data.get("funnels", []):
        if f["name"] == "checkout":
            return f["steps"][3]["persons"]
    return None


class Page:
    """One open /ui/funnels?days=1: an SSE stream; `values` holds (monotonic time, step 4) per message."""

    def __init__(self):
        self.values: list[tuple[float, int]] = []
        self.changed = asyncio.Event()

    async def run(self, session, base: str) -> None:
        async with session.get(f"{base}/ui/stream/funnels?days=1", timeout=None) as r:
            if r.status != 200:
                raise SystemExit(f"stream of {base}: {r.status}")
            async for line in r.content:
                if line.startswith(b"data: "):
                    value = step4(orjson.loads(line[6:]))
                    if value is not None:
                        self.values.append((time.monotonic(), value))
                        self.changed.set()

    async def first_above(self, before: int, deadline: float) -> float:
        while True:
            for t, v in self.values:
                if v > before:
                    return t
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))

    def latest(self) -> int:
        return self.values[-1][1] if self.values else -1


def journey_sender(bootstrap: str, topic: str):
    from flywheel.producer import Producer

    producer = Producer(bootstrap, topic=topic, source="bench", linger_ms=0)

    def send() -> float:
        msgs, _ = mb.journey(datetime.now(UTC))
        for m in msgs:
            producer.send(m)
        producer.flush()
        return time.monotonic()

    return producer, send


async def run_delay(args, settings, worker, ui_port: int) -> dict[str, Any]:
    import aiohttp

    bases = {"worker /ui": f"http://127.0.0.1:{settings.admin_port}", "flywheel ui": f"http://127.0.0.1:{ui_port}"}
    sessions, pages, tasks = {}, {}, []
    for name, base in bases.items():
        sessions[name] = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies of an IP
        await login(sessions[name], base)
        pages[name] = Page()
        tasks.append(asyncio.create_task(pages[name].run(sessions[name], base)))
    producer, send = journey_sender(settings.kafka_bootstrap, settings.topics.raw)

    def sql_step4() -> int:
        rows = worker.sql("SELECT persons FROM flywheel.funnel_daily WHERE funnel = 'checkout' AND day = today() "
                          "AND step = 4")
        return int(rows[0][0]) if rows else 0

    samples: list[dict[str, float]] = []
    try:
        await asyncio.sleep(3)  # the pages' first data (snapshot)
        for rep in range(args.reps + 1):  # the first warms up (not counted)
            before = {name: page.latest() for name, page in pages.items()}
            before_sql = await asyncio.to_thread(sql_step4)
            acked = await asyncio.to_thread(send)
            deadline = acked + 120

            def poll(before_sql=before_sql, deadline=deadline) -> float:
                while time.monotonic() < deadline:
                    if sql_step4() > before_sql:
                        return time.monotonic()
                    time.sleep(args.poll)
                raise SystemExit("funnel_daily never grew")

            seen = await asyncio.gather(*(pages[n].first_above(before[n], deadline) for n in pages),
                                        asyncio.to_thread(poll))
            if rep:
                sample = {n: round(t - acked, 3) for n, t in zip([*pages, "funnel_daily (SQL)"], seen, strict=True)}
                samples.append(sample)
                log(f"delay {rep}/{args.reps}: " + ", ".join(f"{n} {s:.2f} s" for n, s in sample.items()))
            await asyncio.sleep(0.3 + (rep % 5) * 0.25)  # no phase lock with the flush timers
    finally:
        producer.close()
        for t in tasks:
            t.cancel()
        for s in sessions.values():
            await s.close()
    names = list(samples[0])
    out = {n: {"p50_s": round(statistics.median(s[n] for s in samples), 3),
               "max_s": max(s[n] for s in samples), "min_s": min(s[n] for s in samples)} for n in names}
    return {"reps": len(samples), "poll_s": args.poll, "by_path": out, "samples": samples, "loadavg": mb.loadavg()}


class Fetched:
    """A record as aiokafka's getmany returns it (what Feed.apply reads)."""

    __slots__ = ("offset", "value")

    def __init__(self, offset: int, value: bytes):
        self.offset, self.value = offset, value


def run_feed(args) -> dict[str, Any]:
    import random
    from collections import defaultdict

    from aiokafka import TopicPartition
    from flywheel.config import Settings
    from flywheel.web.live import Feed, Hub
    from flywheel.web.ui import PAGES

    settings = Settings()
    feed = Feed(settings, Hub([p.name for p in PAGES]), query=None)
    records, counts = mb.identified(mb.population(args.feed_persons, days=14, seed=7), args.partitions)
    offsets: dict[int, int] = defaultdict(int)

    def batches(items, topic: str, per_fetch: int):
        for i in range(0, len(items), per_fetch):
            fetch: dict[Any, list] = defaultdict(list)
            for partition, value in items[i:i + per_fetch]:
                fetch[TopicPartition(topic, partition)].append(Fetched(offsets[partition], value))
                offsets[partition] += 1
            yield dict(fetch)

    def timed(fetches: list) -> float:
        started = time.process_time()
        for fetch in fetches:
            feed.apply(fetch)
        return time.process_time() - started

    events = [(p, v) for p, v, _ in records]
    fetches = list(batches(events, settings.topics.identified, 500 * args.partitions))
    event_s = min(timed(fetches) for _ in range(3))
    rng = random.Random(7)
    cells = [(rng.choice(["checkout", "shoes_purchase"]), f"2026-11-{rng.randint(1, 30):02d}", rng.randint(1, 3))
             for _ in range(2000)]
    metric = [(p, orjson.dumps({"funnel": f, "definitionVersion": "v1", "day": d, "step": st, "partition": p,
                                "persons": rng.randint(0, 999), "version": v}))
              for v in range(1, 1 + max(1, len(events) // (len(cells) * args.partitions)))
              for f, d, st in cells for p in range(args.partitions)]
    metric_fetches = list(batches(metric, settings.topics.funnels, 500 * args.partitions))
    metric_s = timed(metric_fetches)
    return {"events": len(events), "merge_markers": counts.get("merge_markers", 0),
            "us_per_identified_record": round(1e6 * event_s / len(events), 2),
            "metric_records": len(metric), "us_per_metric_record": round(1e6 * metric_s / len(metric), 2)}


async def run_fanout(args, settings, ui: UIProcess, clients: int) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{ui.port}"
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))
    await login(session, base)
    pages = [Page() for _ in range(clients)]
    tasks = [asyncio.create_task(p.run(session, base)) for p in pages]
    producer, send = journey_sender(settings.kafka_bootstrap, settings.topics.raw)
    try:
        if clients:
            deadline = time.monotonic() + 120
            while sum(1 for p in pages if p.values) < clients:  # every page has its first data
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {sum(1 for p in pages if p.values)} of {clients} pages opened")
                await asyncio.sleep(0.2)
        cpu0, t0 = pl.proc_cpu_seconds(ui.proc.pid), time.monotonic()
        journeys = []
        while time.monotonic() - t0 < args.fanout_seconds:
            before = max((p.latest() for p in pages), default=0)
            acked = await asyncio.to_thread(send)
            journeys.append((acked, before))
            await asyncio.sleep(args.interval)
        cpu1, t1 = pl.proc_cpu_seconds(ui.proc.pid), time.monotonic()
        rss = pl.rss_bytes(ui.proc.pid)
        first, last, missed = [], [], 0
        if clients:
            await asyncio.sleep(5)  # the last journey's updates
            for acked, before in journeys:
                times = [next((t for t, v in p.values if v > before and t >= acked), None) for p in pages]
                got = [t for t in times if t is not None]
                missed += len(times) - len(got)
                if got:
                    first.append(min(got) - acked)
                    last.append(max(got) - acked)
        messages = sum(len(p.values) for p in pages)
    finally:
        producer.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
    out = {"clients": clients, "seconds": round(t1 - t0, 1), "journeys": len(journeys),
           "ui_cpu_s_per_s": round((cpu1 - cpu0) / (t1 - t0), 4), "ui_rss_mb": round(rss / 2**20, 1),
           "messages_received": messages, "loadavg": mb.loadavg()}
    if clients:
        out |= {"to_first_page_p50_s": round(statistics.median(first), 3),
                "to_last_page_p50_s": round(statistics.median(last), 3), "to_last_page_max_s": round(max(last), 3),
                "updates_missed": missed}
    return out


async def run_burst(args, settings, ui: UIProcess) -> dict[str, Any]:
    import aiohttp
    from flywheel.producer import Producer

    base = f"http://127.0.0.1:{ui.port}"
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    await login(session, base)
    seen: list[int] = []

    async def overview() -> None:
        async with session.get(f"{base}/ui/stream/overview", timeout=None) as r:
            async for line in r.content:
                if line.startswith(b"data: "):
                    seen.append(orjson.loads(line[6:])["validSeen"])

    task = asyncio.create_task(overview())
    messages = list(mb.population(args.burst_events // 8, days=3, seed=11))[: args.burst_events]
    try:
        await asyncio.sleep(3)
        before = seen[-1] if seen else 0
        cpu0, t0 = pl.proc_cpu_seconds(ui.proc.pid), time.monotonic()

        def produce() -> None:
            with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="bench", linger_ms=20) as p:
                for m in messages:
                    p.send(m)

        await asyncio.to_thread(produce)
        deadline = time.monotonic() + 600
        while not seen or seen[-1] < before + len(messages):
            if time.monotonic() > deadline:
                raise SystemExit(f"the UI counted {seen[-1] - before if seen else 0} of {len(messages)} events")
            await asyncio.sleep(0.2)
        cpu1, t1 = pl.proc_cpu_seconds(ui.proc.pid), time.monotonic()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await session.close()
    return {"events": len(messages), "seconds": round(t1 - t0, 1), "ui_cpu_s": round(cpu1 - cpu0, 2),
            "ui_us_per_event": round(1e6 * (cpu1 - cpu0) / len(messages), 1), "loadavg": mb.loadavg()}


def render(doc: dict[str, Any]) -> str:
    lines = [f"UI benchmark {doc['started']} (commit {doc['commit']}), load average at start {doc['loadavg']}", ""]
    d = doc.get("delay")
    if d:
        sql = d["by_path"]["funnel_daily (SQL)"]["p50_s"]
        lines.append(f"1. delay: journey acked by Kafka → step 4 of checkout grows ({d['reps']} journeys; SQL polled "
                     f"every {d['poll_s']} s)")
        lines.append(f"   {'path':<22} {'p50 s':>7} {'max s':>7}  vs SQL")
        for name, v in d["by_path"].items():
            ratio = f"×{v['p50_s'] / sql:.2f}" if sql else ""
            lines.append(f"   {name:<22} {v['p50_s']:>7} {v['max_s']:>7}  {ratio}")
    fd = doc.get("feed")
    if fd:
        lines += ["", f"2. the UI consumer's CPU per record (in-process, {fd['events']:,} events.identified records, "
                  f"{fd['metric_records']:,} metrics.funnels records):",
                  f"   events.identified: {fd['us_per_identified_record']} µs per record; metric record: "
                  f"{fd['us_per_metric_record']} µs (a worker publishes a cell per change per batch, ≪ 1 per event "
                  "at volume)"]
    b = doc.get("burst")
    if b:
        lines += ["", f"   with Kafka: `flywheel ui` (overview open) over a burst of {b['events']:,} events "
                  f"({b['seconds']} s through the worker): {b['ui_cpu_s']} s of CPU = {b['ui_us_per_event']} µs "
                  "per event, all included"]
    f = doc.get("fanout")
    if f:
        idle, full = f[0], f[-1]
        lines += ["", f"3. fan-out: `flywheel ui` while a journey is produced every {doc['config']['interval']} s",
                  f"   {'open pages':>10} {'CPU s/s':>8} {'RSS MB':>7} {'first p50':>10} {'last p50':>9} "
                  f"{'last max':>9} {'missed':>6}"]
        for run in f:
            lines.append(f"   {run['clients']:>10} {run['ui_cpu_s_per_s']:>8} {run['ui_rss_mb']:>7} "
                         f"{run.get('to_first_page_p50_s', '—'):>10} {run.get('to_last_page_p50_s', '—'):>9} "
                         f"{run.get('to_last_page_max_s', '—'):>9} {run.get('updates_missed', '—'):>6}")
        cpu_idle, cpu_full = idle["ui_cpu_s_per_s"], full["ui_cpu_s_per_s"]
        if cpu_idle:
            per_page = 1000 * (cpu_full - cpu_idle) / max(1, full["clients"])
            lines.append(f"   CPU with {full['clients']} pages open: ×{cpu_full / cpu_idle:.1f} that with none; "
                         f"{per_page:.3f} ms of CPU per second per open page")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="feed,delay,burst,fanout")
    parser.add_argument("--burst-events", type=int, default=30000)
    parser.add_argument("--feed-persons", type=int, default=3000, help="persons of the feed part's stream")
    parser.add_argument("--reps", type=int, default=15, help="journeys of the delay part")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between funnel_daily polls")
    parser.add_argument("--clients", type=int, default=1000, help="open pages of the fan-out part")
    parser.add_argument("--fanout-seconds", type=float, default=45)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between journeys (fan-out)")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    parts = args.parts.split(",")
    doc: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "commit": mb.git_commit(),
                           "loadavg": mb.loadavg(), "config": vars(args)}
    if "feed" in parts:
        log("feed: the UI consumer's work per record, in-process")
        doc["feed"] = run_feed(args)
        log(str(doc["feed"]))
    if not {"delay", "burst", "fanout"} & set(parts):
        pl.save_results("ui", doc, render(doc))
        return
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-ui-") as tmp_name:
        tmp = Path(tmp_name)
        broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
        log(f"starting Kafka at {broker.bootstrap}")
        devkafka.start(broker)
        settings = mb.worker_settings(broker.bootstrap, args.partitions, None, "ui", tmp / "w", metrics=mb.METRICS_ON,
                                      sink_flush_seconds=0.5)
        settings.data_dir.mkdir(parents=True)
        users = Users(settings.data_dir)
        users.add("bench", "viewer", PASSWORD)
        users.close()
        worker = mb.Worker(settings).start()
        ui = None
        try:
            worker.wait_ready(time.monotonic() + 180)
            ui = UIProcess(settings, pl.free_port()).start()
            mb.wait_for(lambda: "listening" in ui.log_path.read_text(errors="replace"),
                        deadline=time.monotonic() + 60, what="flywheel ui")
            if "delay" in parts:
                doc["delay"] = asyncio.run(run_delay(args, settings, worker, ui.port))
            if "burst" in parts:
                log(f"burst: {args.burst_events:,} events with the overview open")
                doc["burst"] = asyncio.run(run_burst(args, settings, ui))
                log(str(doc["burst"]))
            if "fanout" in parts:
                doc["fanout"] = []
                for n in (0, args.clients):
                    log(f"fan-out: {n} open pages for {args.fanout_seconds:.0f} s")
                    doc["fanout"].append(asyncio.run(run_fanout(args, settings, ui, n)))
                    log(str(doc["fanout"][-1]))
        finally:
            if ui is not None:
                ui.stop()
            worker.stop()
            devkafka.stop(broker)
    pl.save_results("ui", doc, render(doc))


if __name__ == "__main__":
    main()
