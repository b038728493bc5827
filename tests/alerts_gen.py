"""Seeded synthetic series for the alert rules (tests/unit/test_alerts.py, bench/alerts.py): hourly counts
with a daily curve and a weekly one (weekends lower), Poisson noise, and injected incidents — spikes, drops
and level shifts — whose hours are known, so a detector's precision and recall can be counted."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from flywheel.metrics.alerts import Point
from flywheel.model.clock import DAY_MS

HOUR_MS = 3_600_000
START = 19_996 * DAY_MS  # a Monday (2024-09-30), 00:00 UTC


@dataclass(frozen=True)
class Incident:
    kind: str  # spike | drop | shift
    start: int  # hour index
    hours: int
    factor: float


def expected(hour: int, level: float, weekend: float) -> float:
    """The noiseless count of hour `hour` (0 = START): a daily curve, lower on weekends."""
    of_day = hour % 24
    daily = 0.35 + 0.65 * math.sin(math.pi * max(0, of_day - 6) / 18) ** 2 if 6 <= of_day else 0.35
    weekday = (hour // 24) % 7  # 0 = Monday
    return level * daily * (weekend if weekday >= 5 else 1.0)


def poisson(rng: random.Random, mean: float) -> int:
    if mean < 50:  # Knuth
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


def series(seed: int, *, weeks: int = 8, level: float = 400.0, weekend: float = 0.4,
           incidents: list[Incident] = ()) -> tuple[dict[int, Point], set[int]]:
    """(period start ms → Point, the hour starts inside an incident)."""
    rng = random.Random(seed)
    points, abnormal = {}, set()
    for hour in range(weeks * 168):
        mean = expected(hour, level, weekend)
        for inc in incidents:
            if inc.start <= hour < inc.start + inc.hours or (inc.kind == "shift" and hour >= inc.start):
                mean *= inc.factor
                abnormal.add(START + hour * HOUR_MS)
        n = poisson(rng, mean)
        points[START + hour * HOUR_MS] = Point(n, n)
    return points, abnormal


def random_incidents(seed: int, *, weeks: int, count: int = 6) -> list[Incident]:
    """Incidents in the last weeks (after a 4-week baseline), none overlapping: spikes ×3, drops ×0.2, and
    at most one level shift ×0.5, last."""
    rng = random.Random(seed)
    out, taken = [], set()
    while len(out) < count:
        kind = rng.choice(["spike", "drop"])
        hours = rng.randint(1, 4)
        start = rng.randrange(5 * 168, weeks * 168 - 168)
        if taken & set(range(start - 8, start + hours + 8)):
            continue
        taken |= set(range(start, start + hours))
        out.append(Incident(kind, start, hours, 3.0 if kind == "spike" else 0.2))
    if rng.random() < 0.5:
        out.append(Incident("shift", weeks * 168 - 48, 48, 0.5))
    return out
