"""Alert rules, pure (docs/design.md §10): a closed period's verdict, hysteresis, and the records they make.

The stream's evaluator (stages/alerts.py) and `flywheel alerts backtest` (over ClickHouse's history) call
the same three functions:

- `evaluate(alert, series, period)`: the verdict on one closed period, given the series' points
  (period start → `Point`): breaching, clear, or none (too little volume to say);
- `step(alert, state, verdict)`: the rule's state after that verdict, and the transition it makes
  (firing / resolved), after `fire_after` / `resolve_after` consecutive periods;
- `backtest(alert, series, periods)`: both, over a run of periods.

Rules:
- threshold: the value above / below a bound. A rate counts as beyond a bound only if its Wilson interval
  (at `confidence`) lies wholly beyond it: 2 of 20 is not "above 5%" the way 200 of 2,000 is.
- relative: the change against the previous period or the same period a week before, as a fraction
  (`below: -0.8` = down 80 % or more). A count must also fall outside the Poisson bounds of the baseline,
  and a rate's Wilson interval outside the changed baseline.
- anomaly: a robust z-score, (value − median) / scale over a seasonality-matched baseline — the same hour
  of the week or the same weekday over the last `weeks` weeks, or the last `periods` periods — where scale
  is 1.4826 × MAD, but never less than the noise of the value itself (√median for a count, the binomial
  standard error for a rate): a flat baseline does not make every wobble infinitely anomalous.

Guards: `min_count` — a period whose volume (the larger of the count and its baseline, for counts; the
rate's denominator, for rates) is below it gets no verdict, so a tiny series does not flap. A period
without a verdict leaves the rule's state as it was: a source still silent (0 against 0: no relative
change) keeps its alert firing.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from flywheel.metrics.definitions import DAY_MS, Alert
from flywheel.metrics.stats import poisson_bounds, wilson
from flywheel.model.clock import iso_ms

WEEK_MS = 7 * DAY_MS
MAD_SCALE = 1.4826  # MAD × this estimates σ for normal noise
MIN_BASELINE = 3  # anomaly: fewer baseline points than this (or than asked for, if fewer) give no verdict
FIRING, RESOLVED = "firing", "resolved"


@dataclass(frozen=True, slots=True)
class Point:
    """A period's value and the volume behind it: for a count both are the count; for a rate, the value is
    the rate and `count` its denominator (persons at step 1, the cohort, events received)."""

    value: float
    count: float


@dataclass(frozen=True, slots=True)
class Verdict:
    period: int  # start, ms
    breach: bool | None  # None: no verdict (no value, too little volume, too short a baseline)
    value: float | None = None
    count: float | None = None
    baseline: float | None = None
    lower: float | None = None  # a value below this breaches
    upper: float | None = None  # … above this
    score: float | None = None  # anomaly: the robust z; relative: the change
    reason: str = ""  # why there is no verdict, or what breached


@dataclass(frozen=True, slots=True)
class RuleState:
    firing: bool = False
    streak: int = 0  # consecutive periods pointing at the other state
    since: int | None = None  # period the current state was entered (None: never fired)
    last: int | None = None  # last period evaluated

    def to_json(self) -> dict[str, Any]:
        return {"firing": self.firing, "streak": self.streak, "since": self.since, "last": self.last}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuleState:
        return cls(bool(data["firing"]), int(data["streak"]), data.get("since"), data.get("last"))


# ---- one period --------------------------------------------------------------------------------------

def baseline_periods(alert: Alert, period: int) -> list[int]:
    """The periods a rule compares `period` with, newest first."""
    rule, step = alert.rule, alert.series.period_ms
    if rule.kind == "relative":
        return [period - (WEEK_MS if rule.vs == "last_week" else step)]
    if rule.kind == "anomaly":
        if rule.baseline == "previous_periods":
            return [period - i * step for i in range(1, rule.periods + 1)]
        return [period - i * WEEK_MS for i in range(1, rule.weeks + 1)]
    return []


def history_needed(alert: Alert) -> int:
    """How far back (ms) of a period its verdict reads: the evaluator keeps that much of the series."""
    periods = baseline_periods(alert, 0)
    return -min(periods, default=0)


def evaluate(alert: Alert, series: Mapping[int, Point], period: int) -> Verdict:
    """The verdict on the closed period starting at `period`; `series` holds the points known (a period
    missing from it has no data — before the series began —, not a zero)."""
    rule, rate = alert.rule, alert.series.rate
    point = series.get(period)
    if point is None:
        return Verdict(period, None, reason="no value")
    v, n = point.value, point.count
    if rate and n <= 0:
        return Verdict(period, None, v, n, reason="no volume")
    if rule.kind == "threshold":
        if n < rule.min_count:
            return Verdict(period, None, v, n, reason=f"volume {n:g} < min_count {rule.min_count}")
        lo, hi = wilson(v, n, rule.confidence) if rate else (v, v)
        below = rule.below is not None and (hi < rule.below if rate else v < rule.below)
        above = rule.above is not None and (lo > rule.above if rate else v > rule.above)
        return Verdict(period, below or above, v, n, None, rule.below, rule.above,
                       reason="below" if below else "above" if above else "")
    base = [series[p] for p in baseline_periods(alert, period) if p in series]
    if rule.kind == "relative":
        if not base:
            return Verdict(period, None, v, n, reason="no baseline value")
        b = base[0]
        volume = n if rate else max(n, b.count)
        if volume < rule.min_count or (rate and b.count < rule.min_count):
            return Verdict(period, None, v, n, b.value, reason=f"volume {volume:g} < min_count {rule.min_count}")
        if b.value == 0:
            return Verdict(period, None, v, n, 0.0, reason="baseline is zero: no relative change")
        change = (v - b.value) / b.value
        lower = b.value * (1 + rule.below) if rule.below is not None else None
        upper = b.value * (1 + rule.above) if rule.above is not None else None
        if rate:  # the interval of this period's rate must lie beyond the changed baseline
            lo, hi = wilson(v, n, rule.confidence)
            below = lower is not None and hi < lower
            above = upper is not None and lo > upper
        else:  # and a count beyond the Poisson bounds of the baseline too
            p_lo, p_hi = poisson_bounds(b.value, rule.confidence)
            lower = min(lower, p_lo) if lower is not None else None
            upper = max(upper, p_hi) if upper is not None else None
            below = lower is not None and v < lower
            above = upper is not None and v > upper
        return Verdict(period, below or above, v, n, b.value, lower, upper, change,
                       reason="below" if below else "above" if above else "")
    # anomaly
    wanted = min(MIN_BASELINE, len(baseline_periods(alert, period)))
    if len(base) < wanted:
        return Verdict(period, None, v, n, reason=f"{len(base)} baseline periods < {wanted}")
    values = [b.value for b in base]
    median = statistics.median(values)
    mad = statistics.median(abs(x - median) for x in values)
    if rate:
        if n < rule.min_count:
            return Verdict(period, None, v, n, median, reason=f"volume {n:g} < min_count {rule.min_count}")
        noise = math.sqrt(max(median * (1 - median), 1e-12) / n) if n > 0 else math.inf
    else:
        volume = max(n, median)
        if volume < rule.min_count:
            return Verdict(period, None, v, n, median, reason=f"volume {volume:g} < min_count {rule.min_count}")
        noise = math.sqrt(max(median, 1.0))
    # the median of k points is itself off by ~√(π/2k) σ: widen by it, or a short baseline over-fires
    scale = max(MAD_SCALE * mad, noise) * math.sqrt(1 + math.pi / (2 * len(values)))
    if math.isinf(scale):
        return Verdict(period, None, v, n, median, reason="no volume")
    z = (v - median) / scale
    lower = median - rule.sensitivity * scale if rule.direction in ("both", "down") else None
    upper = median + rule.sensitivity * scale if rule.direction in ("both", "up") else None
    below = lower is not None and v < lower
    above = upper is not None and v > upper
    return Verdict(period, below or above, v, n, median, lower, upper, z,
                   reason="below" if below else "above" if above else "")


# ---- hysteresis --------------------------------------------------------------------------------------

def step(alert: Alert, state: RuleState, verdict: Verdict) -> tuple[RuleState, str | None]:
    """The state after one more closed period (periods come in order), and FIRING / RESOLVED when it
    changes. A period with no verdict leaves the state as it is: it neither extends nor breaks a run."""
    breach = verdict.breach
    if breach is None:
        return replace(state, last=verdict.period), None
    if breach != state.firing:
        streak = state.streak + 1
        if streak >= (alert.fire_after if breach else alert.resolve_after):
            return RuleState(breach, 0, verdict.period, verdict.period), FIRING if breach else RESOLVED
        return replace(state, streak=streak, last=verdict.period), None
    return replace(state, streak=0, last=verdict.period), None


def backtest(alert: Alert, series: Mapping[int, Point], periods: Iterable[int],
             state: RuleState = RuleState()) -> list[tuple[Verdict, str | None]]:
    """Every period's verdict and transition, in order, from `state`."""
    out = []
    for period in periods:
        verdict = evaluate(alert, series, period)
        state, transition = step(alert, state, verdict)
        out.append((verdict, transition))
    return out


def periods_between(alert: Alert, start_ms: int, end_ms: int) -> list[int]:
    """Starts of the periods beginning in [start_ms, end_ms)."""
    size = alert.series.period_ms
    first = alert.series.period_of(start_ms)
    if first < start_ms:
        first += size
    return list(range(first, end_ms, size))


def newest_closed(alert: Alert, complete_through: int) -> int:
    """The newest period whose end plus the grace is at or before `complete_through`, the time up to which
    every input of the series is known to have been processed."""
    return alert.series.period_of(complete_through - alert.grace_ms) - alert.series.period_ms


def closable(alert: Alert, after: int, complete_through: int) -> list[int]:
    """The periods to judge now, in order: those after period `after`, up to the newest closed one."""
    size = alert.series.period_ms
    return list(range(after + size, newest_closed(alert, complete_through) + 1, size))


def describe(alert: Alert) -> str:
    """One line: what the rule watches and when it fires (`flywheel metrics check`, `alerts list`)."""
    s, r = alert.series, alert.rule
    what = {"events": f"events {s.event or 'any'}", "invalid_rate": "invalid rate",
            "funnel": f"funnel {getattr(s.definition, 'name', '')} step {s.step}" + (" conversion" if s.rate else ""),
            "retention": f"retention {getattr(s.definition, 'name', '')} at n={s.n}",
            "active": f"{getattr(s.definition, 'name', '')}", "segment": f"segment {s.segment} size"}[s.kind]
    if s.kind in ("events", "invalid_rate"):
        what += f" from {s.source or 'any source'}"
    bounds = ", ".join(f"{k} {v:g}" for k, v in (("above", r.above), ("below", r.below)) if v is not None)
    if r.kind == "threshold":
        how = f"threshold {bounds}"
    elif r.kind == "relative":
        how = f"change vs {r.vs.replace('_', ' ')} {bounds}"
    else:
        back = f"{r.weeks} weeks" if r.baseline != "previous_periods" else f"{r.periods} periods"
        how = f"anomaly vs {r.baseline.replace('_', ' ')} over {back}, |z| > {r.sensitivity:g} ({r.direction})"
    guard = f", min_count {r.min_count}" if r.min_count else ""
    hooks = f"; notify {', '.join(n.webhook for n in alert.notify)}" if alert.notify else ""
    return (f"{what} per {s.period}: {how}{guard}; fires after {alert.fire_after}, resolves after "
            f"{alert.resolve_after}; grace {alert.grace_ms // 1000} s{hooks}")


# ---- the series' inputs (docs/design.md §10) ------------------------------------------------------------
#
# Each input partition sends its share of a period's value to the rule's evaluator as an absolute value with
# a growing version (a feed record): the ingest stage its counts, the aggregate stage its cells. The evaluator
# sums the newest share of every partition.

GAUGE = 0  # the period of a segment size's shares: the latest counts, whenever it changed
COUNTED = ("events", "invalid_rate")  # counted by the ingest stage, per events.raw partition
KEEP_MS = 2 * DAY_MS  # an ingest partition keeps (and may still update) periods up to this long before its arrivals


def counts_valid(alert: Alert, name: str, source: str) -> bool:
    s = alert.series
    return s.source in (None, source) and (s.kind == "invalid_rate" or s.event in (None, name))


def counts_invalid(alert: Alert, source: str) -> bool:
    return alert.series.kind == "invalid_rate" and alert.series.source in (None, source)


class Tally:
    """An ingest partition's counts for one counted rule: per period, the count (events) or [invalid, total]
    (invalid_rate); `offset`, the last events.raw offset counted (a redelivered record at or below it was
    counted before); `floor`: periods before it are dropped — more than KEEP_MS (or two periods) before the
    arrivals, judged long ago, so a straggler there changes nothing."""

    __slots__ = ("alert", "by_arrival", "rate", "size", "origin", "keep", "offset", "floor", "oldest", "periods",
                 "changed")

    def __init__(self, alert: Alert, data: Mapping[str, Any] | None = None):
        s = alert.series
        self.alert = alert
        self.by_arrival = s.kind == "invalid_rate"  # an invalid event may have no usable time
        self.rate, self.size = s.rate, s.period_ms
        self.origin = s.period_of(0) % self.size  # where periods start (weeks: Mondays)
        self.keep = max(KEEP_MS, 2 * self.size)
        fresh = not data or data.get("version") != alert.version  # a new or changed rule counts from here on
        self.offset: int = -1 if fresh else data["o"]
        self.floor: int = 0 if fresh else data["f"]
        self.periods: dict[int, list[int]] = {} if fresh else {int(k): v for k, v in data["p"].items()}
        self.oldest = min(self.periods, default=math.inf)
        self.changed: set[int] = set()

    def to_json(self) -> dict[str, Any]:
        return {"version": self.alert.version, "o": self.offset, "f": self.floor,
                "p": {str(k): v for k, v in self.periods.items()}}

    def count(self, offset: int, event_ms: int, arrived_ms: int, invalid: bool) -> None:
        """The record at `offset` (valid, or invalid), unless counted before."""
        if offset <= self.offset:
            return  # a redelivery
        self.offset = offset
        floor = arrived_ms - self.keep
        if floor > self.floor:
            self.floor = floor
            if floor > self.oldest:
                for p in [p for p in self.periods if p < floor]:
                    del self.periods[p]
                    self.changed.discard(p)
                self.oldest = min(self.periods, default=math.inf)
        at = arrived_ms if self.by_arrival else event_ms
        period = at - (at - self.origin) % self.size
        if period < self.floor:
            return
        counts = self.periods.get(period)
        if counts is None:
            counts = self.periods[period] = [0, 0] if self.rate else [0]
            self.oldest = min(self.oldest, period)
        if self.rate:
            counts[0] += invalid
            counts[1] += 1
        else:
            counts[0] += 1
        self.changed.add(period)

    def share(self, source: str) -> dict:
        """The changed periods' counts, as a feed record."""
        changed = {p: self.periods[p] for p in sorted(self.changed)}
        return feed_record(self.alert, source, self.offset,
                           {p: {"v": c[0], "b": c[1]} if self.rate else {"v": c[0]} for p, c in changed.items()})


class Counting:
    """The counted rules a record feeds, by (event name, source) for a valid one and by source for an
    invalid one — decided once per pair, as records of one kind come by the thousand."""

    LIMIT = 10_000  # pairs remembered (event names are free text: bounded all the same)

    def __init__(self, alerts: Iterable[Alert]):
        self.alerts = tuple(a for a in alerts if a.series.kind in COUNTED)
        self._valid: dict[tuple[str, str], tuple[Alert, ...]] = {}
        self._invalid: dict[str, tuple[Alert, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.alerts)

    def valid(self, name: str, source: str) -> tuple[Alert, ...]:
        found = self._valid.get((name, source))
        if found is None:
            if len(self._valid) >= self.LIMIT:
                self._valid.clear()
            found = self._valid[(name, source)] = tuple(a for a in self.alerts if counts_valid(a, name, source))
        return found

    def invalid(self, source: str) -> tuple[Alert, ...]:
        found = self._invalid.get(source)
        if found is None:
            if len(self._invalid) >= self.LIMIT:
                self._invalid.clear()
            found = self._invalid[source] = tuple(a for a in self.alerts if counts_invalid(a, source))
        return found


CellKey = tuple  # (definition, step | n) or (window,)


def cell_index(alerts: Iterable[Alert]) -> dict[CellKey, list[tuple[Alert, str]]]:
    """The cells rules read, by (definition, step or n) — (window,) for active users — → (rule, role): "v"
    the value, "b" the base of a rate (step 1, the cohort)."""
    index: dict[CellKey, list[tuple[Alert, str]]] = {}
    for a in alerts:
        s = a.series
        if s.kind == "funnel":
            index.setdefault((s.definition, s.step), []).append((a, "v"))
            if s.rate:
                index.setdefault((s.definition, 1), []).append((a, "b"))
        elif s.kind == "retention":
            index.setdefault((s.definition, s.n), []).append((a, "v"))
            index.setdefault((s.definition, 0), []).append((a, "b"))
        elif s.kind == "active":
            index.setdefault((s.definition,), []).append((a, "v"))
    return index


def cell_feeds(index: Mapping[CellKey, list[tuple[Alert, str]]], cell: tuple) -> list[tuple[Alert, str, int]]:
    """(rule, role, period start ms) for every rule a cell (metrics/cells.py) feeds."""
    if len(cell) == 2:
        head, day = cell
        return [(a, role, day * DAY_MS) for a, role in index.get((head,), ())]
    head, first, k = cell[:3]
    out = []
    for a, role in index.get((head, k), ()):
        if a.series.kind == "retention":  # the cohort's rate at n, judged in its n-th period
            out.append((a, role, (first + a.series.n * head.period_days) * DAY_MS))
        else:
            out.append((a, role, first * DAY_MS))
    return out


def feed_record(alert: Alert, source: str, version: int, periods: Mapping[int, Mapping[str, float]]) -> dict:
    """An input partition's shares of a rule's periods: per period start, {"v": value} and/or {"b": base} —
    one record per rule and batch. `source` names the input partition ("i3": events.raw 3, "a3":
    events.identified 3); `version` grows per source."""
    return {"t": "share", "rule": alert.name, "version": alert.version, "src": source, "ver": version,
            "periods": {str(p): dict(v) for p, v in periods.items()}}


def progress_record(stage: str, partition: int, of: int, through: int) -> dict:
    """Stage `stage` has handled every record of its input partition `partition` (of `of`) that came before
    the progress marker of time `through` (runtime/ticker.py)."""
    return {"t": "progress", "stage": stage, "partition": partition, "of": of, "through": through}


def stage_of(alert: Alert) -> str:
    """The stage whose progress closes the rule's periods (its inputs': the aggregate's follow the ingest's)."""
    return "ingest" if alert.series.kind in COUNTED else "aggregate"


def point(alert: Alert, shares: Mapping[str, Mapping[str, list]]) -> Point:
    """A period's point from the partitions' shares ({source: {"v": [value, version], "b": [...]}})."""
    value = sum(s["v"][0] for s in shares.values() if "v" in s)
    if not alert.series.rate:
        return Point(value, value)
    base = sum(s["b"][0] for s in shares.values() if "b" in s)
    return Point(value / base if base else 0.0, base)


def history_points(alert: Alert, rows: Iterable[tuple], start_ms: int, end_ms: int) -> dict[int, Point]:
    """The series over [start_ms, end_ms) from oracle.alert_series_sql's rows (period, value, base); a period
    without a row had nothing (a zero, or a rate over nothing)."""
    got = {int(p): (float(v), float(b)) for p, v, b in rows}
    out = {}
    for period in periods_between(alert, start_ms, end_ms):
        v, b = got.get(period, (0.0, 0.0))
        out[period] = Point(v / b if b else 0.0, b) if alert.series.rate else Point(v, v)
    return out


# ---- the records ---------------------------------------------------------------------------------------

def idempotency_key(alert: Alert, transition: str, period: int) -> str:
    """The same for every delivery of one transition (a redelivery, a replay after a crash)."""
    return hashlib.sha256(f"{alert.name}|{alert.version}|{transition}|{period}".encode()).hexdigest()[:32]


def transition_record(alert: Alert, transition: str, verdict: Verdict, *, state: RuleState, decided_at: int,
                      late: bool) -> dict[str, Any]:
    """A transition as published to the alerts topic and stored in alert_events (README, "Alerts")."""
    s = alert.series
    series = {"kind": s.kind, "period": s.period}
    for key, value in (("event", s.event), ("source", s.source), ("step", s.step or None), ("n", s.n or None),
                       ("segment", s.segment), ("definition", s.definition.name if s.definition else None)):
        if value is not None:
            series[key] = value
    if s.rate:
        series["rate"] = True
    return {
        "alert": alert.name, "version": alert.version, "state": transition,
        "idempotencyKey": idempotency_key(alert, transition, verdict.period),
        "period": iso_ms(verdict.period), "periodEnd": iso_ms(verdict.period + s.period_ms),
        "since": iso_ms(state.since) if state.since is not None else None,
        "value": verdict.value, "count": verdict.count, "baseline": verdict.baseline,
        "lower": verdict.lower, "upper": verdict.upper, "score": verdict.score, "reason": verdict.reason,
        "rule": alert.rule.kind, "series": series, "decidedAt": iso_ms(decided_at), "late": late,
    }


def text(record: Mapping[str, Any]) -> str:
    """One line for people (a Slack-compatible `text`)."""
    icon = ":rotating_light:" if record["state"] == FIRING else ":white_check_mark:"
    value = record["value"]
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    bounds = []
    if record.get("lower") is not None:
        bounds.append(f"lower {record['lower']:.4g}")
    if record.get("upper") is not None:
        bounds.append(f"upper {record['upper']:.4g}")
    if record.get("baseline") is not None:
        bounds.append(f"baseline {record['baseline']:.4g}")
    late = " (late)" if record.get("late") else ""
    return (f"{icon} {record['alert']} {record['state']}{late}: {shown} for the {record['series']['period']} from "
            f"{record['period']}" + (f" ({', '.join(bounds)})" if bounds else ""))
