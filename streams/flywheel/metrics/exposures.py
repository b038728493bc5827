"""Who was exposed to an experiment, and what they did after (docs/design.md §11), pure: the semantics the
stream's per-person state will follow, and `oracle.experiment_stats_sql` computes from scratch.

- Exposure: a track event named like the experiment's exposure event (Segment's `Experiment Viewed`) whose
  `experiment_property` equals the experiment's id, and whose `variation_property` names one of its
  variations (string values; other values are not exposures). Non-late events only, like every metric.
- A person's first exposure — the earliest by (event time, messageId) — anchors every metric: only the
  person's events strictly after it, and within the metric's `within` of it, count.
- A person exposed to more than one variation is excluded from every metric, and counted.
- Stitched: the person is the resolved person (an anonymous visitor exposed before signing up and buying
  after is one person).
- Values per person: conversion 1 or 0; count, the matching events; sum, the property's numeric values
  summed in millionths (integers: sums over partitions are exact whatever the order); ratio, numerator
  and denominator each a count or a sum.
- Per (variation, metric), the sufficient statistics: n, Σy, Σy², and for ratio metrics Σx, Σx², Σxy —
  as integers (sums in millionths), so they add up exactly across partitions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flywheel.metrics.definitions import Experiment, ExperimentMetric, Part

MICROS = 1_000_000  # sums are kept in millionths of the property's unit


@dataclass(frozen=True, slots=True)
class Event:
    ts: int  # ms
    message_id: str
    mtype: str
    name: str
    properties: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Exposure:
    variation: str | None  # None: excluded (more than one variation)
    ts: int
    message_id: str
    variations: frozenset[str]


def exposure(experiment: Experiment, events: Iterable[Event]) -> Exposure | None:
    """The person's first exposure and every variation they saw; None if never exposed."""
    allowed = {name for name, _ in experiment.variations}
    first: tuple[int, str, str] | None = None
    seen: set[str] = set()
    for e in events:
        if e.mtype != "track" or e.name != experiment.exposure_event:
            continue
        if e.properties.get(experiment.experiment_property) != experiment.experiment_id:
            continue
        variation = e.properties.get(experiment.variation_property)
        if not isinstance(variation, str) or variation not in allowed:
            continue
        seen.add(variation)
        if first is None or (e.ts, e.message_id) < first[:2]:
            first = (e.ts, e.message_id, variation)
    if first is None:
        return None
    return Exposure(first[2] if len(seen) == 1 else None, first[0], first[1], frozenset(seen))


def _micros(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return round(value * MICROS)


def part_value(part: Part, events: Iterable[Event]) -> int:
    """A count, or a sum in millionths, over the events given."""
    total = 0
    for e in events:
        if part.predicate.matches(e.mtype, e.name, e.properties):
            if part.property is None:
                total += 1
            else:
                total += _micros(e.properties.get(part.property)) or 0
    return total


def values(metric: ExperimentMetric, exposed_at: int, events: Iterable[Event]) -> tuple[int, int]:
    """(y, x) of one exposed person: the events in (exposed_at, exposed_at + within]; x is 0 but for ratios."""
    window = [e for e in events if exposed_at < e.ts <= exposed_at + metric.within_ms]
    y = part_value(metric.numerator, window)
    if metric.kind == "conversion":
        y = int(y > 0)
    x = part_value(metric.denominator, window) if metric.denominator is not None else 0
    return y, x


Stats = dict[str, int]  # n, sy, syy, sx, sxx, sxy


def sufficient(experiment: Experiment, persons: Iterable[list[Event]]) -> tuple[dict[tuple[str, str], Stats], int]:
    """Per (variation, metric) the sufficient statistics over persons (each a list of their non-late
    events), and how many exposed persons were excluded."""
    out: dict[tuple[str, str], Stats] = {}
    excluded = 0
    for events in persons:
        exp = exposure(experiment, events)
        if exp is None:
            continue
        if exp.variation is None:
            excluded += 1
            continue
        for metric in experiment.metrics:
            y, x = values(metric, exp.ts, events)
            s = out.setdefault((exp.variation, metric.name), dict.fromkeys(("n", "sy", "syy", "sx", "sxx", "sxy"), 0))
            s["n"] += 1
            s["sy"] += y
            s["syy"] += y * y
            s["sx"] += x
            s["sxx"] += x * x
            s["sxy"] += x * y
    return out, excluded
