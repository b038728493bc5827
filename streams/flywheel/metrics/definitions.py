"""The metrics file (FLYWHEEL_METRICS): funnel and retention definitions, validated at start.

Shape (DESIGN §7), YAML:

    lateness: 7d                       # optional; default 7d (DESIGN §4)
    close_after: 30d                   # optional; cells stay re-derivable this long (partials.py)
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
        cohort_event: any              # 'any' = first event of any kind, or an event name
        return_event: any
        period: day                    # day | week (weeks start on Monday, UTC)
        horizon: 14                    # periods after the cohort's

Errors name the file and the place (`funnels[0].steps[2].where.category: ...`), so an operator can fix
the file without reading code. Each step, cohort and return condition becomes one bit of a predicate
mask, so the person state stores a few bits per event instead of its properties.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DAY_MS = 86_400_000
ANY = "any"
MAX_STEPS = 32  # ClickHouse windowFunnel takes at most 32 conditions; the oracle must be able to run
MAX_HORIZON = 31  # retention(...) takes at most 32 conditions: the cohort + 31 periods
MAX_PREDICATES = 63  # the predicate mask is stored as a signed 64-bit JSON integer

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


class MetricsSpec(_Strict):
    lateness: str | int = "7d"
    close_after: str | int = "30d"
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


# ---- compiled form -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Predicate:
    """One bit of the mask: event name equality plus property equality filters."""

    bit: int
    event: str | None  # None = any event
    where: tuple[tuple[str, Any], ...] = ()

    def matches(self, event_name: str, properties: dict[str, Any]) -> bool:
        if self.event is not None and event_name != self.event:
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


@dataclass(frozen=True, slots=True)
class Funnel:
    name: str
    window_ms: int
    steps: tuple[Predicate, ...]


@dataclass(frozen=True, slots=True)
class Retention:
    name: str
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


@dataclass(frozen=True, slots=True)
class Metrics:
    funnels: tuple[Funnel, ...]
    retention: tuple[Retention, ...]
    lateness_ms: int
    close_after_ms: int
    predicates: tuple[Predicate, ...]
    funnel_mask: int  # the bits of every funnel step: events without one keep no funnel history

    def mask(self, event_name: str, properties: dict[str, Any]) -> int:
        m = 0
        for p in self.predicates:
            if p.matches(event_name, properties):
                m |= 1 << p.bit
        return m

    def period_days(self, retention_name: str) -> int:
        for r in self.retention:
            if r.name == retention_name:
                return r.period_days
        raise KeyError(retention_name)

    # Derived once (read per event on the hot path; recomputing them was ~45% of the aggregate stage).
    lateness_days: int = field(init=False)
    reach_days: int = field(init=False)
    horizon_days: int = field(init=False)

    def __post_init__(self) -> None:
        lateness_days = -(-self.lateness_ms // DAY_MS)
        # How many days before an event's day its effects can reach (DESIGN §4: state is bounded by the
        # longest window plus lateness): a funnel chain started up to a window earlier, the MAU of the
        # next 29 days, the period the event returns in.
        longest = max((-(-f.window_ms // DAY_MS) for f in self.funnels), default=0)
        period = max((r.period_days for r in self.retention), default=1)
        reach_days = max(29, longest + 1, period)
        # Days of history a person keeps before its newest event: lateness, the reach of its effects, and
        # close_after — how far a partition's newest event may run ahead of a person's (consumption skew
        # across raw partitions, a backfill) before that person's old cells close (partials.py).
        horizon_days = lateness_days + -(-self.close_after_ms // DAY_MS) + reach_days + 1
        object.__setattr__(self, "lateness_days", lateness_days)
        object.__setattr__(self, "reach_days", reach_days)
        object.__setattr__(self, "horizon_days", horizon_days)

    def fingerprint(self) -> str:
        """Changes when the meaning of mask bits changes (then the person state must be rebuilt)."""
        import hashlib

        text = repr((self.predicates, [(f.name, f.window_ms) for f in self.funnels],
                     [(r.name, r.period, r.horizon) for r in self.retention]))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def compile_metrics(spec: MetricsSpec) -> Metrics:
    predicates: list[Predicate] = []
    index: dict[tuple, Predicate] = {}

    def predicate(event: str | None, where: dict[str, Any]) -> Predicate:
        key = (event, tuple(sorted(where.items())))
        if key not in index:
            index[key] = Predicate(bit=len(predicates), event=event, where=key[1])
            predicates.append(index[key])
        return index[key]

    funnels = tuple(
        Funnel(f.name, parse_duration_ms(f.window), tuple(predicate(s.event, s.where) for s in f.steps))
        for f in spec.funnels
    )
    retention = tuple(
        Retention(
            r.name,
            predicate(None if r.cohort_event == ANY else r.cohort_event, {}),
            predicate(None if r.return_event == ANY else r.return_event, {}),
            r.period, r.horizon,
        )
        for r in spec.retention
    )
    funnel_mask = 0
    for f in funnels:
        for step in f.steps:
            funnel_mask |= 1 << step.bit
    return Metrics(funnels, retention, parse_duration_ms(spec.lateness), parse_duration_ms(spec.close_after),
                   tuple(predicates), funnel_mask)


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
    if len(metrics.predicates) > MAX_PREDICATES:
        raise MetricsError(
            f"{source}: {len(metrics.predicates)} distinct step/cohort/return conditions; at most {MAX_PREDICATES}"
        )
    return metrics


def _place(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
