"""Partition partials (docs/design.md §4): incrementally maintained partials equal a count over the person
states at every step; a change is applied only when committed; a cell stays due until its value is
published; the one record format of a cell."""

from __future__ import annotations

from collections import Counter
from datetime import date

from flywheel.metrics.cells import KIND_BY_NAME, cell_id, is_open, parse_cell_id, record, row
from flywheel.metrics.definitions import Funnel, Retention, parse_metrics
from flywheel.metrics.partials import Partials, count
from flywheel.metrics.person import PersonState, apply, contributions, join
from flywheel.model.clock import DAY_MS
from hypothesis import given, settings
from hypothesis import strategies as st

SPEC = {
    "lateness": "1d", "close_after": "2d",
    "funnels": [{"name": "f", "window": "1d", "steps": [{"event": "A"}, {"event": "B"}]}],
    "retention": [{"name": "r", "cohort_event": "any", "return_event": "B", "period": "day", "horizon": 3}],
}
METRICS = parse_metrics(SPEC)
BASE = 20_000

# (person, day, hour, name) or ("merge", from, into)
op_st = st.one_of(
    st.tuples(st.integers(0, 5), st.integers(0, 90), st.integers(0, 23), st.sampled_from(["A", "B", "C"])),
    st.tuples(st.just("merge"), st.integers(0, 5), st.integers(0, 5)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=40), st.lists(st.booleans(), max_size=40))
def test_incremental_partials_equal_a_count_at_every_step(ops, lost):
    """After each person change: the partials equal a count over the states, and what a consumer of the
    topic holds for open cells is the live value — also when a publication is lost (it stays due)."""
    partials = Partials(METRICS)
    partials.load(0, -1, {})
    states: dict[int, PersonState] = {}
    published: dict = {}
    for i, op in enumerate(ops):
        if op[0] == "merge":
            _, a, b = op
            if a == b or a not in states:
                continue
            old_a, old_b = states.pop(a), states.get(b)
            new_b = join(old_b, old_a, METRICS) if old_b is not None else old_a.copy()
            change = partials.change(0, new_b.newest, partials.delta(0, new_b.newest, [(old_a, None), (old_b, new_b)]))
            states[b] = new_b
        else:
            person, day, hour, name = op
            ts = (BASE + day) * DAY_MS + hour * 3_600_000
            old = states.get(person)
            new = old.copy() if old is not None else PersonState()
            apply(new, f"m{i}", ts, METRICS.matching(name, {}), METRICS)
            change = partials.change(0, ts, partials.delta(0, ts, [(old, new)]))
            states[person] = new
        partials.commit(change)
        due = partials.unpublished(0)
        if i < len(lost) and lost[i]:
            continue  # this publication never landed: its cells stay due
        published.update(dict(due))
        partials.published(0, due)

        part = partials.parts[0]
        counted = count(states.values(), METRICS, part.open_from)
        assert Counter({k: v for k, v in part.counts.items() if v}) == +counted
        if not partials.unpublished(0):
            assert {k: v for k, v in published.items() if v and is_open(k, part.open_from)} == dict(+counted)


def test_a_change_is_nothing_until_committed():
    partials = Partials(METRICS)
    partials.load(0, -1, {})
    state = PersonState()
    apply(state, "m1", BASE * DAY_MS, METRICS.matching("A", {}), METRICS)
    change = partials.change(0, BASE * DAY_MS, partials.delta(0, BASE * DAY_MS, [(None, state)]))
    assert not partials.parts[0].counts and not partials.unpublished(0) and partials.parts[0].watermark == -1
    assert change.values and all(v == 1 for v in change.values.values())
    partials.commit(change)
    assert dict(partials.unpublished(0)) == change.values


def test_records_and_keys_are_documented_shapes():
    state = PersonState()
    apply(state, "m1", BASE * DAY_MS, METRICS.matching("A", {}), METRICS)
    apply(state, "m2", BASE * DAY_MS + 60_000, METRICS.matching("B", {}), METRICS)
    out: dict[str, list] = {}
    keys = []
    for cell in contributions(state, METRICS, open_from=0):
        kind, key, rec = record(cell, partition=3, persons=1, version=7)
        out.setdefault(kind.name, []).append(rec)
        keys.append(key.decode())
    assert {"funnel": "f", "day": "2024-10-04", "step": 2, "partition": 3, "persons": 1, "version": 7} in out["funnels"]
    assert {"retention": "r", "cohortDay": "2024-10-04", "period": 0, "partition": 3, "persons": 1,
            "version": 7} in out["retention"]
    assert {"day": "2024-10-04", "kind": "dau", "partition": 3, "persons": 1, "version": 7} in out["active_users"]
    assert "f|2024-10-04|2|3" in keys and "dau|2024-10-04|3" in keys and "r|2024-10-04|0|3" in keys
    rows = {kind: [row(KIND_BY_NAME[kind], r) for r in recs] for kind, recs in out.items()}
    assert {"funnel": "f", "day": date(2024, 10, 4), "step": 2, "kafka_partition": 3, "persons": 1,
            "version": 7} in rows["funnels"]
    assert {"retention": "r", "cohort_day": date(2024, 10, 4), "period": 0, "kafka_partition": 3, "persons": 1,
            "version": 7} in rows["retention"]


def test_cell_ids_round_trip_through_the_registry_and_name_the_version():
    state = PersonState()
    apply(state, "m1", BASE * DAY_MS, METRICS.matching("A", {}), METRICS)
    apply(state, "m2", BASE * DAY_MS + 60_000, METRICS.matching("B", {}), METRICS)
    cells = contributions(state, METRICS, open_from=0)
    assert {parse_cell_id(cell_id(c), METRICS) for c in cells} == cells
    changed = parse_metrics({**SPEC, "funnels": [{**SPEC["funnels"][0], "window": "2d"}]})
    funnel_cell = next(c for c in cells if isinstance(c[0], Funnel))
    assert parse_cell_id(cell_id(funnel_cell), changed) is None  # another version of "f": not this cell
    assert parse_cell_id(cell_id(next(c for c in cells if isinstance(c[0], Retention))), changed) is not None
