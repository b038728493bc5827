"""Segments benchmark (issue 14): what segments cost in the stream, and what the sweep costs.

    make bench-segments                      # = .venv/bin/python bench/segments.py
    .venv/bin/python bench/segments.py --parts stage --persons 20000
    .venv/bin/python bench/segments.py --parts sweep --sweep-persons 1000000

Parts (--parts, default all):

stage   The aggregate stage alone, in-process (bench/metrics.py's stream, stubs and driver): the metrics
        of schemas/metrics.yaml ("base": funnels, retention, active users) vs the same plus SEGMENTS below
        (5 segments, churn risk, a daily lifecycle and RFM), alternating, --repeats times. CPU µs per event of each, the
        difference (what segments cost per event), and the audience changes published. Then the bytes of
        each person's stored state in both (orjson of the state, as in the persons table).
sweep   The due index on a real RocksDB (rocksdict, as Faust's store): --sweep-persons person states
        (each one segment event, a membership and a due time spread over a day) in 8 partitions; the
        stage's `sweep()` with the clock at the start of that day (nothing due: the cost of looking),
        then moved on by --sweep-step minutes at a time: persons swept per second of CPU, and the CPU of
        a sweep per due person. The sweep never reads persons that are not due: its cost follows the
        due persons, not the table.

live    A local Kafka and one `flywheel worker` (embedded ClickHouse, the real clock) with one segment,
        "Product Viewed within --live-window seconds". --live-persons fresh persons each send one Product
        Viewed (timestamp now), spaced --live-gap seconds; a consumer tails segments.changes. Entry
        latency: from Kafka's ack of the event to the Audience Entered record's arrival at the consumer.
        Exit delay: from the moment the view leaves the window (its time + the window) to the Audience
        Exited record's arrival — the sweep runs every FLYWHEEL_SEGMENT_SWEEP_SECONDS (--live-sweep).

Results: bench/results/segments-<time>.json and .txt; every part records the load average and how busy
the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from flywheel.metrics.definitions import Metrics, load_metrics, parse_metrics
from flywheel.metrics.person import PersonState, apply
from flywheel.model.clock import DAY_MS
from flywheel.stages.aggregate import BEGIN, END, AggregateStage, _due_key, _mark, is_bookkeeping

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics as mb  # noqa: E402  (bench/metrics.py: the stream, the stage stubs and driver)
import pipeline as pl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PARTS = ("stage", "sweep", "live")
SEGMENTS = """
segments:
  - name: browsers_not_buyers
    all:
      - performed: Product Viewed
        count: {gte: 3}
        within: 7d
      - not_performed: Order Completed
        within: 30d
  - name: cart_abandoners
    all:
      - performed: Product Added
        within: 1d
      - not_performed: Order Completed
        within: 1d
  - name: shoe_fans
    all:
      - performed: Product Viewed
        where: {category: shoes}
        count: {gte: 2}
        within: 14d
  - name: new_signups
    all:
      - performed: Signed Up
        within: 7d
  - name: engaged_or_pro
    any:
      - performed: any
        count: {gte: 5}
        within: 7d
      - trait: {plan: pro}
churn_risk: {active_within: 28d, silent_for: 14d}
lifecycle: {period: day}
rfm: {event: Order Completed, monetary: revenue, window: 365d}
"""
log = pl.log


def with_segments(base: Path) -> Metrics:
    spec = yaml.safe_load(base.read_text()) | yaml.safe_load(SEGMENTS)
    return parse_metrics(spec, source=f"{base} + bench/segments.py SEGMENTS")


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def run_stage(args) -> dict[str, Any]:
    base = load_metrics(mb.METRICS_ON)
    segs = with_segments(mb.METRICS_ON)
    messages = list(mb.population(args.persons, days=args.days, seed=args.seed))
    records, counts = mb.identified(messages, args.partitions)
    log(f"stage: {counts['events']:,} events of {args.persons:,} persons over {args.days} days")
    runs: dict[str, list[dict]] = {"base": [], "segments": []}
    sizes: dict[str, dict] = {}
    for r in range(args.repeats):
        for mode in (("base", "segments") if r % 2 == 0 else ("segments", "base")):
            la, busy0 = mb.loadavg(), pl.machine_ticks()
            result, stage = mb.stage_pass(records, segs if mode == "segments" else base, partitions=args.partitions,
                                          batch=args.batch, batching="distinct")
            busy1 = pl.machine_ticks()
            result.update(loadavg=la, machine_busy=round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3))
            values = [v for k, v in stage.persons.items() if not is_bookkeeping(k)]
            sizes[mode] = {"persons": len(values), "mean_bytes": round(sum(map(len, values)) / len(values), 1),
                           "due_index_keys": sum(1 for k, _ in stage.persons.items() if k.startswith(b"\x00due\x00")),
                           "members": sum(len(orjson.loads(v).get("s", {})) for v in values)}
            runs[mode].append(result)
            log(f"stage {mode:>8} pass {r + 1}: {result['cpu_us_per_event']} us CPU/event, "
                f"{result['events_per_s']:,} ev/s, {result['published']['segments']:,} audience changes "
                f"(load {la[0]}, machine busy {result['machine_busy']:.0%})")
            del stage
    cpu = {m: spread([x["cpu_us_per_event"] for x in runs[m]]) for m in runs}
    return {"events": counts["events"], "persons": args.persons, "runs": runs, "cpu_us_per_event": cpu,
            "segments_cost_us_per_event": round(cpu["segments"]["median"] - cpu["base"]["median"], 1),
            "ratio_cpu": round(cpu["segments"]["median"] / cpu["base"]["median"], 3), "state": sizes,
            "segments": [s.name for s in segs.segments]}


# --------------------------------------------------------------------------- sweep on RocksDB

class RocksTable:
    """stages.ports.Table over one rocksdict database per partition (the store Faust's RocksDB tables use)."""

    def __init__(self, path: Path, partitions: int):
        from rocksdict import Options, Rdict

        self.changelog = "bench-persons-changelog"
        self.dbs = {p: Rdict(str(path / f"p{p}"), options=Options(raw_mode=True)) for p in range(partitions)}

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self.dbs[partition].get(key)

    def scan(self, partition: int, prefix: bytes = b"", start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        it = self.dbs[partition].iter()
        it.seek(max(prefix, start))
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def write(self, partition: int, items: Mapping[bytes, bytes | None], changelog_offset: int | None) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in items.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self.dbs[partition].write(batch)

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


class CountingOutbox:
    def __init__(self, published: list[int]):
        self.published = published

    def add(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int | None = None) -> None:
        self.published[0] += 1

    async def send(self) -> dict:
        return {}


def run_sweep(args, tmp: Path) -> dict[str, Any]:
    metrics = parse_metrics({"segments": [{"name": "viewers", "all": [
        {"performed": "Product Viewed", "within": "7d"}]}]})
    seg = metrics.segments[0]
    view = metrics.matching("Product Viewed", {})
    partitions = 8
    day0 = int(datetime.now(UTC).timestamp() * 1000) // DAY_MS * DAY_MS
    table = RocksTable(tmp / "rocks", partitions)
    t0 = time.perf_counter()
    writes: dict[int, dict[bytes, bytes]] = {p: {} for p in range(partitions)}
    for i in range(args.sweep_persons):
        person = f"person-{i}".encode()
        p = i % partitions
        ts = day0 - 7 * DAY_MS + (i * 86_399_999) // args.sweep_persons  # leaves the window during day0
        state = apply(PersonState(), f"m{i}", ts, view, metrics)
        state.members = {seg.name: (seg.version, ts)}
        state.due = ts + 7 * DAY_MS
        writes[p][person] = orjson.dumps(state.to_json())
        writes[p][_due_key(p, state.due, person)] = b""
        if len(writes[p]) >= 20_000:
            table.write(p, writes[p], None)
            writes[p] = {}
    for p in range(partitions):  # a whole checkpoint (no cells) evaluated under these segments: no repair work
        writes[p][_mark(BEGIN, p)] = b"1"
        writes[p][_mark(END, p)] = orjson.dumps({"watermark": day0, "version": 0, "zeros": [], "seq": 1,
                                                 "segments": {seg.name: seg.version}})
        table.write(p, writes[p], None)
    fill_s = round(time.perf_counter() - t0, 1)
    log(f"sweep: {args.sweep_persons:,} persons with due times over one day in RocksDB ({fill_s} s)")
    published = [0]
    clock = [int(day0)]

    async def outbox() -> CountingOutbox:
        return CountingOutbox(published)

    async def go() -> list[dict]:
        stage = AggregateStage(metrics=metrics, persons=table, sink=mb.NullSink(), outbox=outbox,
                               topics=mb.stage_topics(), retry=mb.no_retry, clock=lambda: clock[0])
        stage.assigned(range(partitions))
        await asyncio.gather(*stage._repairs.values())
        stage.stop()
        steps = []
        for step in range(args.sweep_steps + 1):
            clock[0] = int(day0) + step * args.sweep_step * 60_000
            before = published[0]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            swept = await stage.sweep()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            steps.append({"minutes": step * args.sweep_step, "swept": swept, "cpu_s": round(cpu, 3),
                          "wall_s": round(wall, 3), "exits_published": published[0] - before,
                          "cpu_us_per_swept": round(cpu / swept * 1e6, 1) if swept else None})
            log(f"sweep at +{step * args.sweep_step} min: {swept:,} persons due, {cpu:.3f} s CPU "
                f"({steps[-1]['cpu_us_per_swept']} us per person)")
        return steps

    la, busy0 = mb.loadavg(), pl.machine_ticks()
    steps = asyncio.run(go())
    busy1 = pl.machine_ticks()
    table.close()
    per = [s["cpu_us_per_swept"] for s in steps if s["cpu_us_per_swept"]]
    return {"persons": args.sweep_persons, "fill_s": fill_s, "steps": steps, "loadavg": la,
            "machine_busy": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
            "nothing_due_cpu_s": steps[0]["cpu_s"],
            "cpu_us_per_swept_person": spread(per) if per else None}


def run_live(args, tmp: Path) -> dict[str, Any]:
    import uuid

    from flywheel import devkafka
    from flywheel.producer import Producer

    from kafka import KafkaConsumer, TopicPartition

    broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
    log(f"live: starting Kafka at {broker.bootstrap}")
    devkafka.start(broker)
    metrics_file = tmp / "live-metrics.yaml"
    metrics_file.write_text(yaml.safe_dump({"segments": [{"name": "viewed", "all": [
        {"performed": "Product Viewed", "within": f"{args.live_window}s"}]}]}))
    tag = f"seg{os.getpid()}"
    settings = mb.worker_settings(broker.bootstrap, 4, None, tag, tmp / tag, metrics=metrics_file,
                                  segment_sweep_seconds=args.live_sweep)
    worker = mb.Worker(settings).start()
    deadline = time.monotonic() + 600
    try:
        worker.wait_ready(deadline)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        tps = [TopicPartition(settings.topics.segments, p) for p in range(4)]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        for tp in tps:
            consumer.position(tp)
        sent: dict[str, dict[str, float]] = {}  # person → {"acked": wall s, "ts": event ms}
        seen: dict[tuple[str, str], float] = {}  # (event, person) → arrival wall s

        def drain(timeout_ms: int) -> None:
            for batch in consumer.poll(timeout_ms=timeout_ms).values():
                now = time.time()
                for r in batch:
                    rec = orjson.loads(r.value)
                    seen.setdefault((rec["event"], rec["properties"]["person_id"]), now)

        with Producer(broker.bootstrap, topic=settings.topics.raw, source="bench", linger_ms=0) as producer:
            for i in range(args.live_persons + 1):  # the first warms the worker up (not counted)
                person = f"live-{i}-{uuid.uuid4().hex[:6]}"
                ts = int(time.time() * 1000)
                producer.send({"type": "track", "event": "Product Viewed", "userId": person,
                               "properties": {"product_id": "p", "category": "hats", "price": 1.0},
                               "timestamp": datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds"),
                               "messageId": uuid.uuid4().hex})
                producer.flush()
                if i:
                    sent[person] = {"acked": time.time(), "ts": ts}
                gap_end = time.monotonic() + args.live_gap
                while time.monotonic() < gap_end:
                    drain(100)
        exits_due = max(v["ts"] for v in sent.values()) / 1000 + args.live_window
        while (time.time() < exits_due + args.live_sweep + 60
               and not all(("Audience Exited", p) in seen for p in sent)):
            drain(200)
        consumer.close()
    finally:
        worker.stop()
        devkafka.stop(broker)
    entry = [seen[("Audience Entered", p)] - v["acked"] for p, v in sent.items() if ("Audience Entered", p) in seen]
    exit_ = [seen[("Audience Exited", p)] - (v["ts"] / 1000 + args.live_window) for p, v in sent.items()
             if ("Audience Exited", p) in seen]

    def pcts(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"p50": round(mb.pct(values, 50), 3), "p99": round(mb.pct(values, 99), 3),
                "max": round(max(values), 3), "n": len(values)}
    return {"persons": len(sent), "window_s": args.live_window, "sweep_s": args.live_sweep,
            "entry_latency_s": pcts(entry), "exit_delay_s": pcts(exit_),
            "missing": {"entered": len(sent) - len(entry), "exited": len(sent) - len(exit_)},
            "loadavg_end": mb.loadavg()}


def render(doc: dict[str, Any]) -> str:
    lines = [f"Flywheel segments bench {doc['started']} ({doc['commit']}), {doc['cpus']} CPUs"]
    st = doc.get("stage")
    if st:
        c, seg_state = st["cpu_us_per_event"], st["state"]["segments"]
        lines += ["", f"stage: {st['events']:,} events of {st['persons']:,} persons, segments {st['segments']}",
                  f"  CPU us/event  base {c['base']['median']} (min {c['base']['min']}, max {c['base']['max']})  "
                  f"with segments {c['segments']['median']} (min {c['segments']['min']}, max {c['segments']['max']})"
                  f"  -> segments cost {st['segments_cost_us_per_event']} us/event (x{st['ratio_cpu']}); "
                  f"{st['runs']['segments'][0]['published']['segments']:,} audience changes published per pass",
                  f"  state per person: base {st['state']['base']['mean_bytes']} B, with segments "
                  f"{seg_state['mean_bytes']} B; due index keys {seg_state['due_index_keys']:,}"
                  f" for {seg_state['persons']:,} persons; memberships held {seg_state['members']:,}"]
    sw = doc.get("sweep")
    if sw:
        lines += ["", f"sweep: {sw['persons']:,} persons in RocksDB, due times spread over one day "
                      f"(load {sw['loadavg'][0]}, machine busy {sw['machine_busy']:.0%})",
                  f"  nothing due: {sw['nothing_due_cpu_s']} s CPU; per swept person: "
                  f"{sw['cpu_us_per_swept_person']} us CPU"]
        for s in sw["steps"]:
            lines.append(f"  +{s['minutes']:>4} min: {s['swept']:>8,} due, {s['cpu_s']:>7} s CPU, "
                         f"{s['wall_s']:>7} s wall, {s['exits_published']:,} records to Kafka (exits, states, index)")
    lv = doc.get("live")
    if lv:
        lines += ["", f"live: {lv['persons']} persons, one view each; segment 'Product Viewed within "
                      f"{lv['window_s']}s'; sweep every {lv['sweep_s']} s (load at the end {lv['loadavg_end'][0]})",
                  f"  event acked -> Audience Entered received: {lv['entry_latency_s']}",
                  f"  due (view + window) -> Audience Exited received: {lv['exit_delay_s']} (target <= 60 s)",
                  f"  missing: {lv['missing']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--persons", type=int, default=5000, help="persons of the in-process stream (stage)")
    parser.add_argument("--days", type=int, default=28, help="days the stream spans (ending now)")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000, help="records per AggregateStage.process call")
    parser.add_argument("--repeats", type=int, default=3, help="base + segments passes of the stage")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sweep-persons", type=int, default=1_000_000)
    parser.add_argument("--sweep-step", type=int, default=60, help="minutes the clock moves between sweeps")
    parser.add_argument("--sweep-steps", type=int, default=4, help="sweeps after the first (nothing due) one")
    parser.add_argument("--live-persons", type=int, default=30)
    parser.add_argument("--live-gap", type=float, default=2.0, help="seconds between two persons' views")
    parser.add_argument("--live-window", type=int, default=30, help="the segment's window, seconds")
    parser.add_argument("--live-sweep", type=float, default=10.0, help="FLYWHEEL_SEGMENT_SWEEP_SECONDS")
    args = parser.parse_args()
    parts = args.parts.split(",")
    doc: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                           "commit": mb.git_commit(), "args": vars(args)}
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-segments-"))
    try:
        if "stage" in parts:
            doc["stage"] = run_stage(args)
        if "sweep" in parts:
            doc["sweep"] = run_sweep(args, tmp)
        if "live" in parts:
            doc["live"] = run_live(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pl.save_results("segments", doc, render(doc))


if __name__ == "__main__":
    main()
