"""The metrics file (FLYWHEEL_METRICS) compiled into the definitions registry (docs/design.md §8).

Shape, YAML:

    lateness: 7d                       # optional; default 7d (docs/design.md §4)
    close_after: 30d                   # optional; cells stay re-derivable this long (partials.py)
    activity:                          # optional: which calls make a person active (default below)
      types: [track, page, screen]     # message types; identify, alias, group are not activity
      exclude_events: [Email Opened]   # event names that are no activity either
    funnels:
      - name: checkout
        window: 6h                     # s, m, h, d
        steps:
          - event: Product Viewed
          - event: Product Added
            where: {category: shoes}   # property equality; string, number or boolean values
          - event: Order Completed
    retention:
      - name: new_users
        cohort_event: any              # 'any' = first activity event, or an event name
        return_event: any
        period: day                    # day | week (weeks start on Monday, UTC)
        horizon: 14                    # periods after the cohort's

Errors name the file and the place (`funnels[0].steps[2].where.category: ...`), so an operator can fix
the file without reading code.

The registry is keyed by name and version. A definition's version is a digest of what it means (steps,
window, period, …), so an edit makes a new version and an unchanged definition keeps its version
whatever else the file holds. Conditions (an event name plus property filters) are `Predicate`s,
identified by a digest of their content too: the person state keeps its history per predicate id, so
adding, changing or removing one definition leaves every other definition's state as it was.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.model.clock import DAY_MS
from flywheel.model.envelope import MESSAGE_TYPES

ANY = "any"
MAX_STEPS = 32  # ClickHouse windowFunnel takes at most 32 conditions; the oracle must be able to run
MAX_HORIZON = 31  # retention(...) takes at most 32 conditions: the cohort + 31 periods
MAX_FUNNEL_CONDITIONS = 63  # a funnel event's conditions are bits of a signed 64-bit integer (person.py)

_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


class MetricsError(ValueError):
    """The metrics file is wrong; the message names the file and the place."""


def parse_duration_ms(value: Any) -> int:
    """'6h' → 21 600 000. A bare integer is seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30m, 6h or 7d")
    if isinstance(value, int):
        return value * 1000
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration: use a number and a unit s, m, h or d (e.g. 6h)")
    return int(m.group(1)) * _UNITS_MS[m.group(2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepSpec(_Strict):
    event: str = Field(min_length=1)
    where: dict[str, str | bool | int | float] = Field(default_factory=dict)

    @field_validator("where")
    @classmethod
    def _no_empty(cls, v: dict) -> dict:
        for key in v:
            if not key:
                raise ValueError("an empty property name")
        return v


class FunnelSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    window: str | int
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("window")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if parse_duration_ms(v) <= 0:
            raise ValueError("the window must be positive")
        return v


class RetentionSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    cohort_event: str = Field(ANY, min_length=1)
    return_event: str = Field(ANY, min_length=1)
    period: str = "day"
    horizon: int = Field(ge=1, le=MAX_HORIZON)

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        if v not in ("day", "week"):
            raise ValueError("period must be day or week")
        return v


ACTIVITY_TYPES = ("track", "page", "screen")


class ActivitySpec(_Strict):
    types: list[str] = Field(default_factory=lambda: list(ACTIVITY_TYPES), min_length=1)
    exclude_events: list[str] = Field(default_factory=list)

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(MESSAGE_TYPES))
        if unknown:
            raise ValueError(f"unknown message type(s) {unknown}: use {', '.join(sorted(MESSAGE_TYPES))}")
        return v


class MetricsSpec(_Strict):
    lateness: str | int = "7d"
    close_after: str | int = "30d"
    activity: ActivitySpec = Field(default_factory=ActivitySpec)
    funnels: list[FunnelSpec] = Field(default_factory=list)
    retention: list[RetentionSpec] = Field(default_factory=list)

    @field_validator("lateness", "close_after")
    @classmethod
    def _lateness(cls, v: Any) -> Any:
        if parse_duration_ms(v) < 0:
            raise ValueError("lateness cannot be negative")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> MetricsSpec:
        for kind, items in (("funnels", self.funnels), ("retention", self.retention)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: duplicate name(s) {dupes}")
        return self


# ---- compiled form: the registry ---------------------------------------------------------------

def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


# Compiled definitions compare and hash by identity (eq=False): metric cells are keyed by them, and the
# registry holds one object per (name, version) and per predicate id.

@dataclass(frozen=True, slots=True)
class Activity:
    """Which calls make a person active (docs/design.md §4): events of these message types, but for the
    excluded event names. identify, alias and group link ids and carry traits: activity by nobody's
    definition (a nightly trait sync would make every synced person active)."""

    types: frozenset[str]
    exclude_events: frozenset[str]

    def matches(self, mtype: str, event_name: str) -> bool:
        return mtype in self.types and event_name not in self.exclude_events


@dataclass(frozen=True, slots=True, eq=False)
class Predicate:
    """A condition on an event: its name and property equality filters, or (event None) any activity event
    (the metrics file's activity rule)."""

    pid: str  # digest of what it means: the same condition has the same id in any file
    event: str | None
    where: tuple[tuple[str, Any], ...] = ()
    activity: Activity | None = None  # for event None

    def matches(self, mtype: str, event_name: str, properties: dict[str, Any]) -> bool:
        if self.event is None:
            return self.activity is not None and self.activity.matches(mtype, event_name)
        if event_name != self.event:
            return False
        for key, want in self.where:
            if not same_json_value(properties.get(key, _MISSING), want):
                return False
        return True


_MISSING = object()


def same_json_value(got: Any, want: Any) -> bool:
    """Equality as the SQL oracle sees it: a string matches a string, a boolean a boolean, a number a number."""
    if isinstance(want, bool):
        return isinstance(got, bool) and got is want
    if isinstance(want, str):
        return isinstance(got, str) and got == want
    return isinstance(got, int | float) and not isinstance(got, bool) and float(got) == float(want)


@dataclass(frozen=True, slots=True, eq=False)
class Funnel:
    name: str
    version: str
    window_ms: int
    steps: tuple[Predicate, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Retention:
    name: str
    version: str
    cohort: Predicate
    returning: Predicate
    period: str  # day | week
    horizon: int

    @property
    def period_days(self) -> int:
        return 7 if self.period == "week" else 1

    def period_of(self, day: int) -> int:
        """Day number (days since 1970-01-01) → the first day of its period (weeks start on Monday)."""
        if self.period == "day":
            return day
        return day - (day + 3) % 7  # 1970-01-01 was a Thursday


@dataclass(frozen=True, slots=True, eq=False)
class ActiveWindow:
    """Active users over the `days` days ending on a day: dau 1, wau 7, mau 30."""

    name: str
    days: int


DAU, WAU, MAU = ActiveWindow("dau", 1), ActiveWindow("wau", 7), ActiveWindow("mau", 30)
ACTIVE_WINDOWS = (DAU, WAU, MAU)


@dataclass(frozen=True, slots=True)
class Metrics:
    """The definitions registry: every definition by (name, version), the predicates they use, and what
    the person state needs to know of them."""

    funnels: tuple[Funnel, ...]
    retention: tuple[Retention, ...]
    lateness_ms: int
    close_after_ms: int
    activity: Activity = Activity(frozenset(ACTIVITY_TYPES), frozenset())

    # Derived once (read per event on the hot path).
    predicates: tuple[Predicate, ...] = field(init=False)
    funnel_pids: frozenset[str] = field(init=False)  # predicates of funnel steps: their events are kept
    cohort_pids: frozenset[str] = field(init=False)
    return_pids: frozenset[str] = field(init=False)
    lateness_days: int = field(init=False)
    reach_days: int = field(init=False)
    horizon_days: int = field(init=False)
    _by_event: dict[str, tuple[Predicate, ...]] = field(init=False)
    _any_event: tuple[Predicate, ...] = field(init=False)
    _by_ref: dict[str, Funnel | Retention] = field(init=False)

    def __post_init__(self) -> None:
        unique: dict[str, Predicate] = {}
        for f in self.funnels:
            for step in f.steps:
                unique.setdefault(step.pid, step)
        for r in self.retention:
            unique.setdefault(r.cohort.pid, r.cohort)
            unique.setdefault(r.returning.pid, r.returning)
        predicates = tuple(unique.values())
        by_event: dict[str, list[Predicate]] = {}
        for p in predicates:
            if p.event is not None:
                by_event.setdefault(p.event, []).append(p)
        lateness_days = -(-self.lateness_ms // DAY_MS)
        # How many days before an event's day its effects can reach (state is bounded by the longest
        # window plus lateness): a funnel chain started up to a window earlier, the MAU of the next 29
        # days, the period the event returns in.
        longest = max((-(-f.window_ms // DAY_MS) for f in self.funnels), default=0)
        period = max((r.period_days for r in self.retention), default=1)
        reach_days = max(MAU.days - 1, longest + 1, period)
        # Days of history a person keeps before its newest event: lateness, the reach of its effects, and
        # close_after — how far a partition's newest event may run ahead of a person's (consumption skew
        # across raw partitions, a backfill) before that person's old cells close (partials.py).
        horizon_days = lateness_days + -(-self.close_after_ms // DAY_MS) + reach_days + 1
        derived = {
            "predicates": predicates,
            "funnel_pids": frozenset(s.pid for f in self.funnels for s in f.steps),
            "cohort_pids": frozenset(r.cohort.pid for r in self.retention),
            "return_pids": frozenset(r.returning.pid for r in self.retention),
            "lateness_days": lateness_days, "reach_days": reach_days, "horizon_days": horizon_days,
            "_by_event": {name: tuple(ps) for name, ps in by_event.items()},
            "_any_event": tuple(p for p in predicates if p.event is None),
            "_by_ref": {ref(d): d for d in (*self.funnels, *self.retention)},
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def matching(self, event_name: str, properties: dict[str, Any], mtype: str = "track") -> list[Predicate]:
        """The predicates an event (of message type `mtype`) satisfies."""
        return [p for p in (*self._by_event.get(event_name, ()), *self._any_event)
                if p.matches(mtype, event_name, properties)]

    def by_ref(self, reference: str) -> Funnel | Retention | None:
        """The definition `name@version`, if the registry holds it."""
        return self._by_ref.get(reference)


def ref(definition: Funnel | Retention) -> str:
    """A definition's registry key: name@version."""
    return f"{definition.name}@{definition.version}"


def compile_metrics(spec: MetricsSpec) -> Metrics:
    index: dict[str, Predicate] = {}
    activity = Activity(frozenset(spec.activity.types), frozenset(spec.activity.exclude_events))

    def predicate(event: str | None, where: dict[str, Any]) -> Predicate:
        conditions = tuple(sorted(where.items()))
        if event is None:  # any activity event: its id follows the activity rule
            pid = _digest("activity", sorted(activity.types), sorted(activity.exclude_events))
            return index.setdefault(pid, Predicate(pid, None, (), activity))
        pid = _digest(event, tuple((k, type(v).__name__, v) for k, v in conditions))
        return index.setdefault(pid, Predicate(pid, event, conditions))

    funnels = []
    for f in spec.funnels:
        window_ms = parse_duration_ms(f.window)
        steps = tuple(predicate(s.event, s.where) for s in f.steps)
        funnels.append(Funnel(f.name, _digest("funnel", window_ms, [s.pid for s in steps]), window_ms, steps))
    retention = []
    for r in spec.retention:
        cohort = predicate(None if r.cohort_event == ANY else r.cohort_event, {})
        returning = predicate(None if r.return_event == ANY else r.return_event, {})
        version = _digest("retention", cohort.pid, returning.pid, r.period, r.horizon)
        retention.append(Retention(r.name, version, cohort, returning, r.period, r.horizon))
    return Metrics(tuple(funnels), tuple(retention), parse_duration_ms(spec.lateness),
                   parse_duration_ms(spec.close_after), activity)


def legacy_bits(metrics: Metrics) -> tuple[Predicate, ...]:
    """The predicates in the order of the bits of a first-format person state (written before the
    registry, by 7ae8eae and earlier): positions given by first appearance in the metrics file — funnel
    steps, then each retention's cohort and return conditions. Such a state is read with the current
    file's positions, as it always was (docs/design.md §8)."""
    seen: dict[tuple, Predicate] = {}
    for f in metrics.funnels:
        for s in f.steps:
            seen.setdefault((s.event, s.where), s)
    for r in metrics.retention:
        seen.setdefault((r.cohort.event, r.cohort.where), r.cohort)
        seen.setdefault((r.returning.event, r.returning.where), r.returning)
    return tuple(seen.values())


def load_metrics(path: Path | None) -> Metrics:
    """Read and validate a metrics file; None = no metrics (the aggregates stage does nothing)."""
    if path is None:
        return compile_metrics(MetricsSpec())
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such metrics file (FLYWHEEL_METRICS)") from None
    except yaml.YAMLError as exc:
        raise MetricsError(f"{path}: not valid YAML: {exc}") from None
    return parse_metrics(raw if raw is not None else {}, source=str(path))


def parse_metrics(data: Any, *, source: str = "<metrics>") -> Metrics:
    if not isinstance(data, dict):
        raise MetricsError(f"{source}: expected a mapping with `funnels:` and/or `retention:`")
    try:
        spec = MetricsSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _place(err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise MetricsError(f"{source}: invalid metric definitions:\n" + "\n".join(lines)) from None
    metrics = compile_metrics(spec)
    if len(metrics.funnel_pids) > MAX_FUNNEL_CONDITIONS:
        raise MetricsError(f"{source}: {len(metrics.funnel_pids)} distinct funnel step conditions; "
                           f"at most {MAX_FUNNEL_CONDITIONS}")
    return metrics


def _place(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
