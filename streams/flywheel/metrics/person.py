"""The person state: one record per person serving funnels, retention and active users (DESIGN §4).

It is the single source of truth for a person's contribution to every metric; partition partials are
derived from it (partials.py). Everything here is pure and mergeable:

- apply(event) is idempotent: sets, max and min, and funnel events keyed by messageId; the state also
  remembers which events it applied (a 63-bit hash of the messageId, per day), so a redelivered event
  is recognised as applied even after newer events made it look late;
- join(a, b) — used when an anonymous id's state is handed to its user — is commutative, associative
  and idempotent (union of active days and funnel history, min of first-seen, max of newest), followed
  by the same pruning;
- the state is bounded: history older than the person's newest event minus `horizon_days`
  (lateness + the longest reach of a metric) is dropped; only each retention's first-seen time is
  kept for good (a cohort is the period of the *first* cohort event).

Serialized compactly (orjson) into the Faust table `persons`:
    {"n": newest_ms, "d": [active days], "f": {messageId: [ts_ms, step_bits]},
     "c": [first cohort-event ms or null per retention], "r": [[return period days] per retention],
     "m": [[messageId hash, day], ...]}
Days are UTC day numbers (days since 1970-01-01); a week period is its Monday's day number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from flywheel.metrics.definitions import DAY_MS, Metrics
from flywheel.metrics.funnel import levels_by_day

# Contribution keys. A person contributes 0 or 1 to each key; a partition's partial is the count.
#   ("f", funnel, day, step)        level(p, day) ≥ step
#   ("r", retention, cohort, 0)     p is in the cohort (cohort size)
#   ("r", retention, cohort, n)     p returned n periods after its cohort's
#   ("a", "dau"|"wau"|"mau", day)  p active that day / in the 7 / 30 days ending that day
Key = tuple


@dataclass
class PersonState:
    newest: int = -1
    days: set[int] = field(default_factory=set)
    funnel: dict[str, tuple[int, int]] = field(default_factory=dict)
    first: list[int | None] = field(default_factory=list)
    returns: list[set[int]] = field(default_factory=list)
    applied: dict[int, int] = field(default_factory=dict)  # message_hash(messageId) → day

    def has_applied(self, message_id: str) -> bool:
        return message_hash(message_id) in self.applied

    @classmethod
    def empty(cls, metrics: Metrics) -> PersonState:
        n = len(metrics.retention)
        return cls(first=[None] * n, returns=[set() for _ in range(n)])

    def copy(self) -> PersonState:
        return PersonState(self.newest, set(self.days), dict(self.funnel), list(self.first),
                           [set(r) for r in self.returns], dict(self.applied))

    # ---- serialization ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"n": self.newest, "d": sorted(self.days), "f": {k: list(v) for k, v in self.funnel.items()},
                "c": self.first, "r": [sorted(r) for r in self.returns],
                "m": sorted([h, d] for h, d in self.applied.items())}

    @classmethod
    def from_json(cls, data: dict[str, Any], metrics: Metrics) -> PersonState:
        n = len(metrics.retention)
        first = list(data.get("c", []))[:n] + [None] * max(0, n - len(data.get("c", [])))
        returns = [set(r) for r in data.get("r", [])][:n]
        returns += [set() for _ in range(n - len(returns))]
        return cls(int(data.get("n", -1)), set(data.get("d", ())),
                   {k: (int(v[0]), int(v[1])) for k, v in data.get("f", {}).items()}, first, returns,
                   {int(h): int(d) for h, d in data.get("m", ())})


def message_hash(message_id: str) -> int:
    """63 bits of BLAKE2b: a compact, collision-safe enough fingerprint (fits a signed JSON integer)."""
    return int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=8).digest(), "big") >> 1


def is_late(state: PersonState, ts_ms: int, metrics: Metrics) -> bool:
    """DESIGN §4: older than the newest event already seen for the same person minus the lateness."""
    return state.newest >= 0 and ts_ms < state.newest - metrics.lateness_ms


def apply(
    state: PersonState, message_id: str, ts_ms: int, mask: int, metrics: Metrics, *, prune_history: bool = True
) -> PersonState:
    """Add one (non-late) event. Mutates and returns `state`. Applying it again changes nothing."""
    day = ts_ms // DAY_MS
    state.newest = max(state.newest, ts_ms)
    state.days.add(day)
    state.applied[message_hash(message_id)] = day
    fbits = mask & metrics.funnel_mask
    if fbits:
        state.funnel[message_id] = (ts_ms, fbits)
    for i, r in enumerate(metrics.retention):
        if mask >> r.cohort.bit & 1:
            first = state.first[i]
            state.first[i] = ts_ms if first is None else min(first, ts_ms)
        if mask >> r.returning.bit & 1:
            state.returns[i].add(r.period_of(day))
    return prune(state, metrics) if prune_history else state


def join(a: PersonState, b: PersonState, metrics: Metrics) -> PersonState:
    """The state of a person who is both a and b (an anonymous id handed to its user). Pure."""
    out = PersonState(
        max(a.newest, b.newest), a.days | b.days, {**a.funnel, **b.funnel},
        [_min(x, y) for x, y in zip(a.first, b.first, strict=True)],
        [x | y for x, y in zip(a.returns, b.returns, strict=True)],
        {**a.applied, **b.applied},
    )
    return prune(out, metrics)


def _min(x: int | None, y: int | None) -> int | None:
    if x is None:
        return y
    return x if y is None else min(x, y)


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
    for i, r in enumerate(metrics.retention):
        rs = state.returns[i]
        if rs and min(rs) + r.period_days - 1 < bound:
            state.returns[i] = {p for p in rs if p + r.period_days - 1 >= bound}
    return state


def key_open(key: Key, open_from: int, metrics: Metrics) -> bool:
    """Whether a contribution key is still derived from the state (see partials.py): a funnel day or a
    return period from `open_from` on, an activity day whose 30-day window starts there; cohort sizes
    always (first-seen is never pruned)."""
    kind = key[0]
    if kind == "f":
        return key[2] >= open_from
    if kind == "a":
        return key[2] >= open_from + 29
    _, name, cohort, n = key
    return n == 0 or cohort + n * metrics.period_days(name) >= open_from


def contributions(state: PersonState, metrics: Metrics, open_from: int) -> set[Key]:
    """The keys this person counts for, among the open ones. A pure function of the state."""
    out: set[Key] = set()
    if state.newest < 0:
        return out
    if state.funnel:
        events = list(state.funnel.values())
        for f in metrics.funnels:
            rows = []
            for ts, bits in events:
                sb = 0
                for i, step in enumerate(f.steps):
                    if bits >> step.bit & 1:
                        sb |= 1 << i
                if sb:
                    rows.append((ts, sb))
            if not rows:
                continue
            for day, level in levels_by_day(rows, len(f.steps), f.window_ms, from_day=open_from).items():
                for k in range(1, level + 1):
                    out.add(("f", f.name, day, k))
    active_from = open_from + 29
    for day in state.days:
        if day >= active_from:
            out.add(("a", "dau", day))
        for j in range(7):
            if day + j >= active_from:
                out.add(("a", "wau", day + j))
        for j in range(30):
            if day + j >= active_from:
                out.add(("a", "mau", day + j))
    for i, r in enumerate(metrics.retention):
        first = state.first[i]
        if first is None:
            continue
        cohort = r.period_of(first // DAY_MS)
        out.add(("r", r.name, cohort, 0))
        returns = state.returns[i]
        for n in range(1, r.horizon + 1):
            period = cohort + n * r.period_days
            if period >= open_from and period in returns:
                out.add(("r", r.name, cohort, n))
    return out
