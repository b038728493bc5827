"""Alerts benchmark (issue 15): how well the rules detect, what 20 rules cost in the stream, and how soon a
webhook follows a period's close.

    make bench-alerts                        # = .venv/bin/python bench/alerts.py
    .venv/bin/python bench/alerts.py --parts detect --seeds 200

Parts (--parts, default all):

detect  Seeded synthetic hourly series (tests/alerts_gen.py: a daily curve, weekends at 40 %, Poisson noise)
        with injected spikes (×3), drops (×0.2) and sometimes a level shift (×0.5), judged by the rule code
        (metrics/alerts.py) over the weeks after a 4-week warm-up. Per rule: hour-level precision (breaching
        hours inside an incident / all breaching hours) and recall (incident hours breaching / incident
        hours), incident-level recall (incidents with a firing inside them), and firings outside incidents
        per week. The naive baseline (the last 12 hours) shows what seasonality buys.
stage   In-process CPU per event, --repeats passes each, alternating: the ingest stage and the aggregate
        stage (bench/metrics.py's stream) without alert rules and with RULES below (20 rules: 8 counted by
        ingest, 12 fed by the aggregate's cells and segment sizes); then the evaluator (stages/alerts.py) over
        the shares both passes sent, with progress markers of both stages every --marker-every events.
live    A local Kafka, one `flywheel worker` reading a clock file, and a local webhook receiver. A rule
        fires on an hour with a view and resolves on an hour without; each step waits a random fraction of a
        tick, writes the next hour's close (end + 1 s grace) to the clock file and times the webhook's arrival:
        period close → webhook call, p50/p99 (the worker's progress markers go every
        FLYWHEEL_ALERT_TICK_SECONDS, --live-tick: the close is seen at the next one).

Results: bench/results/alerts-<time>.json and .txt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import alerts_gen  # noqa: E402  (tests/alerts_gen.py: the seeded series)
import metrics as mb  # noqa: E402  (bench/metrics.py: the stream, the stage stubs and driver)
import pipeline as pl  # noqa: E402
from flywheel.config import Settings, Topics  # noqa: E402
from flywheel.metrics import alerts as rules  # noqa: E402
from flywheel.metrics.definitions import Metrics, parse_metrics  # noqa: E402
from flywheel.model.envelope import HEADER_RECEIVED_AT, HEADER_SOURCE, Limits, kafka_key  # noqa: E402
from flywheel.model.plan import load_plan  # noqa: E402
from flywheel.runtime.partitioner import partition_of  # noqa: E402
from flywheel.stages.alerts import AlertStage  # noqa: E402
from flywheel.stages.ingest import Ingest  # noqa: E402
from flywheel.stages.tables import MemoryTable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PARTS = ("detect", "stage", "live")
log = pl.log
HOUR = 3_600_000

SEGMENTS = {"segments": [{"name": "cart_abandoners", "all": [
    {"performed": "Product Added", "within": "1d"}, {"not_performed": "Order Completed", "within": "1d"}]}],
    "churn_risk": {"active_within": "28d", "silent_for": "14d"}}
SEASONAL = {"anomaly": {"baseline": "same_hour_of_week", "weeks": 4, "min_count": 20}}
RULES = [  # 20: 8 counted by the ingest stage, 12 from the aggregate's cells and segment sizes
    ("orders_drop", {"events": "Order Completed", "period": "hour"}, SEASONAL),
    ("traffic_drop", {"events": "any", "period": "hour"}, {"relative": {"below": -0.5}}),
    ("views_daily", {"events": "Product Viewed", "period": "day"}, {"threshold": {"below": 10}}),
    ("signups", {"events": "Signed Up", "period": "hour"}, {"anomaly": {"baseline": "previous_periods"}}),
    ("web_quiet", {"events": "any", "source": "web", "period": "hour"}, {"relative": {"below": -0.8}}),
    ("invalid_any", {"invalid_rate": True, "source": "any"}, {"threshold": {"above": 0.02}, "min_count": 100}),
    ("invalid_ios", {"invalid_rate": True, "source": "ios"}, {"threshold": {"above": 0.05}, "min_count": 50}),
    ("adds_weekly", {"events": "Product Added", "period": "week"}, {"relative": {"vs": "previous_period",
                                                                                  "below": -0.3}}),
    ("conv_2", {"funnel": "checkout", "step": 2, "rate": True}, {"threshold": {"below": 0.1}}),
    ("conv_3", {"funnel": "checkout", "step": 3, "rate": True}, {"threshold": {"below": 0.05}}),
    ("conv_4", {"funnel": "checkout", "step": 4, "rate": True}, {"threshold": {"below": 0.02}}),
    ("viewers", {"funnel": "checkout", "step": 1}, {"anomaly": {"baseline": "same_weekday"}}),
    ("shoe_buyers", {"funnel": "shoes_purchase", "step": 3}, {"threshold": {"below": 1}}),
    ("day1", {"retention": "new_users", "n": 1}, {"threshold": {"below": 0.1}}),
    ("week1", {"retention": "signup_weekly", "n": 1}, {"threshold": {"below": 0.05}}),
    ("dau", {"active": "dau"}, {"anomaly": {"baseline": "same_weekday", "weeks": 3}}),
    ("wau", {"active": "wau"}, {"relative": {"vs": "last_week", "below": -0.2}}),
    ("mau", {"active": "mau"}, {"threshold": {"below": 100}}),
    ("abandoners", {"segment": "cart_abandoners", "period": "hour"}, {"relative": {"above": 1.0}}),
    ("churn", {"segment": "churn_risk", "period": "day"}, {"threshold": {"above": 1000}}),
]


def metrics_with(alerts: bool) -> Metrics:
    spec = yaml.safe_load(mb.METRICS_ON.read_text()) | SEGMENTS
    if alerts:
        spec["alerts"] = [{"name": n, "series": s, "rule": r} for n, s, r in RULES]
    return parse_metrics(spec, source="bench/alerts.py")


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


# --------------------------------------------------------------------------- detect

DETECTORS = {
    "seasonal z 3.5, fire after 1": ({"anomaly": {"baseline": "same_hour_of_week", "weeks": 4, "min_count": 20}}, 1),
    "seasonal z 3.5, fire after 2": ({"anomaly": {"baseline": "same_hour_of_week", "weeks": 4, "min_count": 20}}, 2),
    "seasonal z 5, fire after 1": ({"anomaly": {"baseline": "same_hour_of_week", "weeks": 4, "sensitivity": 5,
                                                "min_count": 20}}, 1),
    "naive: last 12 hours, z 3.5": ({"anomaly": {"baseline": "previous_periods", "periods": 12, "min_count": 20}}, 1),
}


def run_detect(args) -> dict[str, Any]:
    out = {}
    for label, (rule, fire_after) in DETECTORS.items():
        alert = parse_metrics({"alerts": [{"name": "d", "series": {"events": "x", "period": "hour"}, "rule": rule,
                                           "fire_after": fire_after}]}).alerts[0]
        tp = fp = incident_hours = incidents = caught = false_firings = 0
        weeks_judged = 0
        for seed in range(args.seeds):
            incs = alerts_gen.random_incidents(seed, weeks=args.weeks)
            series, abnormal = alerts_gen.series(seed, weeks=args.weeks, incidents=incs)
            periods = sorted(series)[4 * 168:]
            run = rules.backtest(alert, series, periods)
            breached = {v.period for v, _ in run if v.breach}
            firing = [v.period for v, t in run if t == rules.FIRING]
            tp += len(breached & abnormal)
            fp += len(breached - abnormal)
            incident_hours += len(abnormal & set(periods))
            for inc in incs:
                span = {alerts_gen.START + (inc.start + h) * HOUR
                        for h in range(inc.hours if inc.kind != "shift" else args.weeks * 168 - inc.start)}
                incidents += 1
                caught += any(p in span for p in firing)
            false_firings += sum(1 for p in firing if p not in abnormal)
            weeks_judged += len(periods) / 168
        out[label] = {"precision_hours": round(tp / max(1, tp + fp), 4),
                      "recall_hours": round(tp / incident_hours, 4),
                      "recall_incidents": round(caught / incidents, 4), "incidents": incidents,
                      "false_firings_per_week": round(false_firings / weeks_judged, 4)}
        log(f"detect {label}: {out[label]}")
    return {"seeds": args.seeds, "weeks": args.weeks, "detectors": out}


# --------------------------------------------------------------------------- stage

class RecordingOutbox:
    """The stages' outbox in memory: keeps alerts.series records, counts the rest."""

    def __init__(self, topics: Topics, partitions: int, kept: list, counts: Counter):
        self.topics, self.n, self.kept, self.counts = topics, partitions, kept, counts

    def add(self, topic, key, value, *, partition=None, headers=None) -> None:
        self.counts[topic] += 1
        if topic == self.topics.alert_series:
            self.kept.append((partition if partition is not None else partition_of(key, self.n), value))

    def partitions(self, topic: str) -> list[int]:
        return list(range(self.n))

    async def send(self) -> dict:
        return {}


class Raw:
    __slots__ = ("key", "value", "headers", "partition", "offset", "timestamp", "topic")

    def __init__(self, key, value, headers, partition, offset):
        self.key, self.value, self.headers, self.partition, self.offset = key, value, headers, partition, offset
        self.timestamp, self.topic = time.time(), "events.raw"


def raw_records(messages: list[dict], partitions: int) -> list[Raw]:
    """events.raw records: sources web / ios / android, every 50th record invalid (a number for an event name)."""
    offsets: Counter = Counter()
    out = []
    for i, m in enumerate(messages):
        source = ("web", "ios", "android")[i % 3].encode()
        value = orjson.dumps({**m, "event": 42} if i % 50 == 49 and m.get("type") == "track" else m)
        key = kafka_key(m).encode() if kafka_key(m) else None
        p = partition_of(key, partitions) if key else i % partitions
        received = str(int(datetime.fromisoformat(m["timestamp"]).timestamp() * 1000) + 500).encode()
        out.append(Raw(key, value, [(HEADER_SOURCE, source), (HEADER_RECEIVED_AT, received)], p, offsets[p]))
        offsets[p] += 1
    return out


def ingest_pass(records: list[Raw], metrics: Metrics, partitions: int, batch: int) -> tuple[dict, list]:
    topics, kept, counts = Topics(), [], Counter()

    async def outbox():
        return RecordingOutbox(topics, partitions, kept, counts)

    stage = Ingest(plan=load_plan(REPO / "schemas" / "tracking_plan.yaml"), limits=Limits(max_future=timedelta(1)),
                   topics=topics, first_seen=MemoryTable("fs"), linked_users=MemoryTable("id"), outbox=outbox,
                   alerts=metrics.alerts)

    async def drive():
        for i in range(0, len(records), batch):
            await stage.handle(records[i:i + batch])
    cpu0 = time.process_time()
    asyncio.run(drive())
    cpu = time.process_time() - cpu0
    result = {"cpu_us_per_event": round(cpu / len(records) * 1e6, 1),
              "alert_series_records": counts[topics.alert_series]}
    return result, kept


def evaluator_pass(shares: list, metrics: Metrics, partitions: int, events: int, marker_every: int) -> dict:
    """The evaluator over the stages' shares (ingest's, then the aggregate's), with progress markers of both
    stages from every input partition interleaved: CPU per record it reads, and per event of the stream."""
    topics, kept, counts = Topics(), [], Counter()

    async def outbox():
        return RecordingOutbox(topics, partitions, kept, counts)

    stage = AlertStage(metrics=metrics, table=MemoryTable("alerts"), outbox=outbox, topics=topics,
                       rule_partition=lambda name: partition_of(name.encode(), partitions))
    newest = max(int(p) for _, v in shares for p in orjson.loads(v)["periods"] if int(p) != rules.GAUGE)
    step = max(1, len(shares) * marker_every // max(1, events))
    feed: list[mb.FakeMessage] = []
    markers = 0
    for i, (q, v) in enumerate(shares):
        feed.append(mb.FakeMessage(q, v))
        if i % step == step - 1:  # a marker round: every input partition reports to every evaluator partition
            through = newest - 3 * HOUR + int(i / len(shares) * 6 * HOUR)
            for stage_name in ("ingest", "aggregate"):
                for p in range(partitions):
                    marker = orjson.dumps(rules.progress_record(stage_name, p, partitions, through))
                    feed.extend(mb.FakeMessage(qq, marker) for qq in range(partitions))
                    markers += partitions

    async def drive():
        for i in range(0, len(feed), 500):
            await stage.process(feed[i:i + 500])
    cpu0 = time.process_time()
    asyncio.run(drive())
    cpu = time.process_time() - cpu0
    return {"records": len(feed), "markers": markers, "cpu_us_per_record": round(cpu / len(feed) * 1e6, 1),
            "cpu_us_per_event": round(cpu / events * 1e6, 2), "transitions": counts[topics.alerts]}


@contextlib.contextmanager
def aggregate_shares_kept(kept: list, partitions: int):
    """bench/metrics.py's FakeOutbox, keeping what goes to alerts.series (the evaluator's input)."""
    topic, add = Topics().alert_series, mb.FakeOutbox.add

    def keeping(self, t, key, value, *, partition=None):
        if t == topic:
            kept.append((partition if partition is not None else partition_of(key, partitions), value))
        return add(self, t, key, value, partition=partition)
    mb.FakeOutbox.add = keeping
    try:
        yield
    finally:
        mb.FakeOutbox.add = add


def run_stage(args) -> dict[str, Any]:
    off, on = metrics_with(False), metrics_with(True)
    messages = list(mb.population(args.persons, days=args.days, seed=args.seed))
    raws = raw_records(messages, args.partitions)
    identified, counts = mb.identified(messages, args.partitions)
    log(f"stage: {len(raws):,} raw records, {counts['events']:,} events of {args.persons:,} persons, "
        f"{len(on.alerts)} rules")
    runs: dict[str, dict[str, list]] = {"ingest": {"off": [], "on": []}, "aggregate": {"off": [], "on": []}}
    shares: list = []
    series_records = {}
    for r in range(args.repeats):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            metrics = on if mode == "on" else off
            result, kept = ingest_pass(raws, metrics, args.partitions, args.batch)
            runs["ingest"][mode].append(result["cpu_us_per_event"])
            if mode == "on":
                shares, series_records["ingest"] = kept, result["alert_series_records"]
            kept_aggregate: list = []
            with aggregate_shares_kept(kept_aggregate, args.partitions):
                agg, stage = mb.stage_pass(identified, metrics, partitions=args.partitions, batch=args.batch,
                                           batching="distinct")
            stage.stop()
            runs["aggregate"][mode].append(agg["cpu_us_per_event"])
            if mode == "on":
                series_records["aggregate"] = agg["alert_series"]
                shares += kept_aggregate
            log(f"stage {mode:>3} pass {r + 1}: ingest {result['cpu_us_per_event']} us/event, "
                f"aggregate {agg['cpu_us_per_event']} us/event")
    cpu = {stage: {m: spread(v) for m, v in modes.items()} for stage, modes in runs.items()}
    cost = {stage: round(c["on"]["median"] - c["off"]["median"], 1) for stage, c in cpu.items()}
    evaluator = evaluator_pass(shares, on, args.partitions, len(raws), args.marker_every)
    log(f"evaluator: {evaluator}")
    return {"raw_records": len(raws), "events": counts["events"], "rules": len(on.alerts), "cpu_us_per_event": cpu,
            "cost_us_per_event": cost, "alert_series_records": series_records, "evaluator": evaluator}


# --------------------------------------------------------------------------- live

def run_live(args, tmp: Path) -> dict[str, Any]:
    from flywheel import devkafka
    from flywheel.producer import Producer

    received: list[tuple[float, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((time.time(), orjson.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", pl.free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
    log(f"live: starting Kafka at {broker.bootstrap}")
    devkafka.start(broker)
    h0 = datetime(2026, 10, 1, tzinfo=UTC)
    clock = tmp / "clock"

    def at(t: datetime) -> None:
        clock.write_text(str(int(t.timestamp() * 1000)))

    at(h0 + timedelta(minutes=30))
    metrics_file = tmp / "live-metrics.yaml"
    metrics_file.write_text(yaml.safe_dump({"alerts": [{
        "name": "views", "series": {"events": "Product Viewed", "period": "hour"}, "rule": {"threshold": {"above": 0}},
        "grace": "1s", "notify": [{"webhook": f"http://127.0.0.1:{server.server_port}/hook"}]}]}))
    tag = f"alerts{os.getpid()}"
    settings: Settings = mb.worker_settings(broker.bootstrap, 4, None, tag, tmp / tag, metrics=metrics_file,
                                            clock_file=clock, alert_tick_seconds=args.live_tick,
                                            alert_webhooks=f"http://127.0.0.1:{server.server_port}/")
    worker = mb.Worker(settings).start()
    latencies = []
    try:
        worker.wait_ready(time.monotonic() + 600)
        mb.wait_for(lambda: "alert views (version" in worker.log_path.read_text(errors="replace"),
                    deadline=time.monotonic() + 120, what="the rule to start")
        with Producer(broker.bootstrap, topic=settings.topics.raw, source="bench") as producer:
            for k in range(args.live_steps + 1):  # the first warms up (not counted)
                hour = h0 + timedelta(hours=k)
                if k % 2 == 0:  # a view: fires; none: resolves
                    when = hour + timedelta(minutes=10)
                    producer.send({"type": "track", "event": "Product Viewed", "userId": f"u{k}",
                                   "properties": {"product_id": "p"}, "timestamp": when.isoformat(),
                                   "messageId": f"view-{k}"}, received_at=when)
                    producer.flush()
                before = len(received)
                time.sleep(random.uniform(0, args.live_tick))  # not in step with the markers
                at(hour + timedelta(hours=1, seconds=1))  # the hour closes (end + grace)
                closed = time.time()
                mb.wait_for(lambda before=before: len(received) > before, deadline=time.monotonic() + 60,
                            what=f"the webhook of hour {k}")
                if k:
                    latencies.append(received[-1][0] - closed)
                log(f"live hour {k}: {received[-1][1]['state']} after {received[-1][0] - closed:.3f} s")
    finally:
        worker.stop()
        devkafka.stop(broker)
        server.shutdown()
    return {"steps": len(latencies), "tick_s": args.live_tick,
            "close_to_webhook_s": {"p50": round(mb.pct(latencies, 50), 3), "p99": round(mb.pct(latencies, 99), 3),
                                   "max": round(max(latencies), 3)},
            "loadavg_end": mb.loadavg()}


def render(doc: dict[str, Any]) -> str:
    lines = [f"Flywheel alerts bench {doc['started']} ({doc['commit']}), {doc['cpus']} CPUs"]
    d = doc.get("detect")
    if d:
        lines += ["", f"detect: {d['seeds']} seeded series of {d['weeks']} weeks (hourly; weekends at 40 %), "
                      "spikes x3, drops x0.2, level shifts x0.5"]
        for label, r in d["detectors"].items():
            lines.append(f"  {label:32} precision {r['precision_hours']:.3f}  recall {r['recall_hours']:.3f} (hours), "
                         f"incidents fired on {r['recall_incidents']:.3f} of {r['incidents']}, "
                         f"false firings {r['false_firings_per_week']:.3f}/week")
    s = doc.get("stage")
    if s:
        lines += ["", f"stage: {s['raw_records']:,} raw records ({s['events']:,} events), {s['rules']} rules"]
        for stage, c in s["cpu_us_per_event"].items():
            lines.append(f"  {stage:9} CPU us/event  without rules {c['off']['median']} ({c['off']['min']}-"
                         f"{c['off']['max']})  with {c['on']['median']} ({c['on']['min']}-{c['on']['max']})  "
                         f"-> {s['cost_us_per_event'][stage]} us/event")
        e = s["evaluator"]
        lines.append(f"  evaluator: {e['records']:,} records ({e['markers']:,} markers): {e['cpu_us_per_record']} us "
                     f"per record, {e['cpu_us_per_event']} us per event; alerts.series records "
                     f"{s['alert_series_records']}")
    lv = doc.get("live")
    if lv:
        lines += ["", f"live: {lv['steps']} hours closed one by one, markers every {lv['tick_s']} s "
                      f"(load at the end {lv['loadavg_end'][0]})",
                  f"  period close -> webhook call: {lv['close_to_webhook_s']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--seeds", type=int, default=100, help="detect: synthetic series")
    parser.add_argument("--weeks", type=int, default=8, help="detect: weeks per series (4 of warm-up)")
    parser.add_argument("--persons", type=int, default=5000, help="stage: persons of the in-process stream")
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--marker-every", type=int, default=5000, help="stage: events between marker rounds")
    parser.add_argument("--live-steps", type=int, default=20)
    parser.add_argument("--live-tick", type=float, default=2.0, help="FLYWHEEL_ALERT_TICK_SECONDS")
    args = parser.parse_args()
    parts = args.parts.split(",")
    doc: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "commit": mb.git_commit(), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-alerts-"))
    try:
        if "detect" in parts:
            doc["detect"] = run_detect(args)
        if "stage" in parts:
            doc["stage"] = run_stage(args)
        if "live" in parts:
            doc["live"] = run_live(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pl.save_results("alerts", doc, render(doc))


if __name__ == "__main__":
    main()
