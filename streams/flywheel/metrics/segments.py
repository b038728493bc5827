"""Segment membership: a pure function of a person's state and the time now (docs/design.md §9).

A segment's windows are relative to now ("performed within 7d" = an event in (now − 7d, now]), so
membership changes as time passes, without a new event. `is_member` says who is a member now and
`next_change` when that may change next without an event: the earliest time an event enters a window
(an event dated after now) or leaves one (its time + the window). The aggregate stage keeps, per
partition, an index of those times and re-evaluates a person when its time comes (the sweep), so an exit
needs no scan of all persons.

The person state keeps, per condition predicate, the event times within the window (person.prune), and
`trim` cuts them, given now, to what can still decide: every event dated after now (each counts from its
time on), and the newest `Performed.keep` of the others — n decide "at least n", n + 1 "at most n" and
"exactly n". Older ones can never count again while now only moves forward.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from flywheel.metrics.definitions import Condition, Group, Metrics, Performed, Segment, Trait, same_json_value
from flywheel.metrics.person import PersonState
from flywheel.model.clock import DAY_MS, iso_ms
from flywheel.model.envelope import AUDIENCE_ENTERED, AUDIENCE_EXITED

NEVER = -1


def _count(times: list[tuple[int, int]], now: int, within_ms: int) -> int:
    """Events with now − within < ts ≤ now."""
    return bisect.bisect_right(times, (now, 1 << 63)) - bisect.bisect_right(times, (now - within_ms, 1 << 63))


def holds(c: Condition, state: PersonState, now: int) -> bool:
    if isinstance(c, Performed):
        k = _count(state.events.get(c.predicate.pid, ()), now, c.within_ms)
        if c.negate:
            return k == 0
        return k >= c.n if c.op == "gte" else k <= c.n if c.op == "lte" else k == c.n
    if isinstance(c, Trait):
        value = state.traits.get(c.key)
        return value is not None and same_json_value(value[0], c.value)
    if c.every:
        return all(holds(i, state, now) for i in c.items)
    return any(holds(i, state, now) for i in c.items)


def is_member(segment: Segment, state: PersonState, now: int) -> bool:
    """Whether the person is in the segment at `now` (ms): in its universe and meeting its condition. A
    segment without a universe window takes every person with a state (docs/design.md §9)."""
    if segment.universe is not None and not holds(segment.universe, state, now):
        return False
    return holds(segment.condition, state, now)


def _changes(c: Condition, state: PersonState, now: int, out: list[int]) -> None:
    if isinstance(c, Performed):
        times = state.events.get(c.predicate.pid)
        if not times:
            return
        i = bisect.bisect_right(times, (now - c.within_ms, 1 << 63))  # the oldest still in the window
        if i < len(times):
            ts = times[i][0]
            out.append(ts + c.within_ms if ts <= now else ts)
        j = bisect.bisect_right(times, (now, 1 << 63))  # the next to enter it
        if j < len(times):
            out.append(times[j][0])
    elif isinstance(c, Group):
        for item in c.items:
            _changes(item, state, now, out)


def next_change(segments: Iterable[Segment], state: PersonState, now: int) -> int:
    """The earliest time after `now` at which a segment's membership may change without an event (NEVER if
    none): until then `is_member` gives the same answer for every segment."""
    out: list[int] = []
    for seg in segments:
        if seg.universe is not None:
            _changes(seg.universe, state, now, out)
        _changes(seg.condition, state, now, out)
    return min(out, default=NEVER)


def trim(state: PersonState, metrics: Metrics, now: int) -> None:
    """Cut the segment event times to those that can still decide a membership at `now` or later."""
    for pid, times in state.events.items():
        keep = metrics.segment_pids[pid][0]
        if len(times) > keep:
            past = bisect.bisect_right(times, (now, 1 << 63))
            if past > keep:
                del times[:past - keep]


def memberships(state: PersonState | None, metrics: Metrics, now: int) -> dict[str, str]:
    """segment name → version, for the segments the person is a member of at `now` (none without a state)."""
    if state is None or state.newest < 0:
        return {}
    return {s.name: s.version for s in metrics.segments if is_member(s, state, now)}


# ---- what the stream publishes -----------------------------------------------------------------------


def decide(before: dict[str, tuple[str, int]], now_members: dict[str, str],
           now: int) -> tuple[dict[str, tuple[str, int]], list[tuple[str, str, str, int]]]:
    """Memberships as last decided (segment → (version, since)) and the segments a person is in now
    (segment → version) → the memberships to keep and the changes, as (event, segment, version, since):
    exits first. A segment whose version changed is left and entered again."""
    after = {name: (version, before[name][1] if before.get(name, ("",))[0] == version else now)
             for name, version in now_members.items()}
    changes = [(AUDIENCE_EXITED, name, version, since) for name, (version, since) in sorted(before.items())
               if after.get(name, ("",))[0] != version]
    changes += [(AUDIENCE_ENTERED, name, version, since) for name, (version, since) in sorted(after.items())
                if before.get(name, ("",))[0] != version]
    return after, changes


def audience_record(event: str, segment: str, version: str, person: str, *, user: bool, at: int,
                    since: int) -> tuple[bytes, dict]:
    """A change of membership as a Segment-spec track call (README "Topics"), keyed `segment|person`: a
    compacted topic keeps each person's latest. The messageId is the change's, so a re-publication after a
    crash is recognisable downstream."""
    key = f"{segment}|{person}"
    digest = hashlib.blake2b(f"{key}|{event}|{version}|{since}".encode(), digest_size=12).hexdigest()
    return key.encode(), {
        "type": "track", "event": event, "messageId": f"audience-{digest}",
        "userId": person if user else None, "anonymousId": None if user else person,
        "timestamp": iso_ms(at),
        "properties": {"audience_key": segment, "segment": segment, "person_id": person, "version": version,
                       "since": iso_ms(since)},
        "context": {"library": {"name": "flywheel"}},
    }


def describe_segment(segment: Segment) -> str:
    """One line for people: `all(Product Viewed {'category': 'shoes'} >= 3 within 7d, ...); among persons
    active within 30d`."""
    ops = {"gte": ">=", "lte": "<=", "eq": "=="}

    def within(ms: int) -> str:
        for unit, size in (("d", DAY_MS), ("h", 3_600_000), ("m", 60_000)):
            if ms % size == 0:
                return f"{ms // size}{unit}"
        return f"{ms // 1000}s"

    def text(c: Condition) -> str:
        if isinstance(c, Performed):
            what = (c.predicate.event or "any activity") + (f" {dict(c.predicate.where)}" if c.predicate.where else "")
            if c.negate:
                return f"no {what if c.predicate.event else 'activity'} within {within(c.within_ms)}"
            return f"{what} {ops[c.op]} {c.n} within {within(c.within_ms)}"
        if isinstance(c, Trait):
            return f"trait {c.key} = {c.value!r}"
        return ("all(" if c.every else "any(") + ", ".join(text(i) for i in c.items) + ")"

    among = (f"among persons active within {within(segment.universe.within_ms)}" if segment.universe is not None
             else "among every person seen")
    return f"{text(segment.condition)}; {among}"
