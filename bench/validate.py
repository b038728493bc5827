"""Validate stage cost per event: the hand-written validate (before pydantic) against today's, in one run.

    .venv/bin/python bench/validate.py                      # 50,000 events, 5 rounds
    .venv/bin/python bench/validate.py --events 20000 --rounds 9

The mix: flywheel.sample.journeys (page, track of the shipped plan's events, identify) as the ingest
stage receives them, plus about 2% invalid records (a planned property of the wrong type or missing,
a placeholder id, a timestamp days ahead, an unknown type, broken JSON), shuffled in.

Reported: CPU time (time.process_time) per event, the best and the median of --rounds passes over the
whole mix, old and new interleaved (the machine may be shared; CPU time is what a busier machine
inflates least). Then the pydantic-core part alone, as validate does it (orjson.loads, then
validate_python) and over the raw bytes with validate_json: once as it comes (pydantic-core's JSON
parser, which reads some documents unlike orjson: NaN, 1e400, integers beyond 64 bits), and once with
every value checked to read as orjson reads it (what validate would need to decode with pydantic-core).
The old and the new outcome are compared for every record first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any

import orjson
from flywheel import paths
from flywheel.model import validate as new
from flywheel.model.plan import TrackingPlan, load_plan
from flywheel.model.validate import Raw, Valid
from flywheel.sample import journeys
from pydantic_core import SchemaValidator, ValidationError, core_schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_validate import reference_validate  # noqa: E402  (tests/ holds the frozen pre-pydantic validate)

RECEIVED = datetime(2026, 11, 21, 12, tzinfo=UTC)


def spoil(message: dict[str, Any], rng: Random) -> bytes:
    """One way a record goes wrong in practice."""
    m = dict(message)
    kind = rng.randrange(7)
    if kind == 0 and m.get("properties"):
        m["properties"] = {**m["properties"], next(iter(m["properties"])): 12.5}  # a string property as a number
    elif kind == 1 and m["type"] == "track":
        m["properties"] = {}  # required properties missing
    elif kind == 2:
        m["anonymousId"] = rng.choice(["undefined", "null", "0"])
    elif kind == 3:
        m["timestamp"] = (RECEIVED + timedelta(days=3)).isoformat()
    elif kind == 4:
        m["type"] = "purchase"
    elif kind == 5:
        m["userId"] = {"id": 7}
    else:
        return orjson.dumps(m)[:-9]  # cut off
    return orjson.dumps(m)


def records(n: int, invalid_share: float, seed: int) -> list[Raw]:
    rng = Random(seed)
    out = []
    for offset, message in enumerate(journeys(n, seed=seed, days=7, start=RECEIVED - timedelta(days=7, hours=1))):
        value = spoil(message, rng) if rng.random() < invalid_share else orjson.dumps(message)
        out.append(Raw(value, "bench", RECEIVED, "events.raw", 0, offset))
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- pydantic-core over raw bytes


def json_mode(schema: Any, values: dict) -> Any:
    """The message schema for JSON input: an is-instance check (Python objects only) becomes a dict or
    list schema with `values` for its items."""
    if isinstance(schema, dict):
        if schema.get("type") == "is-instance":
            if schema["cls"] is dict:
                return core_schema.dict_schema(core_schema.str_schema(strict=True), values, strict=True)
            return core_schema.list_schema(values, strict=True)
        return {k: json_mode(v, values) for k, v in schema.items()}
    if isinstance(schema, list):
        return [json_mode(v, values) for v in schema]
    return schema


def as_orjson_reads(plan: TrackingPlan) -> SchemaValidator:
    """validate_json that takes only what orjson takes, with orjson's values: every value of the document
    is decoded through one union (finite floats: no NaN, Infinity or overflow; integers within orjson's
    int64..uint64, larger ones made floats as orjson does), then the message schema checks the decoded
    message. (A typed dict alone would leave unchecked the values of keys it ignores, and the earlier of
    two duplicate keys.)"""
    ref = core_schema.definition_reference_schema("json")
    value = core_schema.nullable_schema(core_schema.union_schema([
        core_schema.str_schema(strict=True),
        core_schema.dict_schema(core_schema.str_schema(strict=True), ref, strict=True),
        core_schema.int_schema(strict=True, ge=-(2**63), le=2**64 - 1),
        core_schema.float_schema(strict=True, allow_inf_nan=False),
        core_schema.bool_schema(strict=True),
        core_schema.list_schema(ref, strict=True),
    ], mode="left_to_right"), ref="json")  # the common first: this order costs least
    return SchemaValidator(core_schema.definitions_schema(core_schema.chain_schema([
        core_schema.dict_schema(core_schema.str_schema(strict=True), ref, strict=True),
        new._message_schema(plan),
    ]), [value]))


# --------------------------------------------------------------------------- measuring


def per_event(raws: list[Raw], rounds: int, runs: dict[str, Callable[[Raw], Any]]) -> dict[str, list[float]]:
    """µs of CPU per event of each run, one pass over all records per round, the runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            for raw in raws:
                run(raw)
            times[name].append((time.process_time() - start) / len(raws) * 1e6)
    return times


def quietly(call: Callable[[Raw], Any]) -> Callable[[Raw], Any]:
    def run(raw: Raw) -> None:
        try:
            call(raw)
        except (ValidationError, orjson.JSONDecodeError):
            pass
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--invalid", type=float, default=0.02, help="share of invalid records")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    plan = load_plan(paths.schemas_dir() / "tracking_plan.yaml")
    limits = new.DEFAULT_LIMITS
    raws = records(args.events, args.invalid, args.seed)

    outcomes = [(new.validate(r, plan, limits), reference_validate(r, plan, limits)) for r in raws]
    differ = [r for r, (a, b) in zip(raws, outcomes, strict=True) if a != b]
    n_valid = sum(isinstance(a, Valid) for a, _ in outcomes)
    n_fast = sum(new._fast(r, orjson.loads(r.value), plan, limits) is not None
                 for r, (a, _) in zip(raws, outcomes, strict=True) if isinstance(a, Valid))
    print(f"{len(raws):,} records ({sum(map(len, (r.value for r in raws))) / len(raws):.0f} bytes on average): "
          f"{n_valid:,} valid ({n_fast:,} of them on the fast path), {len(raws) - n_valid:,} invalid; "
          f"old and new outcome {'identical for every record' if not differ else f'DIFFER for {len(differ)}'}")
    del outcomes

    messages = new._validator(plan)
    raw_any = SchemaValidator(json_mode(new._message_schema(plan), core_schema.any_schema()))
    raw_exact = as_orjson_reads(plan)
    times = per_event(raws, args.rounds, {
        "old: hand-written validate (tests/reference_validate.py)": lambda r: reference_validate(r, plan, limits),
        "new: flywheel.model.validate.validate": lambda r: new.validate(r, plan, limits),
        "  orjson.loads alone": quietly(lambda r: orjson.loads(r.value)),
        "  orjson.loads + validate_python (the new fast path's pydantic part)":
            quietly(lambda r: messages.validate_python(orjson.loads(r.value), strict=True)),
        "  validate_json, pydantic-core's own reading of the bytes":
            quietly(lambda r: raw_any.validate_json(r.value, strict=True)),
        "  validate_json, values read as orjson reads them":
            quietly(lambda r: raw_exact.validate_json(r.value, strict=True)),
    })
    print(f"\nCPU µs per event, best (median) of {args.rounds} rounds:")
    for name, xs in times.items():
        print(f"  {min(xs):6.2f} ({statistics.median(xs):6.2f})  {name}")
    old, cur = (min(xs) for xs in list(times.values())[:2])
    print(f"\nold / new = {old / cur:.2f} (best of rounds)")


if __name__ == "__main__":
    main()
