"""Partition partials (DESIGN §4): incrementally maintained partials equal a rebuild from the person
states at every step, and publishing drains each changed cell once with its absolute value."""

from __future__ import annotations

from collections import Counter

from flywheel.metrics.definitions import DAY_MS, parse_metrics
from flywheel.metrics.partials import Partials, record_key, records
from flywheel.metrics.person import PersonState, apply, contributions, join, key_open
from hypothesis import given, settings
from hypothesis import strategies as st

METRICS = parse_metrics({
    "lateness": "1d", "close_after": "2d",
    "funnels": [{"name": "f", "window": "1d", "steps": [{"event": "A"}, {"event": "B"}]}],
    "retention": [{"name": "r", "cohort_event": "any", "return_event": "B", "period": "day", "horizon": 3}],
})
BASE = 20_000

# (person, day, hour, name) or ("merge", from, into)
op_st = st.one_of(
    st.tuples(st.integers(0, 5), st.integers(0, 90), st.integers(0, 23), st.sampled_from(["A", "B", "C"])),
    st.tuples(st.just("merge"), st.integers(0, 5), st.integers(0, 5)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_incremental_partials_equal_a_rebuild_at_every_step(ops):
    partials = Partials(METRICS)
    partials.rebuild(0, [], -1)
    states: dict[int, PersonState] = {}
    published: dict[tuple, int] = {}
    for i, op in enumerate(ops):
        if op[0] == "merge":
            _, a, b = op
            if a == b or a not in states:
                continue
            old_a, old_b = states.pop(a), states.get(b)
            new_b = join(old_b, old_a, METRICS) if old_b is not None else old_a.copy()
            partials.advance(0, new_b.newest)
            partials.update(0, old_a, None)
            partials.update(0, old_b, new_b)
            states[b] = new_b
        else:
            person, day, hour, name = op
            ts = (BASE + day) * DAY_MS + hour * 3_600_000
            old = states.get(person)
            new = old.copy() if old is not None else PersonState.empty(METRICS)
            apply(new, f"m{i}", ts, METRICS.mask(name, {}), METRICS)
            partials.advance(0, ts)
            partials.update(0, old, new)
            states[person] = new
        published.update(dict(partials.drain(0)))

        rebuilt = Partials(METRICS)
        rebuilt.rebuild(0, states.values(), partials.parts[0].watermark)
        live = Counter({k: v for k, v in partials.parts[0].counts.items() if v})
        assert live == +rebuilt.parts[0].counts
        # what a consumer of the topic sees for open cells is the live value
        open_from = partials.open_from(0)
        assert {k: v for k, v in published.items() if v and key_open(k, open_from, METRICS)} == dict(live)


def test_records_and_keys_are_documented_shapes():
    state = PersonState.empty(METRICS)
    apply(state, "m1", BASE * DAY_MS, METRICS.mask("A", {}), METRICS)
    apply(state, "m2", BASE * DAY_MS + 60_000, METRICS.mask("B", {}), METRICS)
    cells = sorted((k, 1) for k in contributions(state, METRICS, open_from=0))
    out = records(cells, partition=3, version=7)
    assert {"funnel": "f", "day": "2024-10-04", "step": 2, "partition": 3, "persons": 1, "version": 7} in out["funnels"]
    assert {"retention": "r", "cohortDay": "2024-10-04", "period": 0, "partition": 3, "persons": 1,
            "version": 7} in out["retention"]
    assert {"day": "2024-10-04", "kind": "dau", "partition": 3, "persons": 1, "version": 7} in out["active_users"]
    assert record_key("funnels", out["funnels"][0]).decode().endswith("|3")
