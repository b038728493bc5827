"""A person's funnel level on a day: exactly ClickHouse's windowFunnel(W, 'strict_once') (docs/design.md §4).

level(p, d) = windowFunnel(W_ms, 'strict_once')(ts_ms, step1 AND toDate(ts) = d, step2, …, stepN)
over all of p's events. This follows ClickHouse's algorithm (AggregateFunctionWindowFunnel, strict_once):

- every condition an event satisfies is an entry (ts, step, event id); entries are sorted by
  (ts, step), so equal timestamps count as in order;
- every partial chain is kept (one event may satisfy several steps, and which chain it should extend is
  not known yet); a chain at level k−1 is extended by a step-k entry within W of the chain's first step,
  unless that same event is already in the chain (strict_once: one event satisfies at most one step);
- the result is the highest level any chain reached.

Chains out of the window are dropped (a later entry cannot use them: entries come in time order), which
only bounds memory. The property tests compare this against chdb, cell by cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flywheel.model.clock import DAY_MS


def window_funnel(rows: Iterable[tuple[int, int]], n_steps: int, window_ms: int) -> int:
    """rows: (ts_ms, step_bits) with bit i set when the event satisfies step i+1. Returns 0..n_steps."""
    entries = [
        (ts, step, uid)
        for uid, (ts, bits) in enumerate(rows)
        for step in range(n_steps)
        if bits >> step & 1
    ]
    if not entries:
        return 0
    if n_steps == 1:
        return 1
    entries.sort()
    # chains[k]: chains that reached level k+1, as (first_ts, ids of the events used at levels 1..k+1)
    chains: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in range(n_steps)]
    for ts, step, uid in entries:
        if step == 0:
            chains[0].append((ts, (uid,)))
            continue
        prev = chains[step - 1]
        if not prev:
            continue
        kept = []
        for first, path in prev:
            if ts > first + window_ms:
                continue  # out of the window for this and every later entry
            kept.append((first, path))
            if uid not in path:
                chains[step].append((first, path + (uid,)))
                if step + 1 == n_steps:
                    return n_steps
        # ClickHouse keeps at least one chain per level; so do we (it only marks the level reached).
        chains[step - 1] = kept or prev[-1:]
    for level in range(n_steps, 0, -1):
        if chains[level - 1]:
            return level
    return 0


def levels_by_day(events: Sequence[tuple[int, int]], n_steps: int, window_ms: int, *, from_day: int) -> dict[int, int]:
    """{day: level} for every UTC day ≥ from_day on which the person did step 1 (events: (ts_ms, step_bits)).

    Step 1 counts only on its day; later steps count whenever they happen, so a chain may cross midnight.
    """
    ordered = sorted(events)
    days = sorted({ts // DAY_MS for ts, bits in ordered if bits & 1 and ts // DAY_MS >= from_day})
    out: dict[int, int] = {}
    for day in days:
        start, end = day * DAY_MS, (day + 1) * DAY_MS
        rows = [
            (ts, bits if start <= ts < end else bits & ~1)
            for ts, bits in ordered
            # nothing earlier can follow a step 1 of this day; nothing later is in its window
            if start <= ts < end + window_ms
        ]
        level = window_funnel(rows, n_steps, window_ms)
        if level:
            out[day] = level
    return out
