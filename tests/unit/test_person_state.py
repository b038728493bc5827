"""Algebra of the person state (docs/design.md §4): idempotent apply; join commutative, associative, idempotent;
pruning never changes an open key; serialization round-trips."""

from __future__ import annotations

import orjson
from flywheel.metrics.cells import is_open, kind_of
from flywheel.metrics.definitions import Funnel, parse_metrics
from flywheel.metrics.person import (
    PersonState,
    apply,
    changed_contributions,
    contributions,
    experiment_history_cut,
    join,
)
from flywheel.model.clock import DAY_MS
from hypothesis import given, settings
from hypothesis import strategies as st

SPEC = {
    "lateness": "1d",
    "funnels": [{"name": "f", "window": "2d", "steps": [{"event": "A"}, {"event": "B"}, {"event": "A"}]}],
    "retention": [
        {"name": "d", "cohort_event": "A", "return_event": "any", "period": "day", "horizon": 4},
        {"name": "w", "cohort_event": "any", "return_event": "B", "period": "week", "horizon": 3},
    ],
}
METRICS = parse_metrics(SPEC)
WITH_LIFECYCLE = parse_metrics({**SPEC, "lifecycle": {"period": "week"}})
BASE = 20_000

event_st = st.tuples(st.integers(0, 120), st.integers(0, 23), st.sampled_from(["A", "B", "C"]))
events_st = st.lists(event_st, max_size=25, unique_by=lambda e: e)


def build(events, *, prune=True, prefix="m") -> PersonState:
    state = PersonState()
    for _i, (day, hour, name) in enumerate(events):
        ts = (BASE + day) * DAY_MS + hour * 3_600_000
        apply(state, f"{prefix}{day}-{hour}-{name}", ts, METRICS.matching(name, {}), METRICS, prune_history=prune)
    return state


def same(a: PersonState, b: PersonState) -> bool:
    return a.to_json() == b.to_json()


@given(events_st)
def test_applying_everything_twice_changes_nothing(events):
    once = build(events)
    twice = build(events + events)
    assert same(once, twice)


@given(events_st, events_st)
def test_arrival_order_does_not_matter_without_late_events(a, b):
    # no lateness check here: apply itself is order-free (the late verdict is the aggregate stage's, tested elsewhere)
    assert same(build(a + b), build(b + a))


@settings(max_examples=200)
@given(events_st, events_st, events_st)
def test_join_is_commutative_associative_idempotent(a, b, c):
    sa, sb, sc = build(a, prefix="a"), build(b, prefix="b"), build(c, prefix="c")
    assert same(join(sa, sb, METRICS), join(sb, sa, METRICS))
    assert same(join(join(sa, sb, METRICS), sc, METRICS), join(sa, join(sb, sc, METRICS), METRICS))
    assert same(join(sa, sa, METRICS), sa)


@given(events_st, events_st)
def test_join_equals_applying_both_streams_to_one_state(a, b):
    assert same(join(build(a, prefix="a"), build(b, prefix="b"), METRICS), _both(a, b))


def _both(a, b) -> PersonState:
    state = build(a, prefix="a")
    for _i, (day, hour, name) in enumerate(b):
        ts = (BASE + day) * DAY_MS + hour * 3_600_000
        apply(state, f"b{day}-{hour}-{name}", ts, METRICS.matching(name, {}), METRICS)
    return state


@settings(max_examples=200)
@given(events_st)
def test_pruning_never_changes_an_open_key(events):
    pruned, full = build(events), build(events, prune=False)
    if pruned.newest < 0:
        return
    open_from = pruned.newest // DAY_MS - METRICS.horizon_days
    want = {k for k in contributions(full, METRICS, open_from=-(10**6)) if is_open(k, open_from)}
    assert contributions(pruned, METRICS, open_from) == want


@settings(max_examples=200)
@given(events_st, events_st, st.integers(-40, 140))
def test_the_changed_families_give_the_whole_difference(a, b, open_from):
    """The partials' delta computes only the families of cells whose part of the state changed: the cells it
    adds and removes are exactly those of the whole contributions, for any event after any history."""
    old = build(a)
    for extra in b:  # one event at a time, as the stage may see it
        new = old.copy()
        day, hour, name = extra
        ts = (BASE + day) * DAY_MS + hour * 3_600_000
        apply(new, f"n{day}-{hour}-{name}", ts, WITH_LIFECYCLE.matching(name, {}), WITH_LIFECYCLE)
        before, after = changed_contributions(old, new, WITH_LIFECYCLE, BASE + open_from)
        full_before = contributions(old, WITH_LIFECYCLE, BASE + open_from)
        full_after = contributions(new, WITH_LIFECYCLE, BASE + open_from)
        assert before - after == full_before - full_after
        assert after - before == full_after - full_before
        old = new


def test_state_is_bounded_by_the_horizon():
    state = build([(d, 1, "A") for d in range(0, 400, 3)])
    newest_day = state.newest // DAY_MS
    assert min(state.days) >= newest_day - METRICS.horizon_days
    assert all(ts // DAY_MS >= newest_day - METRICS.horizon_days for ts, _ in state.funnel.values())
    cohort_a = METRICS.retention[0].cohort.pid
    assert state.first[cohort_a] == BASE * DAY_MS + 3_600_000  # first-seen is kept for good


@given(events_st)
def test_serialization_round_trips(events):
    state = build(events)
    assert same(PersonState.from_json(orjson.loads(orjson.dumps(state.to_json())), METRICS), state)


def test_a_redelivered_event_is_recognised_after_newer_events_made_it_look_late():
    from flywheel.metrics.person import is_late

    state = PersonState()
    apply(state, "old", BASE * DAY_MS, METRICS.matching("C", {}), METRICS)  # no funnel step: only the hash remembers
    apply(state, "new", (BASE + 3) * DAY_MS, METRICS.matching("C", {}), METRICS)
    assert is_late(state, BASE * DAY_MS, METRICS)  # lateness 1d: it would be late now...
    assert state.has_applied("old") and not state.has_applied("other")  # ...but it was applied


def test_a_state_of_the_first_format_reads_as_the_same_person():
    """Written by 7ae8eae: funnel bits by position in the metrics file (A=0, B=1 for funnel f; retention d's
    cohort A is bit 0 again, its return `any` bit 2; w's cohort `any` bit 2, return B bit 1), cohorts and
    returns as lists by retention index, returns as period start days (a Monday for the weekly one)."""
    events = [(0, 1, "A"), (1, 2, "B"), (2, 3, "A"), (8, 1, "B")]
    v2 = build(events)
    day = BASE + 8
    monday = day - (day + 3) % 7
    v1 = {
        "n": (BASE + 8) * DAY_MS + 3_600_000,
        "d": [BASE, BASE + 1, BASE + 2, BASE + 8],
        "f": {"m0-1-A": [BASE * DAY_MS + 3_600_000, 0b101], "m1-2-B": [(BASE + 1) * DAY_MS + 7_200_000, 0b110],
              "m2-3-A": [(BASE + 2) * DAY_MS + 10_800_000, 0b101], "m8-1-B": [(BASE + 8) * DAY_MS + 3_600_000, 0b110]},
        "c": [BASE * DAY_MS + 3_600_000, BASE * DAY_MS + 3_600_000],
        "r": [[BASE, BASE + 1, BASE + 2, BASE + 8], [BASE + 1 - (BASE + 1 + 3) % 7, monday]],
        "m": [[h, d] for h, d in v2.applied.items()],
    }
    old = PersonState.from_json(v1, METRICS)
    assert contributions(old, METRICS, open_from=0) == contributions(v2, METRICS, open_from=0)
    assert PersonState.from_json(orjson.loads(orjson.dumps(old.to_json())), METRICS).to_json() == old.to_json()


def test_history_of_a_removed_definition_is_dropped_and_the_rest_kept():
    state = build([(0, 1, "A"), (1, 2, "B"), (2, 3, "A")])
    fewer = parse_metrics({"lateness": "1d", "retention": [
        {"name": "d", "cohort_event": "A", "return_event": "any", "period": "day", "horizon": 4}]})
    kept = PersonState.from_json(state.to_json(), fewer)
    assert kept.funnel == {} and kept.legend == []  # funnel f is gone, and with it its conditions' events
    d = fewer.retention[0]
    assert set(kept.first) == {d.cohort.pid} and set(kept.returns) == {d.returning.pid}
    # retention d counts the same; funnel f and retention w are no longer there to count
    same_kind = {(kind_of(c).name, kind_of(c).values(c)) for c in contributions(state, METRICS, 0)
                 if not isinstance(c[0], Funnel) and c[0] is not METRICS.retention[1]}
    assert {(kind_of(c).name, kind_of(c).values(c)) for c in contributions(kept, fewer, 0)} == same_kind


def test_experiment_history_within_an_exposure_window_is_kept_for_good():
    """Part values older than the horizon are pruned unless they lie in one of the person's exposure windows;
    the exposure is kept for good; the state round-trips; an experiment removed from the file drops both."""
    from experiments_gen import SPEC

    metrics = parse_metrics({**SPEC, "lateness": "1d", "close_after": "1d"})

    def event(state: PersonState, mid: str, day: float, name: str, props: dict) -> None:
        apply(state, mid, BASE * DAY_MS + int(day * DAY_MS), metrics.matching(name, props), metrics, properties=props)

    exposed, other = PersonState(), PersonState()
    for state in (exposed, other):
        event(state, "o0", 0.5, "Order Completed", {"revenue": 3})  # half a day before the exposure
    event(exposed, "x", 1, "Experiment Viewed", {"experiment_id": "checkout_button", "variation_id": "green"})
    for state in (exposed, other):
        event(state, "o1", 2, "Order Completed", {"revenue": 5})  # within 2 days of the exposure
        event(state, "o2", 4, "Order Completed", {"revenue": 7})  # after the window
        event(state, "late-news", 100, "Checkout Started", {})  # the horizon moves 100 days on
    assert not other.parts.get(next(k for k in metrics.part_windows if k.endswith("|revenue")))
    kept = exposed.parts[next(k for k in metrics.part_windows if k.endswith("|revenue"))]
    # o0: in CUPED's day before the exposure; o1: within 2 days after it; o2 after the window: gone
    assert sorted(v for _, v in kept.values()) == [3_000_000, 5_000_000]
    assert exposed.exposures[next(iter(metrics.exposure_keys))][2] == "green"
    assert exposed.to_json()["x"] and PersonState.from_json(orjson.loads(orjson.dumps(exposed.to_json())),
                                                            metrics).to_json() == exposed.to_json()
    without = parse_metrics({"lateness": "1d", "close_after": "1d"})
    dropped = PersonState.from_json(exposed.to_json(), without)
    assert not dropped.exposures and not dropped.parts


def test_a_join_that_may_miss_experiment_values_is_recognised():
    """A device exposed on day 1 and linked to a user whose state ran on for longer than the horizon without
    that exposure: the user's events in the window may be pruned (counted and logged by the aggregate stage).
    Linked within the horizon, or the user exposed as early: nothing is missing."""
    from experiments_gen import SPEC

    metrics = parse_metrics({**SPEC, "lateness": "1d", "close_after": "1d"})

    def state(*events: tuple[str, float, str, dict]) -> PersonState:
        s = PersonState()
        for mid, day, name, props in events:
            apply(s, mid, BASE * DAY_MS + int(day * DAY_MS), metrics.matching(name, props), metrics,
                  properties=props)
        return s

    seen = ("x", 1, "Experiment Viewed", {"experiment_id": "checkout_button", "variation_id": "green"})
    device = state(seen)
    user_long = state(("o1", 1.5, "Order Completed", {"revenue": 5}), ("c", 60, "Checkout Started", {}))
    user_soon = state(("o1", 1.5, "Order Completed", {"revenue": 5}), ("c", 20, "Checkout Started", {}))
    assert experiment_history_cut(user_long, device, metrics) == list(metrics.exposure_keys)
    assert experiment_history_cut(device, user_long, metrics) == list(metrics.exposure_keys)
    assert experiment_history_cut(user_soon, device, metrics) == []
    also_seen = state(("y", 0.5, *seen[2:]), ("c", 60, "Checkout Started", {}))
    assert experiment_history_cut(also_seen, device, metrics) == []
