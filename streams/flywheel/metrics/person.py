"""The person state: one record per person serving funnels, retention and active users (docs/design.md §4).

It is the single source of truth for a person's contribution to every metric; partition partials are
derived from it (partials.py). Everything here is pure and mergeable:

- apply(event) is idempotent: sets, max and min, and funnel events keyed by messageId; the state also
  remembers which events it applied (a 63-bit hash of the messageId, per day), so a redelivered event
  is recognised as applied even after newer events made it look late;
- join(a, b) — used when an anonymous id's state is handed to its user — is commutative, associative
  and idempotent (union of active days and histories, min of first-seen, max of newest), followed by
  the same pruning;
- only activity events (the metrics file's activity rule) are active days; an event that is no activity
  and satisfies no condition does not reach the state at all (the aggregate stage skips it);
- the state is bounded: history older than the person's newest event minus `horizon_days`
  (lateness + the longest reach of a metric) is dropped; only each cohort condition's first-seen time
  is kept for good (a cohort is the period of the *first* cohort event).

History is kept per condition (the registry's predicate ids), not per definition: the state records
which conditions it holds, so a definition added, changed or removed leaves the rest as it was; what
no definition uses any more is dropped when the state is next read.

Serialized compactly (orjson) into the Faust table `persons`:
    {"v": 2, "n": newest_ms, "d": [active days],
     "p": [predicate ids: the bits of "f"], "f": {messageId: [ts_ms, bits]},
     "c": {cohort predicate id: first ms}, "r": {return predicate id: [days]},
     "m": [[messageId hash, day], ...],
     "e": {segment predicate id: [[ts_ms, messageId hash], ...]},   # by time (segments.trim)
     "t": {trait: [value, ts_ms, messageId]},                       # latest identify value
     "s": {segment: [version, since_ms]}, "u": due_ms,              # memberships (stages/aggregate.py)
     "k": 1,                                                         # the person id is a userId
     "a": first active day,                                          # kept for good (lifecycle)
     "o": [[ts_ms, amount, messageId hash], ...],                   # orders within the RFM window
     "rv": [newest order ms, frequency, monetary],                  # RFM summary last published
     "x": {exposure key: [first ms, messageId, variation, [variations seen]]},   # experiments
     "xp": {part key: [[messageId hash, ts_ms, value], ...]}}       # experiment metric parts (exposures.py)
"e", "t", "s", "u", "k", "a", "o", "rv", "x" and "xp" are written only when set. A state without "a" (an older
release) takes its first active day from its days: right for every period the state still derives. Days are UTC day
numbers (days since 1970-01-01). A state without "v" is the first format (7ae8eae and earlier; read by
`_from_v1`).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from flywheel.metrics.cells import Cell
from flywheel.metrics.definitions import (
    ACTIVE_WINDOWS,
    Experiment,
    Funnel,
    Metrics,
    Predicate,
    exposure_key,
    legacy_bits,
    part_key,
)
from flywheel.metrics.exposures import Track, cells, merge, observe_matched
from flywheel.metrics.funnel import levels_by_day
from flywheel.model.clock import DAY_MS

FORMAT = 2
NEW, RETURNING, RESURRECTING, DORMANT = range(4)  # lifecycle statuses (definitions.LIFECYCLE_STATUSES)


@dataclass
class PersonState:
    newest: int = -1
    days: set[int] = field(default_factory=set)
    legend: list[str] = field(default_factory=list)  # sorted predicate ids: bit i of a funnel event = legend[i]
    funnel: dict[str, tuple[int, int]] = field(default_factory=dict)  # messageId → (ts, bits)
    first: dict[str, int] = field(default_factory=dict)  # cohort predicate id → first ts
    returns: dict[str, set[int]] = field(default_factory=dict)  # return predicate id → days it matched
    applied: dict[int, int] = field(default_factory=dict)  # message_hash(messageId) → day
    # segment predicate id → sorted [(ts, message hash)] within the window; the stage trims them (segments.trim)
    events: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    traits: dict[str, tuple[Any, int, str]] = field(default_factory=dict)  # key → (value, ts, messageId)
    # Membership bookkeeping, owned by the aggregate stage, not by join: segment → (version, since ms)
    # as last decided, and when a decision may next change without an event (-1: never).
    members: dict[str, tuple[str, int]] = field(default_factory=dict)
    due: int = -1
    user: bool = False  # the person id is a userId (else an anonymousId): how audience records name it
    first_active: int = -1  # the first day with an activity event, kept for good (lifecycle: "new")
    orders: list[tuple[int, float, int]] = field(default_factory=list)  # RFM: (ts, amount, message hash), by time
    rfm_published: tuple[int, int, float] | None = None  # the stage's bookkeeping, like members
    # Experiments (metrics/exposures.py, a Track's two halves): exposure key → (first ts, messageId, variation,
    # variations seen), kept for good; part key → {message hash: (ts, value)}, kept for the horizon and, inside
    # an exposure's metric window, for good (the experiment statistics never close).
    exposures: dict[str, tuple[int, str, str, frozenset[str]]] = field(default_factory=dict)
    parts: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)

    @property
    def track(self) -> Track:
        return Track(self.exposures, self.parts)

    def has_applied(self, message_id: str) -> bool:
        return message_hash(message_id) in self.applied

    def copy(self) -> PersonState:
        return PersonState(self.newest, set(self.days), list(self.legend), dict(self.funnel), dict(self.first),
                           {k: set(v) for k, v in self.returns.items()}, dict(self.applied),
                           {k: list(v) for k, v in self.events.items()}, dict(self.traits), dict(self.members),
                           self.due, self.user, self.first_active, list(self.orders), self.rfm_published,
                           dict(self.exposures), {k: dict(v) for k, v in self.parts.items()})

    # ---- serialization ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"v": FORMAT, "n": self.newest, "d": sorted(self.days), "p": self.legend,
                "f": {k: list(v) for k, v in self.funnel.items()}, "c": self.first,
                "r": {k: sorted(v) for k, v in self.returns.items()},
                "m": sorted([h, d] for h, d in self.applied.items()),
                **({"e": {k: [list(e) for e in v] for k, v in self.events.items()}} if self.events else {}),
                **({"t": {k: list(v) for k, v in self.traits.items()}} if self.traits else {}),
                **({"s": {k: list(v) for k, v in self.members.items()}} if self.members else {}),
                **({"u": self.due} if self.due >= 0 else {}),
                **({"k": 1} if self.user else {}),
                **({"a": self.first_active} if self.first_active >= 0 else {}),
                **({"o": [list(o) for o in self.orders]} if self.orders else {}),
                **({"rv": list(self.rfm_published)} if self.rfm_published is not None else {}),
                **({"x": {k: [ts, mid, v, sorted(seen)] for k, (ts, mid, v, seen) in self.exposures.items()}}
                   if self.exposures else {}),
                **({"xp": {k: sorted([h, ts, v] for h, (ts, v) in values.items()) for k, values in self.parts.items()}}
                   if self.parts else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any], metrics: Metrics) -> PersonState:
        if data.get("v") is None:
            return _from_v1(data, metrics)
        state = cls(int(data.get("n", -1)), set(data.get("d", ())), list(data.get("p", ())),
                    {k: (int(v[0]), int(v[1])) for k, v in data.get("f", {}).items()},
                    {k: int(v) for k, v in data.get("c", {}).items()},
                    {k: set(v) for k, v in data.get("r", {}).items()},
                    {int(h): int(d) for h, d in data.get("m", ())},
                    {k: [(int(ts), int(h)) for ts, h in v] for k, v in data.get("e", {}).items()},
                    {k: (v[0], int(v[1]), v[2]) for k, v in data.get("t", {}).items()},
                    {k: (v[0], int(v[1])) for k, v in data.get("s", {}).items()}, int(data.get("u", -1)),
                    bool(data.get("k")), int(data.get("a", min(data.get("d") or [-1]))),
                    [(int(ts), float(amount), int(h)) for ts, amount, h in data.get("o", ())],
                    (lambda rv: (int(rv[0]), int(rv[1]), float(rv[2])) if rv else None)(data.get("rv")),
                    {k: (int(ts), mid, v, frozenset(seen)) for k, (ts, mid, v, seen) in data.get("x", {}).items()},
                    {k: {int(h): (int(ts), int(v)) for h, ts, v in values} for k, values in data.get("xp", {}).items()})
        return _fit(state, metrics)


def _from_v1(data: dict[str, Any], metrics: Metrics) -> PersonState:
    """A first-format state: funnel bits by position in the metrics file (definitions.legacy_bits), cohort
    and return periods as lists by retention index."""
    state = PersonState(int(data.get("n", -1)), set(data.get("d", ())),
                        [p.pid for p in legacy_bits(metrics)],
                        {k: (int(v[0]), int(v[1])) for k, v in data.get("f", {}).items()}, {}, {},
                        {int(h): int(d) for h, d in data.get("m", ())})
    state.first_active = min(state.days, default=-1)
    daily = {r.returning.pid for r in metrics.retention if r.period == "day"}
    for r, first, periods in zip(metrics.retention, data.get("c", ()), data.get("r", ()), strict=False):
        if first is not None:
            state.first[r.cohort.pid] = min(int(first), state.first.get(r.cohort.pid, int(first)))
        # A period was stored as its first day. For a daily retention that is the day; a weekly one's
        # Monday stands for its week — unless a daily retention has the same return condition, whose
        # days say the same and more.
        if r.period == "day" or r.returning.pid not in daily:
            state.returns.setdefault(r.returning.pid, set()).update(int(p) for p in periods)
    return _fit(state, metrics)


def _fit(state: PersonState, metrics: Metrics) -> PersonState:
    """Drop what no definition of the registry uses any more (a definition removed or changed)."""
    legend = state.legend
    if any(pid not in metrics.funnel_pids for pid in legend) or legend != sorted(legend):
        kept = sorted(pid for pid in legend if pid in metrics.funnel_pids)
        positions = [kept.index(pid) if pid in metrics.funnel_pids else len(kept) for pid in legend]
        dropped = ~(-1 << len(kept))  # a dropped predicate's bit lands above the kept ones
        funnel = {}
        for mid, (ts, bits) in state.funnel.items():
            new = _moved(bits, positions) & dropped
            if new:
                funnel[mid] = (ts, new)
        state.legend, state.funnel = kept, funnel
    if any(pid not in metrics.cohort_pids for pid in state.first):
        state.first = {k: v for k, v in state.first.items() if k in metrics.cohort_pids}
    if any(pid not in metrics.return_pids for pid in state.returns):
        state.returns = {k: v for k, v in state.returns.items() if k in metrics.return_pids}
    if any(pid not in metrics.segment_pids for pid in state.events):
        state.events = {k: v for k, v in state.events.items() if k in metrics.segment_pids}
    if any(key not in metrics.trait_keys for key in state.traits):
        state.traits = {k: v for k, v in state.traits.items() if k in metrics.trait_keys}
    if state.orders and metrics.rfm is None:
        state.orders = []
    if any(key not in metrics.exposure_keys for key in state.exposures):
        state.exposures = {k: v for k, v in state.exposures.items() if k in metrics.exposure_keys}
    if any(key not in metrics.part_windows for key in state.parts):
        state.parts = {k: v for k, v in state.parts.items() if k in metrics.part_windows}
    return state


def histories(metrics: Metrics) -> dict[str, str]:
    """What the state keeps history for under `metrics`, each with the predicate id whose events make it:
    a condition in each of its roles (a funnel step's events, a cohort's first time, a return's days, a
    segment's or the RFM's event times over a window, an experiment's exposures and metric parts). One of
    these new to a state has no history there — a backfill brings it (stages/backfill.py) — even when its
    condition served another role before (an event that was a funnel step becomes a return condition)."""
    out = {f"f:{pid}": pid for pid in metrics.funnel_pids}
    out.update({f"c:{pid}": pid for pid in metrics.cohort_pids})
    out.update({f"r:{pid}": pid for pid in metrics.return_pids})
    out.update({f"s:{pid}:{keep}:{window}": pid for pid, (keep, window) in metrics.segment_pids.items()})
    if metrics.rfm is not None:
        out[f"o:{metrics.rfm.order.pid}:{metrics.rfm.monetary}:{metrics.rfm.window_ms}"] = metrics.rfm.order.pid
    for pid, experiments in metrics.exposures_of.items():
        out.update({f"x:{exposure_key(e)}": pid for e in experiments})
    for pid, parts in metrics.parts_of.items():
        out.update({f"p:{part_key(p)}:{metrics.part_windows.get(part_key(p))}": pid for p in parts})
    return out


def message_hash(message_id: str) -> int:
    """63 bits of BLAKE2b: a compact, collision-safe enough fingerprint (fits a signed JSON integer)."""
    return int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=8).digest(), "big") >> 1


def is_late(state: PersonState, ts_ms: int, metrics: Metrics) -> bool:
    """Older than the newest event already seen for the same person minus the lateness (docs/design.md §4)."""
    return state.newest >= 0 and ts_ms < state.newest - metrics.lateness_ms


def apply(
    state: PersonState, message_id: str, ts_ms: int, matched: Iterable[Predicate], metrics: Metrics, *,
    active: bool = True, prune_history: bool = True, traits: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
) -> PersonState:
    """Add one (non-late) event that satisfies the predicates `matched` (Metrics.matching) and is activity
    or not (Metrics.activity), with the `traits` of an identify call and the event's `properties` (an
    order's amount). Mutates and returns `state`. Applying it again changes nothing — also with other
    predicates: a backfill adds a new condition's history to events applied before it existed
    (docs/design.md §13), so the funnel bits of an event are united and no time is inserted twice."""
    day = ts_ms // DAY_MS
    state.newest = max(state.newest, ts_ms)
    if active:
        state.days.add(day)
        if state.first_active < 0 or day < state.first_active:
            state.first_active = day
    mhash = message_hash(message_id)
    state.applied[mhash] = day
    if traits:
        for key in metrics.trait_keys.intersection(traits):
            _set_trait(state.traits, key, (_scalar(traits[key]), ts_ms, message_id))
    if metrics.experiments:
        observe_matched(state.track, metrics, matched, ts_ms, message_id, mhash, properties or {})
    steps = []
    for p in matched:
        pid = p.pid
        if metrics.rfm is not None and pid == metrics.rfm.order.pid:
            amount = (properties or {}).get(metrics.rfm.monetary)
            number = float(amount) if isinstance(amount, int | float) and not isinstance(amount, bool) else 0.0
            _insort_once(state.orders, (ts_ms, number, mhash))
        if pid in metrics.segment_pids:  # (trimmed to what decides, given now: segments.trim)
            _insort_once(state.events.setdefault(pid, []), (ts_ms, mhash))
        if pid in metrics.funnel_pids:
            steps.append(pid)
        if pid in metrics.cohort_pids:
            first = state.first.get(pid)
            state.first[pid] = ts_ms if first is None else min(first, ts_ms)
        if pid in metrics.return_pids:
            state.returns.setdefault(pid, set()).add(day)
    if steps:
        for pid in steps:
            _add_to_legend(state, pid)
        bits = 0
        for pid in steps:
            bits |= 1 << bisect.bisect_left(state.legend, pid)
        known = state.funnel.get(message_id)
        state.funnel[message_id] = (ts_ms, bits | known[1] if known is not None else bits)
    return prune(state, metrics) if prune_history else state


def _insort_once(items: list, item: tuple) -> None:
    i = bisect.bisect_left(items, item)
    if i == len(items) or items[i] != item:
        items.insert(i, item)


def _scalar(value: Any) -> Any:
    """A trait value as segments compare it: a string, number or boolean; anything else (null, a list, an
    object) equals no condition's value and is kept as None."""
    return value if isinstance(value, str | int | float | bool) else None


def _set_trait(traits: dict[str, tuple[Any, int, str]], key: str, value: tuple[Any, int, str]) -> None:
    """Keep the latest value: by event time, then messageId (the oracle's argMax order)."""
    old = traits.get(key)
    if old is None or (value[1], value[2]) > (old[1], old[2]):
        traits[key] = value


def _add_to_legend(state: PersonState, pid: str) -> None:
    """Give predicate `pid` a bit in the state's funnel events if it has none. The legend is kept sorted,
    so equal states serialize equally whatever order their events came in."""
    legend = state.legend
    i = bisect.bisect_left(legend, pid)
    if i < len(legend) and legend[i] == pid:
        return
    legend.insert(i, pid)
    if i < len(legend) - 1 and state.funnel:  # bits from i up move one place
        low = (1 << i) - 1
        state.funnel = {m: (ts, (b & low) | (b & ~low) << 1) for m, (ts, b) in state.funnel.items()}


def _moved(bits: int, positions: list[int]) -> int:
    """Bits re-numbered: bit i becomes bit positions[i]."""
    out = 0
    for i, j in enumerate(positions):
        if bits >> i & 1:
            out |= 1 << j
    return out


def join(a: PersonState, b: PersonState, metrics: Metrics) -> PersonState:
    """The state of a person who is both a and b (an anonymous id handed to its user). Pure. The history
    only: membership bookkeeping (`members`, `due`) is the aggregate stage's to carry over."""
    legend = sorted(set(a.legend) | set(b.legend))
    funnel = {}
    for s in (a, b):
        positions = [legend.index(pid) for pid in s.legend]
        funnel.update({mid: (ts, _moved(bits, positions)) for mid, (ts, bits) in s.funnel.items()})
    first = dict(a.first)
    for pid, ts in b.first.items():
        first[pid] = min(ts, first.get(pid, ts))
    returns = {pid: set(days) for pid, days in a.returns.items()}
    for pid, days in b.returns.items():
        returns.setdefault(pid, set()).update(days)
    events = {pid: sorted(set(a.events.get(pid, ())) | set(b.events.get(pid, ())))
              for pid in a.events.keys() | b.events.keys()}
    traits = dict(a.traits)
    for key, value in b.traits.items():
        _set_trait(traits, key, value)
    out = PersonState(max(a.newest, b.newest), a.days | b.days, legend, funnel, first, returns,
                      {**a.applied, **b.applied}, events, traits, user=a.user or b.user,
                      first_active=min((d for d in (a.first_active, b.first_active) if d >= 0), default=-1),
                      orders=sorted(set(a.orders) | set(b.orders)))
    track = merge(a.track, b.track)
    out.exposures, out.parts = track.exposures, track.parts
    return prune(out, metrics)


def experiment_history_cut(a: PersonState, b: PersonState, metrics: Metrics) -> list[str]:
    """The exposure keys for which joining a and b may miss metric values: the joined first exposure's
    windows (from CUPED's lookback before it) reach before the history one side kept (newest − horizon)
    while that side had no exposure of its own that early — its events there may have been pruned before it
    knew of the exposure. Rare: a device exposed and unlinked for longer than the horizon while its person
    was active elsewhere (docs/design.md §11)."""
    out = []
    for key in a.exposures.keys() | b.exposures.keys():
        first = min(s.exposures[key][0] for s in (a, b) if key in s.exposures)
        before = max((w[1] for windows in metrics.part_windows.values() for w in windows if w[0] == key), default=0)
        for side in (a, b):
            own = side.exposures.get(key)
            bound = (side.newest // DAY_MS - metrics.horizon_days) * DAY_MS
            if side.newest >= 0 and (own is None or own[0] > first) and first - before < bound:
                out.append(key)
                break
    return out


def prune(state: PersonState, metrics: Metrics) -> PersonState:
    """Drop history that can no longer change an open day (older than newest − horizon)."""
    if state.newest < 0:
        return state
    bound = state.newest // DAY_MS - metrics.horizon_days
    if state.days and min(state.days) < bound:
        state.days = {d for d in state.days if d >= bound}
    if state.funnel:
        old = [k for k, (ts, _) in state.funnel.items() if ts // DAY_MS < bound]
        for k in old:
            del state.funnel[k]
    if state.applied:
        for h in [h for h, d in state.applied.items() if d < bound]:
            del state.applied[h]
    # A return day before the bound lies in a period that starts before every open day (partials.py).
    for pid, days in state.returns.items():
        if days and min(days) < bound:
            state.returns[pid] = {d for d in days if d >= bound}
    # A segment window is relative to now, which follows the newest event: what lies a window (and the
    # lateness, for a clock behind the events) before the newest event can count for no member any more.
    for pid, times in state.events.items():
        window = metrics.segment_pids.get(pid, (0, 0))[1]
        if times and times[0][0] <= state.newest - window - metrics.lateness_ms:
            state.events[pid] = [e for e in times if e[0] > state.newest - window - metrics.lateness_ms]
    if state.events and not all(state.events.values()):
        state.events = {k: v for k, v in state.events.items() if v}
    if state.orders and metrics.rfm is not None:  # as segment windows: relative to now, behind the newest event
        bound = state.newest - metrics.rfm.window_ms - metrics.lateness_ms
        if state.orders[0][0] <= bound:
            state.orders = [o for o in state.orders if o[0] > bound]
    if state.parts:
        _prune_parts(state, metrics)
    return state


def _prune_parts(state: PersonState, metrics: Metrics) -> None:
    """Part values older than the horizon go, but for those inside a window of one of the person's exposures
    — its metrics' `within` after it, CUPED's lookback before it — (experiment statistics never close: what
    counts for them is kept for good, bounded by the windows)."""
    bound = (state.newest // DAY_MS - metrics.horizon_days) * DAY_MS
    for key, values in state.parts.items():
        if min(ts for ts, _ in values.values()) >= bound:
            continue
        windows = [(first[0] - before, first[0] + after) for ekey, before, after in metrics.part_windows.get(key, ())
                   if (first := state.exposures.get(ekey)) is not None]
        state.parts[key] = {h: (ts, v) for h, (ts, v) in values.items()
                            if ts >= bound or any(start <= ts <= end for start, end in windows)}
    if not all(state.parts.values()):
        state.parts = {k: v for k, v in state.parts.items() if v}


@functools.lru_cache(maxsize=4096)
def _step_bits(funnel: Funnel, legend: tuple[str, ...]) -> tuple[int, ...]:
    """For each bit of a state's legend, the steps of `funnel` it satisfies (as step bits)."""
    return tuple(sum(1 << i for i, step in enumerate(funnel.steps) if step.pid == pid) for pid in legend)


def _funnel_cells(state: PersonState, metrics: Metrics, open_from: int, out: set[Cell]) -> None:
    if not state.funnel:
        return
    events = list(state.funnel.values())
    legend = tuple(state.legend)
    for f in metrics.funnels:
        by_bit = _step_bits(f, legend)
        if not any(by_bit):
            continue
        rows = []
        for ts, bits in events:
            sb = 0
            for i, steps in enumerate(by_bit):
                if steps and bits >> i & 1:
                    sb |= steps
            if sb:
                rows.append((ts, sb))
        if not rows:
            continue
        for day, level in levels_by_day(rows, len(f.steps), f.window_ms, from_day=open_from).items():
            for k in range(1, level + 1):
                out.add((f, day, k))


def _activity_cells(state: PersonState, metrics: Metrics, open_from: int, out: set[Cell]) -> None:
    if not state.days:
        return
    # Active in a window ending on d: an active day within its last `days` days. Sets of days first,
    # then the cells in one C-level pass (zip): a few hundred cells per person.
    active_from = open_from + 29
    for window in ACTIVE_WINDOWS:
        ending: set[int] = set()
        for day in state.days:
            ending.update(range(max(day, active_from), day + window.days))
        out.update(zip(repeat(window), ending))
    lifecycle = metrics.lifecycle
    if lifecycle is not None:
        # a period's status needs it and the previous one: open from open_from + a period on
        pd, first = lifecycle.period_days, lifecycle.period_of(state.first_active)
        periods = {lifecycle.period_of(d) for d in state.days}
        for p in periods:
            if p - pd >= open_from:
                out.add((lifecycle, p, NEW if p == first else RETURNING if p - pd in periods else RESURRECTING))
            if p + pd not in periods and p >= open_from:
                out.add((lifecycle, p + pd, DORMANT))


def _retention_cells(state: PersonState, metrics: Metrics, open_from: int, out: set[Cell]) -> None:
    for r in metrics.retention:
        first = state.first.get(r.cohort.pid)
        if first is None:
            continue
        cohort = r.period_of(first // DAY_MS)
        out.add((r, cohort, 0))
        days = state.returns.get(r.returning.pid)
        if not days:
            continue
        periods = {r.period_of(d) for d in days}
        for n in range(1, r.horizon + 1):
            period = cohort + n * r.period_days
            if period >= open_from and period in periods:
                out.add((r, cohort, n))


# Each family of cells with the part of the state it is a function of (besides the metrics and open_from).
_FAMILIES = (
    (lambda s: (s.legend, s.funnel), _funnel_cells),
    (lambda s: (s.days, s.first_active), _activity_cells),
    (lambda s: (s.first, s.returns), _retention_cells),
)


def contributions(state: PersonState, metrics: Metrics, open_from: int) -> set[Cell]:
    """The cells this person counts for, among the open ones (cells.py). A pure function of the state."""
    out: set[Cell] = set()
    if state.newest >= 0:
        for _, cells_of in _FAMILIES:
            cells_of(state, metrics, open_from, out)
    return out


def changed_contributions(old: PersonState | None, new: PersonState | None, metrics: Metrics,
                          open_from: int) -> tuple[set[Cell], set[Cell]]:
    """`contributions` of old and new (None: none), but only of the families whose part of the state differs
    between the two: the others' cells are the same on both sides. Most events change one family or none
    (a second event on an active day changes no activity cell), and the activity cells are most of a person's."""
    if old is None or new is None or old.newest < 0 or new.newest < 0:
        return (contributions(old, metrics, open_from) if old is not None else set(),
                contributions(new, metrics, open_from) if new is not None else set())
    before: set[Cell] = set()
    after: set[Cell] = set()
    for inputs, cells_of in _FAMILIES:
        if inputs(old) != inputs(new):
            cells_of(old, metrics, open_from, before)
            cells_of(new, metrics, open_from, after)
    return before, after


def weights(state: PersonState, metrics: Metrics, experiments: Iterable[Experiment] | None = None) -> dict[Cell, int]:
    """The cells this person adds a value other than 1 to (experiment statistics, exposures.cells), with the
    value: the weighted counterpart of `contributions`, for every experiment or those given. Such cells never
    close."""
    if not state.exposures or not metrics.experiments:
        return {}
    return cells(metrics.experiments if experiments is None else experiments, state.track)
