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
    segments:                          # groups of persons, live (metrics/segments.py)
      - name: browsers_not_buyers
        all:                           # all | any, nestable
          - performed: Product Viewed  # an event name, or 'any' (an activity event)
            where: {category: shoes}
            count: {gte: 3}            # gte | lte | eq; default gte 1
            within: 7d                 # relative to now; required
          - not_performed: Order Completed
            within: 30d
          - trait: {plan: pro}         # the person's latest identify traits
        universe: all                  # optional; default: persons active within the longest window
    churn_risk: {active_within: 28d, silent_for: 14d}   # a segment named churn_risk
    lifecycle: {period: day}           # new / returning / resurrecting / dormant per period

Errors name the file and the place (`funnels[0].steps[2].where.category: ...`), so an operator can fix
the file without reading code.

The registry is keyed by name and version. A definition's version is a digest of what it means (steps,
window, period, …), so an edit makes a new version and an unchanged definition keeps its version
whatever else the file holds. Conditions (an event name plus property filters) are `Predicate`s,
identified by a digest of their content too: the person state keeps its history per predicate id, so
adding, changing or removing one definition leaves every other definition's state as it was.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _day_or_week(v: str) -> str:
    if v not in ("day", "week"):
        raise ValueError("period must be day or week")
    return v


def _not_negative(v: str | int) -> str | int:
    if parse_duration_ms(v) < 0:
        raise ValueError("a duration must not be negative")
    return v


Period = Annotated[str, AfterValidator(_day_or_week)]
Duration = Annotated[str | int, AfterValidator(_not_negative)]  # s, m, h, d (a bare number: seconds), ≥ 0
Name = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]  # of a definition


class _Strict(BaseModel):
    # no NaN or infinity: a property value that JSON cannot carry would not survive the definitions store
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    name: Name
    window: str | int
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("window")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if parse_duration_ms(v) <= 0:
            raise ValueError("the window must be positive")
        return v


class RetentionSpec(_Strict):
    name: Name
    cohort_event: str = Field(ANY, min_length=1)
    return_event: str = Field(ANY, min_length=1)
    period: Period = "day"
    horizon: int = Field(ge=1, le=MAX_HORIZON)


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


MAX_SEGMENT_WINDOW_MS = 400 * DAY_MS  # a window's events are kept in the person state (docs/design.md §9)
MAX_COUNT = 100  # a count condition keeps that many event times per person


def _window(v: str | int) -> str | int:
    if not 0 < parse_duration_ms(v) <= MAX_SEGMENT_WINDOW_MS:
        raise ValueError(f"must be positive and at most {MAX_SEGMENT_WINDOW_MS // DAY_MS}d")
    return v


Window = Annotated[str | int, AfterValidator(_window)]  # a window the person state keeps events for


class CountSpec(_Strict):
    gte: int | None = Field(None, ge=0, le=MAX_COUNT)
    lte: int | None = Field(None, ge=0, le=MAX_COUNT)
    eq: int | None = Field(None, ge=0, le=MAX_COUNT)

    @model_validator(mode="after")
    def _one(self) -> CountSpec:
        given = [k for k in ("gte", "lte", "eq") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of gte, lte, eq (e.g. count: {gte: 3})")
        return self


_KINDS = ("performed", "not_performed", "trait", "all", "any")


class ConditionSpec(_Strict):
    """One condition of a segment: exactly one of the kinds in _KINDS."""

    performed: str | None = Field(None, min_length=1)
    not_performed: str | None = Field(None, min_length=1)
    trait: dict[str, str | bool | int | float] | None = None
    all: list[ConditionSpec] | None = Field(None, min_length=1)
    any: list[ConditionSpec] | None = Field(None, min_length=1)
    where: dict[str, str | bool | int | float] = Field(default_factory=dict)
    count: CountSpec | None = None
    within: str | int | None = None

    @model_validator(mode="after")
    def _shape(self) -> ConditionSpec:
        kinds = [k for k in _KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a condition has exactly one of {', '.join(_KINDS)}; got {kinds or 'none'}")
        kind = kinds[0]
        if kind in ("performed", "not_performed"):
            if self.within is None:
                raise ValueError(f"{kind}: `within` is required (e.g. within: 7d): membership is relative to now")
            ms = parse_duration_ms(self.within)
            if not 0 < ms <= MAX_SEGMENT_WINDOW_MS:
                raise ValueError(f"within must be positive and at most {MAX_SEGMENT_WINDOW_MS // DAY_MS}d")
            if kind == "not_performed" and self.count is not None:
                raise ValueError("not_performed takes no count (use performed with count: {lte: N})")
            if "" in self.where:
                raise ValueError("where: an empty property name")
        elif self.where or self.count is not None or self.within is not None:
            raise ValueError(f"where, count and within belong to performed / not_performed, not to {kind}")
        if kind == "trait" and (not self.trait or "" in self.trait):
            raise ValueError("trait: give at least one trait name and value (e.g. trait: {plan: pro})")
        return self


class UniverseSpec(_Strict):
    active_within: Window


class SegmentSpec(_Strict):
    name: Name
    all: list[ConditionSpec] | None = Field(None, min_length=1)
    any: list[ConditionSpec] | None = Field(None, min_length=1)
    universe: str | UniverseSpec | None = None

    @model_validator(mode="after")
    def _shape(self) -> SegmentSpec:
        if (self.all is None) == (self.any is None):
            raise ValueError("a segment has exactly one of `all` or `any` (a list of conditions)")
        if isinstance(self.universe, str) and self.universe != "all":
            raise ValueError("universe: `all`, or {active_within: 90d}")
        return self


class ChurnRiskSpec(_Strict):
    name: Name = "churn_risk"
    active_within: str | int
    silent_for: str | int

    @model_validator(mode="after")
    def _windows(self) -> ChurnRiskSpec:
        for what in ("active_within", "silent_for"):
            if parse_duration_ms(getattr(self, what)) <= 0:
                raise ValueError(f"{what} must be positive")
        if parse_duration_ms(self.active_within) + parse_duration_ms(self.silent_for) > MAX_SEGMENT_WINDOW_MS:
            raise ValueError(f"active_within + silent_for must be at most {MAX_SEGMENT_WINDOW_MS // DAY_MS}d")
        return self


class RfmSpec(_Strict):
    event: str = Field(min_length=1)  # the order event
    monetary: str = Field(min_length=1)  # its numeric property summed
    window: Window = "365d"
    refresh: str | int = "60s"  # how often the scores are computed again (docs/design.md §9)

    @field_validator("refresh")
    @classmethod
    def _refresh(cls, v: Any) -> Any:
        if parse_duration_ms(v) < 1000:
            raise ValueError("refresh must be at least 1s")
        return v


class LifecycleSpec(_Strict):
    period: Period = "day"


# ---- alerts (metrics/alerts.py) -------------------------------------------------------------------

ALERT_PERIODS = ("hour", "day", "week")
ACTIVE_KINDS = ("dau", "wau", "mau")


class AlertSeriesSpec(_Strict):
    """What a rule watches: exactly one of events / invalid_rate / funnel / retention / active / segment."""

    events: str | None = Field(None, min_length=1)  # an event name, or 'any' (every valid event)
    invalid_rate: bool = False  # invalid / (valid + invalid) by arrival time
    source: str | None = Field(None, min_length=1)  # with events / invalid_rate: one source, or 'any'
    funnel: str | None = None
    step: int | None = Field(None, ge=1, le=MAX_STEPS)  # persons reaching this step (1 = the first)
    rate: bool = False  # with funnel: conversion from step 1
    retention: str | None = None
    n: int | None = Field(None, ge=1, le=MAX_HORIZON)  # with retention: the rate returning n periods later
    active: str | None = None  # dau | wau | mau
    segment: str | None = None  # its size at the period's close
    period: str | None = None  # hour | day | week; default hour for events/invalid_rate/segment, else day

    @model_validator(mode="after")
    def _one(self) -> AlertSeriesSpec:
        kinds = [k for k in ("events", "invalid_rate", "funnel", "retention", "active", "segment")
                 if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("give exactly one of events, invalid_rate, funnel, retention, active, segment"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        kind = kinds[0]
        if self.source is not None and kind not in ("events", "invalid_rate"):
            raise ValueError("source applies to events and invalid_rate series only")
        if (self.step is not None or self.rate) and kind != "funnel":
            raise ValueError("step and rate apply to funnel series only")
        if kind == "funnel" and self.step is None:
            raise ValueError("a funnel series needs step (1 = the first)")
        if (self.n is None) != (kind != "retention"):
            raise ValueError("n (periods after the cohort's) goes with retention series, and only there")
        if kind == "active" and self.active not in ACTIVE_KINDS:
            raise ValueError(f"active must be one of {', '.join(ACTIVE_KINDS)}")
        if self.period is not None and self.period not in ALERT_PERIODS:
            raise ValueError(f"period must be one of {', '.join(ALERT_PERIODS)}")
        if kind in ("funnel", "active") and self.period not in (None, "day"):
            raise ValueError(f"{kind} series are daily: period must be day")
        return self


class _Bounds(_Strict):
    above: float | None = None
    below: float | None = None
    min_count: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _some(self) -> _Bounds:
        if self.above is None and self.below is None:
            raise ValueError("give above, below or both")
        return self


class ThresholdSpec(_Bounds):
    pass


class RelativeSpec(_Bounds):
    vs: str = "previous_period"  # previous_period | last_week (the same period a week before)

    @field_validator("vs")
    @classmethod
    def _vs(cls, v: str) -> str:
        if v not in ("previous_period", "last_week"):
            raise ValueError("vs must be previous_period or last_week")
        return v


ANOMALY_BASELINES = ("same_hour_of_week", "same_weekday", "previous_periods")


class AnomalySpec(_Strict):
    baseline: str = "previous_periods"
    weeks: int = Field(4, ge=1, le=12)  # seasonal baselines: the same slot this many weeks back
    periods: int = Field(12, ge=3, le=168)  # previous_periods: this many periods back
    sensitivity: float = Field(3.5, gt=0)  # robust z beyond which a period breaches
    direction: str = "both"  # both | up | down
    min_count: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> AnomalySpec:
        if self.baseline not in ANOMALY_BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(ANOMALY_BASELINES)}")
        if self.direction not in ("both", "up", "down"):
            raise ValueError("direction must be both, up or down")
        return self


class RuleSpec(_Strict):
    threshold: ThresholdSpec | None = None
    relative: RelativeSpec | None = None
    anomaly: AnomalySpec | None = None
    min_count: int | None = Field(None, ge=0)  # no verdict on a period of less volume (events, or a rate's base)
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the sample-size bounds (Wilson for rates, Poisson for counts)

    @model_validator(mode="after")
    def _one(self) -> RuleSpec:
        if sum(k is not None for k in (self.threshold, self.relative, self.anomaly)) != 1:
            raise ValueError("give exactly one of threshold, relative, anomaly")
        return self


class NotifySpec(_Strict):
    webhook: str = Field(min_length=1)  # must be allowed by FLYWHEEL_ALERT_WEBHOOKS (runtime/webhooks.py)
    secret_env: str | None = Field(None, min_length=1)  # env var holding the HMAC-SHA256 secret
    slack: bool = False  # add a Slack-compatible `text` to the JSON body


class AlertSpec(_Strict):
    name: Name
    series: AlertSeriesSpec
    rule: RuleSpec
    fire_after: int = Field(1, ge=1, le=100)  # consecutive breaching periods
    resolve_after: int = Field(1, ge=1, le=100)  # consecutive clear periods
    grace: Duration = "2m"  # a period closes this long after its end, once every input has caught up
    late_after: Duration = "30m"  # a transition decided later than this after the close is marked late
    notify: list[NotifySpec] = Field(default_factory=list)


# ---- experiments (metrics/results.py; docs/design.md §11) ---------------------------------------------

Where = dict[str, str | bool | int | float]


class ExposureSpec(_Strict):
    """Segment's A/B spec: an `Experiment Viewed` track call with the experiment's and the variation's ids."""

    event: str = Field("Experiment Viewed", min_length=1)
    experiment_id: str = Field(min_length=1)
    experiment_property: str = Field("experiment_id", min_length=1)
    variation_property: str = Field("variation_id", min_length=1)


class EventSpec(_Strict):
    event: str = Field(min_length=1)
    where: Where = Field(default_factory=dict)


class SumOfSpec(EventSpec):
    property: str = Field(min_length=1)  # a numeric property, summed (money: in minor units, exactly)


MAX_CUPED_MS = 30 * DAY_MS  # within the history every person state keeps (the horizon is longer)


class WithinSpec(_Strict):
    within: Window  # after the person's first exposure, in event time


class ConversionSpec(EventSpec, WithinSpec):
    pass


class CountOfSpec(EventSpec, WithinSpec):
    pass


class SumSpec(SumOfSpec, WithinSpec):
    pass


class PartSpec(_Strict):
    """A ratio's numerator or denominator: a count of events, or a sum of a property."""

    count: str | None = Field(None, min_length=1)
    sum: SumOfSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> PartSpec:
        if (self.count is None) == (self.sum is None):
            raise ValueError("give exactly one of count (an event name) or sum ({event, property})")
        return self


class RatioSpec(WithinSpec):
    numerator: PartSpec
    denominator: PartSpec


class ExperimentMetricSpec(_Strict):
    name: Name
    conversion: ConversionSpec | None = None
    count: CountOfSpec | None = None
    sum: SumSpec | None = None
    ratio: RatioSpec | None = None
    higher_is_better: bool = True

    @model_validator(mode="after")
    def _one(self) -> ExperimentMetricSpec:
        if sum(x is not None for x in (self.conversion, self.count, self.sum, self.ratio)) != 1:
            raise ValueError("give exactly one of conversion, count, sum, ratio")
        return self


class ExperimentSpec(_Strict):
    name: Name
    exposure: ExposureSpec
    variations: dict[str, float] = Field(min_length=2)  # name → expected share (the sample-ratio check)
    control: str
    metrics: list[ExperimentMetricSpec] = Field(min_length=1)
    guardrails: list[str] = Field(default_factory=list)
    min_sample: int = Field(100, ge=2)  # exposed persons per variation before any result is shown
    # CUPED: each metric's own value over this long before the exposure is the covariate (ratio metrics: none)
    cuped: Duration | None = None

    @model_validator(mode="after")
    def _shape(self) -> ExperimentSpec:
        if self.cuped is not None and not 0 < parse_duration_ms(self.cuped) <= MAX_CUPED_MS:
            raise ValueError(f"cuped: the lookback must be positive and at most {MAX_CUPED_MS // DAY_MS}d (the "
                             "person state keeps about a month before its newest event)")
        if any(w <= 0 for w in self.variations.values()):
            raise ValueError("variations: every share must be positive")
        if not 0.99 <= sum(self.variations.values()) <= 1.01:
            raise ValueError(f"variations: the shares sum to {sum(self.variations.values()):g}, not 1")
        if self.control not in self.variations:
            raise ValueError(f"control: {self.control!r} is not one of the variations {sorted(self.variations)}")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"metrics: duplicate name(s) {sorted({n for n in names if names.count(n) > 1})}")
        unknown = sorted(set(self.guardrails) - set(names))
        if unknown:
            raise ValueError(f"guardrails: {unknown} are not metrics of the experiment")
        return self


class MetricsSpec(_Strict):
    lateness: Duration = "7d"
    close_after: Duration = "30d"
    activity: ActivitySpec = Field(default_factory=ActivitySpec)
    funnels: list[FunnelSpec] = Field(default_factory=list)
    retention: list[RetentionSpec] = Field(default_factory=list)
    segments: list[SegmentSpec] = Field(default_factory=list)
    churn_risk: ChurnRiskSpec | None = None
    lifecycle: LifecycleSpec | None = None
    rfm: RfmSpec | None = None
    alerts: list[AlertSpec] = Field(default_factory=list)
    experiments: list[ExperimentSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> MetricsSpec:
        segments = [*self.segments, *([self.churn_risk] if self.churn_risk else [])]
        for kind, items in (("funnels", self.funnels), ("retention", self.retention), ("segments", segments),
                            ("alerts", self.alerts), ("experiments", self.experiments)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: duplicate name(s) {dupes}")
        for i, alert in enumerate(self.alerts):
            problem = _alert_problem(alert, self, {s.name for s in segments})
            if problem:
                raise ValueError(f"alerts[{i}] ({alert.name}): {problem}")
        return self


def _alert_problem(alert: AlertSpec, spec: MetricsSpec, segments: set[str]) -> str | None:
    """What is wrong with an alert's references to the rest of the file, if anything."""
    series, rule = alert.series, alert.rule
    if series.funnel is not None:
        funnel = next((f for f in spec.funnels if f.name == series.funnel), None)
        if funnel is None:
            return f"series.funnel: no funnel named {series.funnel!r}"
        if series.step > len(funnel.steps):
            return f"series.step: funnel {funnel.name!r} has {len(funnel.steps)} steps"
    if series.retention is not None:
        retention = next((r for r in spec.retention if r.name == series.retention), None)
        if retention is None:
            return f"series.retention: no retention named {series.retention!r}"
        if series.n > retention.horizon:
            return f"series.n: retention {retention.name!r} has a horizon of {retention.horizon}"
        if series.period not in (None, retention.period):
            return f"series.period: retention {retention.name!r} is counted per {retention.period}"
    if series.segment is not None and series.segment not in segments:
        return f"series.segment: no segment named {series.segment!r}"
    period = alert_period(series, spec)
    if rule.anomaly is not None:
        wanted = {"same_hour_of_week": "hour", "same_weekday": "day"}.get(rule.anomaly.baseline)
        if wanted is not None and period != wanted:
            return f"rule.anomaly.baseline: {rule.anomaly.baseline} needs period {wanted} (the series is per {period})"
    for notify in alert.notify:
        if not notify.webhook.startswith(("http://", "https://")):
            return f"notify: webhook {notify.webhook!r} is not an http(s) URL"
    return None


def alert_period(series: AlertSeriesSpec, spec: MetricsSpec) -> str:
    if series.period is not None:
        return series.period
    if series.retention is not None:
        return next(r.period for r in spec.retention if r.name == series.retention)
    return "day" if series.funnel is not None or series.active is not None else "hour"


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


class Periodic:
    """A definition counted per `period`, day or week (weeks start on Monday, UTC)."""

    __slots__ = ()

    @property
    def period_days(self) -> int:
        return 7 if self.period == "week" else 1

    def period_of(self, day: int) -> int:
        """Day number (days since 1970-01-01) → the first day of its period."""
        if self.period == "day":
            return day
        return day - (day + 3) % 7  # 1970-01-01 was a Thursday


@dataclass(frozen=True, slots=True, eq=False)
class Retention(Periodic):
    name: str
    version: str
    cohort: Predicate
    returning: Predicate
    period: str  # day | week
    horizon: int


@dataclass(frozen=True, slots=True, eq=False)
class ActiveWindow:
    """Active users over the `days` days ending on a day: dau 1, wau 7, mau 30."""

    name: str
    days: int


@dataclass(frozen=True, slots=True, eq=False)
class Performed:
    """`op n` events satisfying `predicate` in the window (now − within, now]; `negate` for not_performed
    (= not at least one). Evaluated in metrics/segments.py."""

    predicate: Predicate
    op: str  # gte | lte | eq
    n: int
    within_ms: int
    negate: bool = False

    @property
    def keep(self) -> int:
        """How many of the newest event times decide it: at least n, or whether there are more than n."""
        return max(self.n, 1) if self.op == "gte" else self.n + 1


@dataclass(frozen=True, slots=True, eq=False)
class Trait:
    """The person's latest value of identify trait `key` equals `value` (same_json_value)."""

    key: str
    value: Any


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    every: bool  # all (True) or any (False) of the items
    items: tuple[Performed | Trait | Group, ...]


Condition = Performed | Trait | Group


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """A group of persons, live: members are the persons of the universe that meet the condition now."""

    name: str
    version: str
    condition: Group
    universe: Performed | None  # None: every person the stream holds a state for


@dataclass(frozen=True, slots=True, eq=False)
class Rfm:
    """Recency, frequency and monetary value over the orders in `window_ms` before now (metrics/rfm.py)."""

    name: str
    version: str
    order: Predicate
    monetary: str
    window_ms: int
    refresh_ms: int


LIFECYCLE_STATUSES = ("new", "returning", "resurrecting", "dormant")


@dataclass(frozen=True, slots=True, eq=False)
class Lifecycle(Periodic):
    """Persons per period by status, as PostHog defines it (activity by the metrics file's rule): new (first
    active period), returning (active now and in the previous period), resurrecting (active now, not in the
    previous period, but before it), dormant (active in the previous period, not now)."""

    name: str
    version: str
    period: str  # day | week


DAU, WAU, MAU = ActiveWindow("dau", 1), ActiveWindow("wau", 7), ActiveWindow("mau", 30)
ACTIVE_WINDOWS = (DAU, WAU, MAU)

HOUR_MS = 3_600_000
PERIOD_MS = {"hour": HOUR_MS, "day": DAY_MS, "week": 7 * DAY_MS}
MONDAY_MS = 4 * DAY_MS  # 1970-01-05, the first Monday: weeks start there (as Periodic's)


@dataclass(frozen=True, slots=True, eq=False)
class AlertSeries:
    """A series an alert watches (metrics/alerts.py): one value per period, and the volume behind it."""

    kind: str  # events | invalid_rate | funnel | retention | active | segment
    period: str  # hour | day | week
    event: str | None = None  # events: the name; None = every valid event
    source: str | None = None  # events / invalid_rate: one source; None = any
    definition: Funnel | Retention | ActiveWindow | None = None
    step: int = 0  # funnel: the step (1-based)
    n: int = 0  # retention: periods after the cohort's
    rate: bool = False  # the value is a rate: funnel conversion from step 1, retention, invalid_rate
    segment: str | None = None

    @property
    def period_ms(self) -> int:
        return PERIOD_MS[self.period]

    def period_of(self, ms: int) -> int:
        """Start (ms) of the period holding `ms`."""
        origin = MONDAY_MS if self.period == "week" else 0
        return ms - (ms - origin) % self.period_ms


@dataclass(frozen=True, slots=True, eq=False)
class AlertRule:
    kind: str  # threshold | relative | anomaly
    above: float | None = None
    below: float | None = None
    vs: str = "previous_period"  # relative
    baseline: str = "previous_periods"  # anomaly: same_hour_of_week | same_weekday | previous_periods
    weeks: int = 4
    periods: int = 12
    sensitivity: float = 3.5
    direction: str = "both"
    min_count: int = 0
    confidence: float = 0.95


@dataclass(frozen=True, slots=True, eq=False)
class Notify:
    webhook: str
    secret_env: str | None
    slack: bool


@dataclass(frozen=True, slots=True, eq=False)
class Part:
    """What a person contributes to an experiment metric: events satisfying `predicate` counted, or their
    `property` summed."""

    predicate: Predicate
    property: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class ExperimentMetric:
    name: str
    kind: str  # conversion | count | sum | ratio
    numerator: Part
    denominator: Part | None  # ratio metrics only
    within_ms: int
    higher_is_better: bool
    guardrail: bool


@dataclass(frozen=True, slots=True, eq=False)
class Experiment:
    name: str
    version: str
    exposure_event: str
    experiment_id: str
    experiment_property: str
    variation_property: str
    variations: tuple[tuple[str, float], ...]  # (name, expected share), in the file's order
    control: str
    metrics: tuple[ExperimentMetric, ...]
    min_sample: int
    exposure: Predicate  # the exposure event with the experiment's id
    # What the per-person statistics depend on (exposure, variations, metrics' parts and windows, CUPED): the
    # version of its cells, so that editing the control, a guardrail or min_sample keeps the counts.
    stats_version: str
    cuped_ms: int = 0  # CUPED's lookback before the exposure (0: off)

    def cuped_for(self, metric: ExperimentMetric) -> int:
        """The lookback of a metric's pre-exposure value: the experiment's, but none for ratio metrics."""
        return self.cuped_ms if metric.kind != "ratio" else 0


@dataclass(frozen=True, slots=True, eq=False)
class Alert:
    name: str
    version: str  # of what the rule means: series, rule, hysteresis, grace (not where it notifies)
    series: AlertSeries
    rule: AlertRule
    fire_after: int
    resolve_after: int
    grace_ms: int
    late_after_ms: int
    notify: tuple[Notify, ...]


@dataclass(frozen=True, slots=True)
class Metrics:
    """The definitions registry: every definition by (name, version), the predicates they use, and what
    the person state needs to know of them."""

    funnels: tuple[Funnel, ...]
    retention: tuple[Retention, ...]
    lateness_ms: int
    close_after_ms: int
    activity: Activity = Activity(frozenset(ACTIVITY_TYPES), frozenset())
    segments: tuple[Segment, ...] = ()
    lifecycle: Lifecycle | None = None
    rfm: Rfm | None = None
    alerts: tuple[Alert, ...] = ()
    experiments: tuple[Experiment, ...] = ()

    # Derived once (read per event on the hot path).
    predicates: tuple[Predicate, ...] = field(init=False)
    funnel_pids: frozenset[str] = field(init=False)  # predicates of funnel steps: their events are kept
    cohort_pids: frozenset[str] = field(init=False)
    return_pids: frozenset[str] = field(init=False)
    # predicates of segment conditions → (newest event times kept, window ms): metrics/segments.py
    segment_pids: dict[str, tuple[int, int]] = field(init=False)
    trait_keys: frozenset[str] = field(init=False)  # identify traits segments read
    lateness_days: int = field(init=False)
    reach_days: int = field(init=False)
    horizon_days: int = field(init=False)
    # experiments (metrics/exposures.py): exposure predicate id → its experiments; part predicate id → its
    # parts; part key → (exposure key, ms before, ms after) of every window it counts in
    exposures_of: dict[str, tuple[Experiment, ...]] = field(init=False)
    parts_of: dict[str, tuple[Part, ...]] = field(init=False)
    part_windows: dict[str, tuple[tuple[str, int, int], ...]] = field(init=False)
    exposure_keys: frozenset[str] = field(init=False)
    _by_event: dict[str, tuple[Predicate, ...]] = field(init=False)
    _any_event: tuple[Predicate, ...] = field(init=False)
    _by_ref: dict[str, Funnel | Retention | Lifecycle | Experiment] = field(init=False)

    def __post_init__(self) -> None:
        unique: dict[str, Predicate] = {}
        for f in self.funnels:
            for step in f.steps:
                unique.setdefault(step.pid, step)
        for r in self.retention:
            unique.setdefault(r.cohort.pid, r.cohort)
            unique.setdefault(r.returning.pid, r.returning)
        segment_pids: dict[str, tuple[int, int]] = {}
        trait_keys: set[str] = set()
        for seg in self.segments:
            for c in walk(seg):
                if isinstance(c, Performed):
                    unique.setdefault(c.predicate.pid, c.predicate)
                    keep, window = segment_pids.get(c.predicate.pid, (0, 0))
                    segment_pids[c.predicate.pid] = (max(keep, c.keep), max(window, c.within_ms))
                elif isinstance(c, Trait):
                    trait_keys.add(c.key)
        if self.rfm is not None:
            unique.setdefault(self.rfm.order.pid, self.rfm.order)
        exposures_of: dict[str, list[Experiment]] = {}
        parts_of: dict[str, dict[str, Part]] = {}
        part_windows: dict[str, set[tuple[str, int, int]]] = {}
        for e in self.experiments:
            unique.setdefault(e.exposure.pid, e.exposure)
            exposures_of.setdefault(e.exposure.pid, []).append(e)
            for m in e.metrics:
                for part in filter(None, (m.numerator, m.denominator)):
                    unique.setdefault(part.predicate.pid, part.predicate)
                    parts_of.setdefault(part.predicate.pid, {}).setdefault(part_key(part), part)
                    part_windows.setdefault(part_key(part), set()).add(
                        (exposure_key(e), e.cuped_for(m) if part is m.numerator else 0, m.within_ms))
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
            "segment_pids": segment_pids, "trait_keys": frozenset(trait_keys),
            "lateness_days": lateness_days, "reach_days": reach_days, "horizon_days": horizon_days,
            "exposures_of": {pid: tuple(es) for pid, es in exposures_of.items()},
            "parts_of": {pid: tuple(ps.values()) for pid, ps in parts_of.items()},
            "part_windows": {k: tuple(sorted(w)) for k, w in part_windows.items()},
            "exposure_keys": frozenset(exposure_key(e) for e in self.experiments),
            "_by_event": {name: tuple(ps) for name, ps in by_event.items()},
            "_any_event": tuple(p for p in predicates if p.event is None),
            "_by_ref": {ref(d): d for d in (*self.funnels, *self.retention, *filter(None, [self.lifecycle]),
                                            *self.experiments)},
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def matching(self, event_name: str, properties: dict[str, Any], mtype: str = "track") -> list[Predicate]:
        """The predicates an event (of message type `mtype`) satisfies."""
        return [p for p in (*self._by_event.get(event_name, ()), *self._any_event)
                if p.matches(mtype, event_name, properties)]

    def by_ref(self, reference: str) -> Funnel | Retention | Lifecycle | Experiment | None:
        """The definition `name@version`, if the registry holds it."""
        return self._by_ref.get(reference)


def walk(segment: Segment) -> list[Condition]:
    """Every condition of a segment, its universe's included (depth first)."""
    out: list[Condition] = [segment.universe] if segment.universe is not None else []
    stack: list[Condition] = [segment.condition]
    while stack:
        c = stack.pop()
        out.append(c)
        if isinstance(c, Group):
            stack.extend(reversed(c.items))
    return out


def ref(definition: Funnel | Retention | Lifecycle | Experiment) -> str:
    """A definition's registry key: name@version (an experiment's: the version of its statistics)."""
    if isinstance(definition, Experiment):
        return f"{definition.name}@{definition.stats_version}"
    return f"{definition.name}@{definition.version}"


@functools.cache  # read per person change: definitions are few, and hash by identity
def exposure_key(e: Experiment) -> str:
    """What a person's exposures to an experiment are kept under: its exposure and its variations (two
    experiments with the same exposure and variations share them)."""
    return "|".join((e.exposure.pid, e.variation_property, *sorted(name for name, _ in e.variations)))


@functools.cache
def part_key(part: Part) -> str:
    """What a person's values of an experiment metric's part are kept under."""
    return f"{part.predicate.pid}|{part.property or ''}"


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
    segments = [_segment(c, predicate) for c in spec.segments]
    if spec.churn_risk is not None:
        # last activity in (now − active_within − silent_for, now − silent_for]: active in the window before
        # the silence, and not since
        silent, active = parse_duration_ms(spec.churn_risk.silent_for), parse_duration_ms(spec.churn_risk.active_within)
        anything = predicate(None, {})
        segments.append(_versioned(spec.churn_risk.name, Group(True, (
            Performed(anything, "gte", 1, active + silent), Performed(anything, "gte", 1, silent, negate=True))), None))
    lifecycle = None
    if spec.lifecycle is not None:  # its version follows the activity rule it counts by
        lifecycle = Lifecycle("lifecycle", _digest("lifecycle", spec.lifecycle.period, predicate(None, {}).pid),
                              spec.lifecycle.period)
    rfm = None
    if spec.rfm is not None:
        order = predicate(spec.rfm.event, {})
        window_ms = parse_duration_ms(spec.rfm.window)
        rfm = Rfm("rfm", _digest("rfm", order.pid, spec.rfm.monetary, window_ms), order, spec.rfm.monetary,
                  window_ms, parse_duration_ms(spec.rfm.refresh))
    alerts = tuple(_alert(a, spec, funnels, retention) for a in spec.alerts)
    experiments = tuple(_experiment(e, predicate) for e in spec.experiments)
    return Metrics(tuple(funnels), tuple(retention), parse_duration_ms(spec.lateness),
                   parse_duration_ms(spec.close_after), activity, tuple(segments), lifecycle, rfm, alerts,
                   experiments)


def _experiment(spec: ExperimentSpec, predicate: Callable[[str | None, dict[str, Any]], Predicate]) -> Experiment:
    def part(p: PartSpec) -> Part:
        return Part(predicate(p.count, {})) if p.count is not None else Part(predicate(p.sum.event, p.sum.where),
                                                                               p.sum.property)

    metrics = []
    for m in spec.metrics:
        if m.ratio is not None:
            kind, numerator, denominator, within = "ratio", part(m.ratio.numerator), part(m.ratio.denominator), \
                m.ratio.within
        else:
            kind = "conversion" if m.conversion else "count" if m.count else "sum"
            body = m.conversion or m.count or m.sum
            numerator = Part(predicate(body.event, body.where), getattr(body, "property", None))
            denominator, within = None, body.within
        metrics.append(ExperimentMetric(m.name, kind, numerator, denominator, parse_duration_ms(within),
                                        m.higher_is_better, m.name in spec.guardrails))

    def described(p: Part | None) -> Any:
        return None if p is None else (p.predicate.pid, p.property)

    cuped_ms = parse_duration_ms(spec.cuped) if spec.cuped is not None else 0
    version = _digest("experiment", spec.exposure.model_dump(), sorted(spec.variations.items()), spec.control,
                      [(m.name, m.kind, described(m.numerator), described(m.denominator), m.within_ms,
                        m.higher_is_better, m.guardrail) for m in metrics], spec.min_sample,
                      *([cuped_ms] if cuped_ms else []))
    stats_version = _digest("experiment stats", spec.exposure.model_dump(), sorted(spec.variations),
                            [(m.name, m.kind, described(m.numerator), described(m.denominator), m.within_ms)
                             for m in metrics], *([cuped_ms] if cuped_ms else []))
    e = spec.exposure
    return Experiment(spec.name, version, e.event, e.experiment_id, e.experiment_property, e.variation_property,
                      tuple(spec.variations.items()), spec.control, tuple(metrics), spec.min_sample,
                      predicate(e.event, {e.experiment_property: e.experiment_id}), stats_version, cuped_ms)


def _alert(spec: AlertSpec, metrics: MetricsSpec, funnels: list[Funnel], retention: list[Retention]) -> Alert:
    s, r = spec.series, spec.rule
    kind = next(k for k in ("events", "invalid_rate", "funnel", "retention", "active", "segment")
                if getattr(s, k) not in (None, False))
    definition: Funnel | Retention | ActiveWindow | None = None
    if kind == "funnel":
        definition = next(f for f in funnels if f.name == s.funnel)
    elif kind == "retention":
        definition = next(x for x in retention if x.name == s.retention)
    elif kind == "active":
        definition = next(w for w in ACTIVE_WINDOWS if w.name == s.active)
    series = AlertSeries(kind, alert_period(s, metrics), event=None if s.events in (None, ANY) else s.events,
                         source=None if s.source in (None, ANY) else s.source, definition=definition,
                         step=s.step or 0, n=s.n or 0, rate=s.rate or kind in ("retention", "invalid_rate"),
                         segment=s.segment)
    body = r.threshold or r.relative or r.anomaly
    min_count = max((m for m in (r.min_count, body.min_count) if m is not None), default=0)
    fields = {k: v for k, v in body.model_dump().items() if k != "min_count"}
    rule = AlertRule(kind="threshold" if r.threshold else "relative" if r.relative else "anomaly",
                     min_count=min_count, confidence=r.confidence, **fields)
    grace, late_after = parse_duration_ms(spec.grace), parse_duration_ms(spec.late_after)
    described = (kind, series.period, series.event, series.source,
                 f"{definition.name}@{getattr(definition, 'version', '')}" if definition else None,
                 series.step, series.n, series.rate, series.segment,
                 [(k, getattr(rule, k)) for k in AlertRule.__slots__])
    version = _digest("alert", described, spec.fire_after, spec.resolve_after, grace)
    notify = tuple(Notify(n.webhook, n.secret_env, n.slack) for n in spec.notify)
    return Alert(spec.name, version, series, rule, spec.fire_after, spec.resolve_after, grace, late_after, notify)


def _segment(spec: SegmentSpec, predicate: Callable[[str | None, dict[str, Any]], Predicate]) -> Segment:
    def condition(c: ConditionSpec) -> Condition:
        if c.performed is not None or c.not_performed is not None:
            name = c.performed if c.performed is not None else c.not_performed
            p = predicate(None if name == ANY else name, c.where)
            op, n = next(((k, v) for k, v in (c.count or CountSpec(gte=1)).model_dump().items() if v is not None))
            return Performed(p, op, n, parse_duration_ms(c.within), negate=c.not_performed is not None)
        if c.trait is not None:
            traits = [Trait(k, v) for k, v in sorted(c.trait.items())]
            return traits[0] if len(traits) == 1 else Group(True, tuple(traits))
        return Group(c.all is not None, tuple(condition(i) for i in (c.all if c.all is not None else c.any)))

    top = Group(spec.all is not None, tuple(condition(i) for i in (spec.all if spec.all is not None else spec.any)))
    if isinstance(spec.universe, UniverseSpec):
        universe = Performed(predicate(None, {}), "gte", 1, parse_duration_ms(spec.universe.active_within))
    elif spec.universe == "all":
        universe = None
    else:  # persons active within the longest window; none without a window
        stack, longest = [top], 0
        while stack:
            c = stack.pop()
            if isinstance(c, Group):
                stack.extend(c.items)
            elif isinstance(c, Performed):
                longest = max(longest, c.within_ms)
        universe = Performed(predicate(None, {}), "gte", 1, longest) if longest else None
    return _versioned(spec.name, top, universe)


def _versioned(name: str, condition: Group, universe: Performed | None) -> Segment:
    def describe(c: Condition | None) -> Any:
        if isinstance(c, Performed):
            return ("performed", c.predicate.pid, c.op, c.n, c.within_ms, c.negate)
        if isinstance(c, Trait):
            return ("trait", c.key, type(c.value).__name__, c.value)
        if isinstance(c, Group):
            return ("all" if c.every else "any", [describe(i) for i in c.items])
        return None

    return Segment(name, _digest("segment", describe(condition), describe(universe)), condition, universe)


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


def read_metrics_file(path: Path | None) -> dict[str, Any]:
    """A metrics file's mapping, not yet validated; None = no metrics (an empty mapping)."""
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such metrics file (FLYWHEEL_METRICS)") from None
    except yaml.YAMLError as exc:
        raise MetricsError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MetricsError(f"{path}: expected a mapping with `funnels:` and/or `retention:`")
    return raw


def load_metrics(path: Path | None) -> Metrics:
    """Read and validate a metrics file; None = no metrics (the aggregates stage does nothing)."""
    return parse_metrics(read_metrics_file(path), source=str(path))


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
