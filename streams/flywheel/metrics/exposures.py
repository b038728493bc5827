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

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flywheel.metrics.definitions import Experiment, ExperimentMetric, Metrics, Part, Predicate, exposure_key, part_key

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


def scales(metric: ExperimentMetric) -> tuple[int, int]:
    """What a metric's y (and CUPED's p) and x are kept in: millionths of a summed property, or units."""
    return (MICROS if metric.numerator.property is not None else 1,
            MICROS if metric.denominator is not None and metric.denominator.property is not None else 1)


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


def values(metric: ExperimentMetric, exposed_at: int, events: Iterable[Event],
           lookback: int = 0) -> tuple[int, int, int]:
    """(y, x, p) of one exposed person: y over the events in (exposed_at, exposed_at + within]; x, a ratio's
    denominator there (else 0); p, CUPED's covariate: the same as y over [exposed_at − lookback, exposed_at)
    (0 without a lookback)."""
    events = list(events)
    window = [e for e in events if exposed_at < e.ts <= exposed_at + metric.within_ms]
    y = part_value(metric.numerator, window)
    x = part_value(metric.denominator, window) if metric.denominator is not None else 0
    p = part_value(metric.numerator, [e for e in events if exposed_at - lookback <= e.ts < exposed_at]) \
        if lookback else 0
    if metric.kind == "conversion":
        y, p = int(y > 0), int(p > 0)
    return y, x, p


STATS = ("n", "sy", "syy", "sx", "sxx", "sxy", "sp", "spp", "spy")  # a cell's last coordinate indexes these
Stats = dict[str, int]  # STATS → value


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
            y, x, p = values(metric, exp.ts, events, experiment.cuped_for(metric))
            s = out.setdefault((exp.variation, metric.name), dict.fromkeys(STATS, 0))
            for name, value in zip(STATS, per_person(y, x, p), strict=True):
                s[name] += value
    return out, excluded


def per_person(y: int, x: int, p: int) -> tuple[int, ...]:
    """What one person adds to each of STATS."""
    return 1, y, y * y, x, x * x, x * y, p, p * p, p * y


# ---- what the stream keeps per person (the person state's part for experiments) -------------------------

@dataclass
class Track:
    """A person's experiment history as the stream keeps it (person.PersonState): per exposure key
    (definitions.exposure_key) the first exposure (ts, messageId, variation) and every variation seen; per
    metric part (definitions.part_key) the matching events' values (1 for a count, millionths for a sum) by
    message hash — so a redelivery or a join adds nothing twice. `observe` in any order, `merge` of two
    devices' tracks, then `track_values`: the same as `sufficient` over the person's events."""

    exposures: dict[str, tuple[int, str, str, frozenset[str]]]
    parts: dict[str, dict[int, tuple[int, int]]]

    @classmethod
    def empty(cls) -> Track:
        return cls({}, {})


def index(experiments: Iterable[Experiment]) -> Metrics:
    """A registry of just these experiments (its predicate indexes are what `observe_matched` reads)."""
    return Metrics((), (), 0, 0, experiments=tuple(experiments))


def observe(track: Track, experiments: Metrics, event: Event, mhash: int) -> None:
    """One (non-late) event into the track: `observe_matched` with the predicates it satisfies."""
    matched = experiments.matching(event.name, dict(event.properties), event.mtype)
    observe_matched(track, experiments, matched, event.ts, event.message_id, mhash, event.properties)


def observe_matched(track: Track, metrics: Metrics, matched: Iterable[Predicate], ts: int, message_id: str,
                    mhash: int, properties: Mapping[str, Any]) -> None:
    """An event that satisfies the predicates `matched` (Metrics.matching) into the track. The one place
    that says what an event does to a person's experiments (person.apply calls it)."""
    for p in matched:
        for e in metrics.exposures_of.get(p.pid, ()):
            variation = properties.get(e.variation_property)
            if isinstance(variation, str) and any(variation == name for name, _ in e.variations):
                _expose(track.exposures, exposure_key(e), (ts, message_id, variation, frozenset((variation,))))
        for part in metrics.parts_of.get(p.pid, ()):
            value = 1 if part.property is None else (_micros(properties.get(part.property)) or 0)
            track.parts.setdefault(part_key(part), {})[mhash] = (ts, value)


def _expose(exposures: dict, key: str, new: tuple[int, str, str, frozenset[str]]) -> None:
    """Add an exposure (ts, messageId, variation, variations seen): the earliest first, every variation."""
    old = exposures.get(key)
    exposures[key] = new if old is None else (*min(old[:3], new[:3]), old[3] | new[3])


def merge(a: Track, b: Track) -> Track:
    exposures = dict(a.exposures)
    for key, exposure_ in b.exposures.items():
        _expose(exposures, key, exposure_)
    parts = {k: dict(v) for k, v in a.parts.items()}
    for k, values in b.parts.items():
        parts.setdefault(k, {}).update(values)
    return Track(exposures, parts)


def track_values(experiment: Experiment, track: Track) -> tuple[str | None, dict[str, tuple[int, int, int]]] | None:
    """(variation, or None if excluded; metric → (y, x, p)) of the person, None if never exposed."""
    exp = track.exposures.get(exposure_key(experiment))
    if exp is None:
        return None
    ts, _, variation, seen = exp
    if len(seen) > 1:
        return None, {}

    def value(part: Part, start: int, end: int) -> int:  # over [start, end]
        return sum(v for t, v in track.parts.get(part_key(part), {}).values() if start <= t <= end)

    out = {}
    for m in experiment.metrics:
        y = value(m.numerator, ts + 1, ts + m.within_ms)
        x = value(m.denominator, ts + 1, ts + m.within_ms) if m.denominator is not None else 0
        lookback = experiment.cuped_for(m)
        p = value(m.numerator, ts - lookback, ts - 1) if lookback else 0
        out[m.name] = (int(y > 0), x, int(p > 0)) if m.kind == "conversion" else (y, x, p)
    return variation, out


EXCLUDED = -1  # the variation and metric coordinates of the cell counting excluded persons


@functools.cache
def part_keys(experiment: Experiment) -> frozenset[str]:
    """The part keys an experiment's metrics read."""
    return frozenset(part_key(p) for m in experiment.metrics for p in (m.numerator, m.denominator) if p is not None)


def changed(experiments: Iterable[Experiment], a: Track, b: Track) -> list[Experiment]:
    """The experiments whose values may differ between two tracks of a person: their exposure or one of their
    parts differs. The others' cells are the same in both (what the partials' delta skips)."""
    return [e for e in experiments
            if a.exposures.get(exposure_key(e)) != b.exposures.get(exposure_key(e))
            or any(a.parts.get(k) != b.parts.get(k) for k in part_keys(e))]


def cells(experiments: Iterable[Experiment], track: Track) -> dict[tuple, int]:
    """What the person adds to each experiment's statistics: (experiment, variation index, metric index,
    stat index) → value (zeros left out); (experiment, EXCLUDED, EXCLUDED, 0) → 1 if excluded."""
    out: dict[tuple, int] = {}
    for e in experiments:
        got = track_values(e, track)
        if got is None:
            continue
        variation, values_ = got
        if variation is None:
            out[(e, EXCLUDED, EXCLUDED, 0)] = 1
            continue
        v = next(i for i, (name, _) in enumerate(e.variations) if name == variation)
        for m, metric in enumerate(e.metrics):
            for s, value in enumerate(per_person(*values_[metric.name])):
                if value:
                    out[(e, v, m, s)] = value
    return out
