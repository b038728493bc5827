"""What the UI's pages show, computed from the metric records (docs/design.md §12). Pure: no I/O.

The UI keeps, per kind of cell, the latest record of every (cell, partition) — exactly what the ClickHouse
views compute with argMax(…, version) — and sums over partitions. It is filled twice, in any order: from
ClickHouse's *_partials tables (a snapshot) and from the metrics.* topics (the UI's own consumer, which
starts at the offsets the sink has committed, so nothing falls between the two). A record replaces
another only with a higher version, so the overlap of the two sources counts once.

The page functions below are the Python twins of the views (funnel_daily/funnel_conversion,
retention_daily, active_users_daily, experiment_stats): tests compare them cell by cell.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, timedelta
from typing import Any

from flywheel.metrics.cells import KIND_BY_NAME
from flywheel.metrics.definitions import Metrics

# The kinds the boards show, by their metrics.* record kind (metrics/cells.py)
BOARD_KINDS = ("funnels", "retention", "active_users", "experiments")

Identity = tuple  # a cell's identity fields, in Kind.fields order


class Partials:
    """Latest (version, measures) per (identity, partition), per kind; `sums` adds the partitions up."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[tuple[Identity, int], tuple[int, tuple[int, ...]]]] = {
            name: {} for name in BOARD_KINDS}

    def put(self, kind_name: str, identity: Identity, partition: int, version: int,
            measures: tuple[int, ...]) -> bool:
        """Keep the values if their version is newer than what is held; whether they were kept."""
        cells = self._latest[kind_name]
        key = (identity, partition)
        held = cells.get(key)
        if held is not None and held[0] >= version:
            return False
        cells[key] = (version, measures)
        return True

    def put_record(self, kind_name: str, rec: Mapping[str, Any]) -> bool:
        """A metrics.* record (the format of metrics/cells.record)."""
        kind = KIND_BY_NAME[kind_name]
        return self.put(kind_name, tuple(rec[name] for name, _ in kind.fields), int(rec["partition"]),
                        int(rec["version"]), tuple(int(rec[name]) for name, _ in kind.measures))

    def current(self, kind_name: str, name: str, version: str) -> dict[Identity, tuple[int, ...]]:
        """The cells of definition `name` at `version` summed over partitions, by the rest of their identity
        (after name and version) — a cell of no version (written before versions were) standing in on a
        partition where the version has none, as funnel_daily and retention_daily do."""
        chosen: dict[tuple[Identity, int], tuple[bool, tuple[int, ...]]] = {}
        for (identity, partition), (_, measures) in self._latest[kind_name].items():
            if identity[0] != name or identity[1] not in (version, ""):
                continue
            key, versioned = (identity[2:], partition), identity[1] != ""
            held = chosen.get(key)
            if held is None or (versioned and not held[0]):
                chosen[key] = (versioned, measures)
        out: dict[Identity, list[int]] = {}
        for (rest, _), (_, measures) in chosen.items():
            acc = out.setdefault(rest, [0] * len(measures))
            for i, m in enumerate(measures):
                acc[i] += m
        return {rest: tuple(v) for rest, v in out.items()}

    def sums(self, kind_name: str) -> dict[Identity, tuple[int, ...]]:
        out: dict[Identity, list[int]] = {}
        for (identity, _), (_, measures) in self._latest[kind_name].items():
            acc = out.get(identity)
            if acc is None:
                out[identity] = list(measures)
            else:
                for i, m in enumerate(measures):
                    acc[i] += m
        return {identity: tuple(v) for identity, v in out.items()}


def snapshot_sql(kind_name: str) -> str:
    """The latest values per (cell, partition) in ClickHouse, as rows for `snapshot_row`: identity fields
    (days as text), partition, version, measures (as text: Int256 sums)."""
    kind = KIND_BY_NAME[kind_name]
    identity = [f"toString({column})" if name in kind.dates else column for name, column in kind.fields]
    measures = ", ".join(f"toString(s.{i + 1})" for i in range(len(kind.measures)))
    inner = ", ".join(column for _, column in kind.measures)
    group = ", ".join(column for _, column in kind.fields)
    return (f"SELECT {', '.join(identity)}, kafka_partition, v, {measures} FROM (SELECT {group}, kafka_partition, "
            f"max(version) AS v, argMax(tuple({inner}), version) AS s FROM {kind.table} "
            f"GROUP BY {group}, kafka_partition)")


def load_snapshot(partials: Partials, kind_name: str, rows: Iterable[Sequence[Any]]) -> None:
    width = len(KIND_BY_NAME[kind_name].fields)
    for row in rows:
        partials.put(kind_name, tuple(row[:width]), int(row[width]), int(row[width + 1]),
                     tuple(int(v) for v in row[width + 2:]))


# ---- the pages ------------------------------------------------------------------------------------------

def funnels(metrics: Metrics, partials: Partials, first: str, last: str) -> list[dict[str, Any]]:
    """Per funnel in force (its current version): persons per step summed over days first..last (days of step 1, UTC,
    'YYYY-MM-DD', inclusive) with conversion from step 1 and from the previous step — funnel_conversion
    summed over the range."""
    out = []
    for f in metrics.funnels:
        totals: dict[tuple[str, int], int] = {}
        for (day, step), (persons,) in partials.current("funnels", f.name, f.version).items():
            if first <= day <= last:
                totals[(f.name, step)] = totals.get((f.name, step), 0) + persons
        steps, entered, previous = [], totals.get((f.name, 1), 0), None
        for i, predicate in enumerate(f.steps, start=1):
            persons = totals.get((f.name, i), 0)
            steps.append({"step": i, "event": predicate.event or "any activity", "persons": persons,
                          "conversion": persons / entered if entered else None,
                          "step_conversion": (persons / previous if previous else None) if i > 1 else
                          (1.0 if persons else None)})
            previous = persons
        out.append({"name": f.name, "steps": steps})
    return out


def retention(metrics: Metrics, partials: Partials) -> list[dict[str, Any]]:
    """Per retention: cohorts (oldest first) with their size and persons returning n periods later —
    retention_daily, plus the cohorts nobody returned in yet."""
    out = []
    for r in metrics.retention:
        cohorts: dict[str, dict[int, int]] = {}
        for (cohort, period), (persons,) in partials.current("retention", r.name, r.version).items():
            if persons > 0:
                cohorts.setdefault(cohort, {})[period] = persons
        rows = []
        for cohort in sorted(cohorts):
            size = cohorts[cohort].get(0, 0)
            if not size:  # returns without a cohort size: the view's join drops them too
                continue
            returned = [cohorts[cohort].get(n, 0) for n in range(1, r.horizon + 1)]
            rows.append({"cohort": cohort, "size": size, "returned": returned})
        out.append({"name": r.name, "period": r.period, "horizon": r.horizon, "cohorts": rows})
    return out


def active_users(partials: Partials) -> list[dict[str, Any]]:
    """DAU/WAU/MAU and stickiness per day — active_users_daily: days up to the last day with a DAU, and
    with a MAU."""
    by_day: dict[str, dict[str, int]] = {}
    for (kind, day), (persons,) in partials.sums("active_users").items():
        by_day.setdefault(day, {})[kind] = persons
    last = max((d for d, v in by_day.items() if v.get("dau", 0) > 0), default=None)
    out = []
    for day in sorted(by_day):
        v = by_day[day]
        mau = v.get("mau", 0)
        if last is None or day > last or mau <= 0:
            continue
        out.append({"day": day, "dau": v.get("dau", 0), "wau": v.get("wau", 0), "mau": mau,
                    "stickiness": v.get("dau", 0) / mau})
    return out


def experiment_rows(partials: Partials, experiment: str) -> list[tuple]:
    """experiment_stats' rows of one experiment: (variation, metric, n, Σy, …, Σpy) — what
    metrics/results.from_stats reads."""
    return [(variation, metric, *values)
            for (name, variation, metric), values in sorted(partials.sums("experiments").items())
            if name == experiment and values[0] > 0]


def day_range(days: int, *, today: date) -> tuple[str, str]:
    return (today - timedelta(days=days - 1)).isoformat(), today.isoformat()


# ---- live events and rates --------------------------------------------------------------------------------

class Recent:
    """The latest events (valid and invalid) for the live-events page: the last `size` read, shown newest
    (received) first — the topics' partitions arrive interleaved in no particular order."""

    def __init__(self, size: int = 500):
        self.size = size
        self.events: deque[dict[str, Any]] = deque(maxlen=size)

    def add_valid(self, ev: Mapping[str, Any]) -> None:
        self.events.appendleft({
            "at": ev.get("receivedAt"), "type": ev.get("type"), "event": ev.get("event") or "",
            "person": ev.get("personId") or "", "source": ev.get("source") or "",
            "properties": ev.get("properties") or {}, "valid": True, "reasons": []})

    def add_invalid(self, rec: Mapping[str, Any]) -> None:
        self.events.appendleft({
            "at": rec.get("receivedAt"), "type": "", "event": "", "person": "", "source": rec.get("source") or "",
            "properties": {}, "valid": False,
            "reasons": list(rec.get("reasons") or [])})

    def select(self, *, name: str = "", person: str = "", source: str = "", limit: int = 100) -> list[dict]:
        """Newest first; each filter, when given, is a substring the field must contain."""
        out = []
        for e in sorted(self.events, key=lambda e: e["at"] or 0, reverse=True):
            if name and name not in e["event"] or person and person not in e["person"] \
                    or source and source not in e["source"]:
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out


class Rate:
    """Records per second over the last `window` seconds (injectable clock)."""

    def __init__(self, window: float = 10.0, *, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self._seen: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, n: int) -> None:
        if n:
            self._seen.append((self.clock(), n))
            self.total += n

    def per_second(self) -> float:
        now = self.clock()
        while self._seen and self._seen[0][0] <= now - self.window:
            self._seen.popleft()
        return sum(n for _, n in self._seen) / self.window
