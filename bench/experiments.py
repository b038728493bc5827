"""Experiments benchmark (issue 16): what experiments cost per event in the stream.

    make bench-experiments                   # = .venv/bin/python bench/experiments.py
    .venv/bin/python bench/experiments.py --persons 20000 --repeats 5

The aggregate stage alone, in-process (bench/metrics.py's stream, stubs and driver), over one stream in
which --exposure-rate of the sessions (per experiment) open with an `Experiment Viewed` of each of the 3
experiments below (variation by flywheel.experiments.assign on the device's anonymous id, so a person seen
on two devices is often excluded): the metrics of schemas/metrics.yaml ("base": funnels, retention, active
users) vs the same plus EXPERIMENTS (3 experiments × 3 metrics: a conversion, a sum of revenue, a ratio or a
count), alternating, --repeats times, on the same events. CPU µs per event of each, the difference (what
experiments cost per event), and the bytes of each person's stored state.

With --pipeline, then the whole pipeline on a local Kafka (bench/metrics.py --parts pipeline): a worker with
the base metrics file vs one with the experiments too, over the same events (--exposure-rate of the sessions
exposed), alternating: the worker CPU per event of each, side by side (bench/metrics.py writes its own
results file).

Results: bench/results/experiments-<time>.json and .txt, with the load average and how busy the machine was.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from flywheel.metrics.definitions import Metrics, load_metrics, parse_metrics
from flywheel.stages.aggregate import is_bookkeeping

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics as mb  # noqa: E402  (bench/metrics.py: the stream, the stage stubs and driver)
import pipeline as pl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
EXPERIMENTS = """
experiments:
  - name: checkout_button
    exposure: {experiment_id: checkout_button}
    variations: {control: 0.5, green: 0.5}
    control: control
    metrics:
      - name: purchased
        conversion: {event: Order Completed, within: 7d}
      - name: revenue
        sum: {event: Order Completed, property: revenue, within: 7d}
      - name: orders_per_checkout
        ratio: {numerator: {count: Order Completed}, denominator: {count: Checkout Started}, within: 7d}
    guardrails: [revenue]
  - name: search_layout
    exposure: {experiment_id: search_layout}
    variations: {a: 0.34, b: 0.33, c: 0.33}
    control: a
    metrics:
      - name: added
        conversion: {event: Product Added, within: 3d}
      - name: shoe_views
        count: {event: Product Viewed, where: {category: shoes}, within: 3d}
      - name: basket_value
        ratio: {numerator: {sum: {event: Order Completed, property: revenue}}, denominator: {count: Product Added},
                within: 7d}
  - name: free_shipping
    exposure: {experiment_id: free_shipping}
    variations: {control: 0.5, free: 0.5}
    control: control
    metrics:
      - name: ordered
        conversion: {event: Order Completed, within: 14d}
      - name: orders
        count: {event: Order Completed, within: 14d}
      - name: revenue
        sum: {event: Order Completed, property: revenue, within: 14d}
"""
log = pl.log


def with_experiments(base: Path) -> Metrics:
    spec = yaml.safe_load(base.read_text()) | yaml.safe_load(EXPERIMENTS)
    return parse_metrics(spec, source=f"{base} + bench/experiments.py EXPERIMENTS")


def run_stage(args) -> dict[str, Any]:
    base = load_metrics(mb.METRICS_ON)
    experiments = with_experiments(mb.METRICS_ON)
    messages = mb.with_exposures(list(mb.population(args.persons, days=args.days, seed=args.seed)), experiments,
                              args.exposure_rate, args.seed)
    exposures = sum(m.get("event") == "Experiment Viewed" for m in messages)
    records, counts = mb.identified(messages, args.partitions)
    log(f"stage: {counts['events']:,} events ({exposures:,} exposures) of {args.persons:,} persons over "
        f"{args.days} days")
    runs: dict[str, list[dict]] = {"base": [], "experiments": []}
    sizes: dict[str, dict] = {}
    for r in range(args.repeats):
        for mode in (("base", "experiments") if r % 2 == 0 else ("experiments", "base")):
            la, busy0 = mb.loadavg(), pl.machine_ticks()
            result, stage = mb.stage_pass(records, experiments if mode == "experiments" else base,
                                          partitions=args.partitions, batch=args.batch, batching="distinct")
            busy1 = pl.machine_ticks()
            result.update(loadavg=la, machine_busy=round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3))
            values = [orjson.loads(v) for k, v in stage.persons.items() if not is_bookkeeping(k)]
            raw = [len(v) for k, v in stage.persons.items() if not is_bookkeeping(k)]
            kept = [sum(len(p) for p in v.get("xp", {}).values()) for v in values if v.get("x")]
            sizes[mode] = {"persons": len(values), "mean_bytes": round(sum(raw) / len(raw), 1),
                           "exposed_persons": len(kept),
                           "mean_part_values_of_exposed": round(statistics.mean(kept or [0]), 2)}
            runs[mode].append(result)
            log(f"stage {mode:>11} pass {r + 1}: {result['cpu_us_per_event']} us CPU/event, "
                f"{result['events_per_s']:,} ev/s (load {la[0]}, machine busy {result['machine_busy']:.0%})")
            del stage
            gc.collect()
    cpu = {m: mb.spread([x["cpu_us_per_event"] for x in runs[m]]) for m in runs}
    return {"events": counts["events"], "exposures": exposures, "persons": args.persons, "runs": runs,
            "cpu_us_per_event": cpu,
            "experiments_cost_us_per_event": round(cpu["experiments"]["median"] - cpu["base"]["median"], 1),
            "ratio_cpu": round(cpu["experiments"]["median"] / cpu["base"]["median"], 3), "state": sizes,
            "experiments": [f"{e.name} ({len(e.metrics)} metrics)" for e in experiments.experiments]}


def render(doc: dict[str, Any]) -> str:
    s = doc["stage"]
    cpu = s["cpu_us_per_event"]
    lines = [f"Experiments benchmark, {doc['started']} (commit {doc['commit']}), load at start {doc['loadavg_start']}",
             f"stream: {s['events']:,} events ({s['exposures']:,} exposures) of {s['persons']:,} persons over "
             f"{doc['config']['days']} days; experiments: {', '.join(s['experiments'])}",
             "",
             "aggregate stage, CPU µs per event (min / median / max of the passes):",
             f"  base (schemas/metrics.yaml)     {cpu['base']['min']} / {cpu['base']['median']} / {cpu['base']['max']}",
             f"  + 3 experiments × 3 metrics     {cpu['experiments']['min']} / {cpu['experiments']['median']} / "
             f"{cpu['experiments']['max']}",
             f"  experiments cost                {s['experiments_cost_us_per_event']} µs per event "
             f"(× {s['ratio_cpu']})",
             "",
             "person state (orjson, as stored):"]
    for mode, st in s["state"].items():
        lines.append(f"  {mode:<12} {st['persons']:,} persons, mean {st['mean_bytes']} bytes; exposed "
                     f"{st['exposed_persons']:,}, each keeping {st['mean_part_values_of_exposed']} part values")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=10000)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="base + experiments passes")
    parser.add_argument("--exposure-rate", type=float, default=0.5, help="sessions opening with each exposure")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pipeline", action="store_true", help="then the whole pipeline (bench/metrics.py)")
    parser.add_argument("--pipeline-events", type=int, default=30000)
    args = parser.parse_args()
    started = datetime.now(UTC)
    doc: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "commit": mb.git_commit(),
                           "loadavg_start": mb.loadavg(), "argv": sys.argv[1:],
                           "config": {k: v for k, v in vars(args).items()}}
    doc["stage"] = run_stage(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"experiments-{started.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    text = render(doc)
    stem.with_suffix(".txt").write_text(text)
    print(text)
    log(f"results: {stem}.json / .txt")
    if args.pipeline:
        import subprocess

        on = stem.with_suffix(".metrics.yaml")
        on.write_text(yaml.safe_dump(yaml.safe_load(mb.METRICS_ON.read_text()) | yaml.safe_load(EXPERIMENTS)))
        command = [sys.executable, str(REPO / "bench" / "metrics.py"), "--parts", "pipeline", "--metrics-on", str(on),
                   "--metrics-off", str(mb.METRICS_ON), "--exposures", str(args.exposure_rate),
                   "--pipeline-events", str(args.pipeline_events), "--seed", str(args.seed)]
        log(f"pipeline: {' '.join(command)}")
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
