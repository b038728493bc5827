"""RFM: recency, frequency and monetary value per person, scored 1–5 by global quintiles (docs/design.md §9).

Pure. For a person at time `now`, over the orders (the metrics file's `rfm.event`) within the window
(now − window, now]:

- recency: whole days since the newest of them, (now − last) // 1 day;
- frequency: how many;
- monetary: the sum of their `rfm.monetary` property (a number; anything else counts 0), rounded to 6
  decimals (so the order of a float sum cannot move a score).

A person with no order in the window is not scored. Scores are by quintile over every scored person —
global, not per partition: cut k (k = 1..4) is the value at rank ceil(k·n/5) of the n values sorted
ascending, and a value scores 1 + the number of cuts strictly below it (5 − that for recency: the most
recent score 5). Equal values get equal scores. The R and F scores place a person in one of the 10
segments of the standard grid (`GRID`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flywheel.model.clock import DAY_MS, iso_ms

# (R scores, F scores) → segment, the standard R×F grid; every (r, f) in 1..5 × 1..5 has exactly one.
GRID = (
    ((1, 2), (1, 2), "hibernating"),
    ((1, 2), (3, 4), "at_risk"),
    ((1, 2), (5,), "cant_lose"),
    ((3,), (1, 2), "about_to_sleep"),
    ((3,), (3,), "need_attention"),
    ((3, 4), (4, 5), "loyal"),
    ((4,), (1,), "promising"),
    ((5,), (1,), "new"),
    ((4, 5), (2, 3), "potential_loyalist"),
    ((5,), (4, 5), "champions"),
)
SEGMENTS = tuple(name for _, _, name in GRID)
_BY_SCORES = {(r, f): name for rs, fs, name in GRID for r in rs for f in fs}


def grid_segment(r: int, f: int) -> str:
    return _BY_SCORES[(r, f)]


def summary(orders: Sequence[tuple], now: int, window_ms: int) -> tuple[int, int, float] | None:
    """(time of the newest order, frequency, monetary) at `now` from (time, amount, ...) orders — a person
    state's, sorted by time — or None without an order in the window. What the stream publishes per person:
    recency follows from it at any later time."""
    inside = [(o[0], o[1]) for o in orders if now - window_ms < o[0] <= now]
    if not inside:
        return None
    return inside[-1][0], len(inside), round(sum(amount for _, amount in inside), 6)


def values(orders: Sequence[tuple], now: int, window_ms: int) -> tuple[int, int, float] | None:
    """(recency days, frequency, monetary) at `now`, or None without an order in the window."""
    s = summary(orders, now, window_ms)
    return None if s is None else ((now - s[0]) // DAY_MS, s[1], s[2])


def next_change(orders: Sequence[tuple], now: int, window_ms: int) -> int:
    """When `summary` may next change without a new order (-1: never): the oldest order in the window leaves
    it, or an order dated after now enters it."""
    out = [o[0] + window_ms for o in orders if now - window_ms < o[0] <= now][:1]
    out += [o[0] for o in orders if o[0] > now][:1]
    return min(out, default=-1)


def cuts(column: Iterable[float]) -> tuple[float, ...]:
    """The four quintile cuts of one dimension over every scored person (empty: no cut)."""
    ordered = sorted(column)
    n = len(ordered)
    if not n:
        return ()
    return tuple(ordered[max(1, -(-k * n // 5)) - 1] for k in range(1, 5))


def score(value: float, cut_points: Sequence[float], *, reverse: bool = False) -> int:
    below = sum(1 for c in cut_points if c < value)
    return 5 - below if reverse else 1 + below


def scores(people: dict[str, tuple[int, int, float]]) -> dict[str, tuple[int, int, int, str]]:
    """person → (r, f, m, segment), for every scored person."""
    r_cuts = cuts(v[0] for v in people.values())
    f_cuts = cuts(v[1] for v in people.values())
    m_cuts = cuts(v[2] for v in people.values())
    out = {}
    for person, (recency, frequency, monetary) in people.items():
        r, f = score(recency, r_cuts, reverse=True), score(frequency, f_cuts)
        out[person] = (r, f, score(monetary, m_cuts), grid_segment(r, f))
    return out


def summary_record(person: str, summary: tuple[int, int, float] | None, now: int, *, user: bool = False) -> dict:
    """A person's RFM summary as published on segments.rfm (keyed by the person; a compacted topic keeps the
    latest): the newest order's time, frequency and monetary in the window at `at` — frequency 0 when the
    person has no order in it any more."""
    last, frequency, monetary = summary if summary is not None else (None, 0, 0.0)
    return {"person": person, "user": user, "lastOrder": iso_ms(last) if last is not None else None,
            "frequency": frequency, "monetary": monetary, "at": iso_ms(now)}
