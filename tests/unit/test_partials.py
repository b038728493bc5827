"""Partition partials (docs/design.md §4): incrementally maintained partials equal a count over the person
states at every step; a change is applied only when committed; a cell stays due until its value is
published; the one record format of a cell."""

from __future__ import annotations

from collections import Counter
from datetime import date

from experiments_gen import SPEC as X_SPEC
from experiments_gen import event_st, rows_and_persons
from flywheel.metrics import exposures
from flywheel.metrics.cells import KIND_BY_NAME, cell_id, is_open, kind_of, parse_cell_id, record, row
from flywheel.metrics.definitions import Funnel, Retention, parse_metrics
from flywheel.metrics.exposures import EXCLUDED, STATS, Event
from flywheel.metrics.partials import Partials, count
from flywheel.metrics.person import PersonState, apply, contributions, is_late, join
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
        kind, key, rec = record(cell, partition=3, value=1, version=7)
        out.setdefault(kind.name, []).append(rec)
        keys.append(key.decode())
    f, r = METRICS.funnels[0].version, METRICS.retention[0].version  # a changed definition: a new version
    assert {"funnel": "f", "definitionVersion": f, "day": "2024-10-04", "step": 2, "partition": 3, "persons": 1,
            "version": 7} in out["funnels"]
    assert {"retention": "r", "definitionVersion": r, "cohortDay": "2024-10-04", "period": 0, "partition": 3,
            "persons": 1, "version": 7} in out["retention"]
    assert {"day": "2024-10-04", "kind": "dau", "partition": 3, "persons": 1, "version": 7} in out["active_users"]
    assert f"f|{f}|2024-10-04|2|3" in keys and "dau|2024-10-04|3" in keys and f"r|{r}|2024-10-04|0|3" in keys
    rows = {kind: [row(KIND_BY_NAME[kind], r) for r in recs] for kind, recs in out.items()}
    assert {"funnel": "f", "definition_version": f, "day": date(2024, 10, 4), "step": 2, "kafka_partition": 3,
            "persons": 1, "version": 7} in rows["funnels"]
    assert {"retention": "r", "definition_version": r, "cohort_day": date(2024, 10, 4), "period": 0,
            "kafka_partition": 3, "persons": 1, "version": 7} in rows["retention"]


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


# ---- experiments: the one weighted kind (exposures.cells) ------------------------------------------------

X_METRICS = parse_metrics({**X_SPEC, "lateness": "1d", "close_after": "1d"})


def _stream(events: list[tuple], replay: list[tuple[str, Event]], joins: list[tuple[str, list[str]]]):
    """The aggregate's per-person work, emulated: `replay` (owner, event) applied to the owners' states (skipping
    redeliveries and late events), then each user's devices joined into it; every change through the partials.
    Returns (partials' counts, the non-late events per user, the final states)."""
    partials = Partials(X_METRICS)
    partials.load(0, -1, {})
    states: dict[str, PersonState] = {}
    kept: dict[str, list[Event]] = {}

    def change(key: str, new: PersonState | None) -> None:
        old = states.get(key)
        wm = new.newest if new is not None else -1
        partials.commit(partials.change(0, wm, partials.delta(0, wm, [(old, new)])))
        if new is None:
            states.pop(key, None)
        else:
            states[key] = new

    for owner, e in replay:
        state = states[owner].copy() if owner in states else PersonState()
        if state.has_applied(e.message_id) or is_late(state, e.ts, X_METRICS):
            continue
        apply(state, e.message_id, e.ts, X_METRICS.matching(e.name, dict(e.properties), e.mtype), X_METRICS,
              properties=dict(e.properties))
        kept.setdefault(owner.split("-")[0], []).append(e)
        change(owner, state)
    for user, devices in joins:
        for device in devices:
            if device in states:
                into = states.get(user, PersonState())
                change(user, join(into, states[device], X_METRICS))
                change(device, None)
    return partials.parts[0].counts, kept, states


def _experiment_cells(counts: Counter) -> dict:
    return {c: v for c, v in counts.items() if v and kind_of(c).name == "experiments"}


def _by_variation(counts: Counter) -> tuple[dict, int]:
    """Experiment cells → ({(variation, metric): stats}, excluded), in exposures.sufficient's shape."""
    out: dict = {}
    excluded = 0
    for (e, v, m, s), value in _experiment_cells(counts).items():
        if v == EXCLUDED:
            excluded += value
            continue
        stats = out.setdefault((e.variations[v][0], e.metrics[m].name), dict.fromkeys(STATS, 0))
        stats[STATS[s]] += value
    return out, excluded


@settings(max_examples=80, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_experiment_statistics_follow_stitched_person_states(events, rng):
    """Devices' events in any order, some twice, some late; then the devices joined into their user in any
    order: the partials hold exposures.sufficient over the events the states took (the oracle's non-late rows),
    at every step equal to a count over the states."""
    _, persons = rows_and_persons(events)
    by_id = {e.message_id: e for evs in persons.values() for e in evs}
    owned = [(f"u{p}" if d == 0 else f"u{p}-d{d}", by_id[f"m{i}"]) for i, (p, d, *_r) in enumerate(events)]
    replay = owned + rng.sample(owned, k=len(owned) // 3)
    rng.shuffle(replay)
    joins = [(user, rng.sample(devices, k=len(devices)))
             for user in persons if (devices := sorted({o for o, _ in owned if o.startswith(user + "-")}))]
    counts, kept, states = _stream(events, replay, joins)
    assert _experiment_cells(counts) == _experiment_cells(count(states.values(), X_METRICS, 0))
    assert _by_variation(counts) == exposures.sufficient(X_METRICS.experiments[0], kept.values())


@settings(max_examples=40, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=40), st.lists(st.integers(0, 120), min_size=40, max_size=40))
def test_experiment_windows_outlive_the_horizon(events, days):
    """One device per person, events over months in time order: history older than the horizon (32 days here)
    is pruned, but what lies in an exposure's windows is kept — the statistics never close."""
    events = [(p, 0, hours + 24 * d, *rest) for (p, _d, hours, *rest), d in zip(events, days, strict=False)]
    _, persons = rows_and_persons(events)
    replay = sorted(((f"u{p}", e) for p, evs in persons.items() for e in evs), key=lambda x: x[1].ts)
    counts, kept, states = _stream(events, replay, [])
    assert _experiment_cells(counts) == _experiment_cells(count(states.values(), X_METRICS, 0))
    assert _by_variation(counts) == exposures.sufficient(X_METRICS.experiments[0], kept.values())
    assert X_METRICS.horizon_days == 32


def test_experiment_records_group_a_variation_and_metric():
    """One record per (experiment, variation, metric) and partition with its nine values, sums as text; the
    excluded persons' record names no variation and no metric; the sink's row reads the text back."""
    e = X_METRICS.experiments[0]
    partials = Partials(X_METRICS)
    partials.load(0, -1, {(e, 1, 1, 0): 3, (e, 1, 1, 1): 10**20, (e, 1, 1, 2): 10**40, (e, EXCLUDED, EXCLUDED, 0): 2})
    due = dict(partials.unpublished(0))
    assert due == {(e, 1, 1): (3, 10**20, 10**40, 0, 0, 0, 0, 0, 0), (e, EXCLUDED, EXCLUDED): (2, *[0] * 8)}
    kind, key, rec = record((e, 1, 1), 4, due[(e, 1, 1)], 7)
    assert (kind.name, key) == ("experiments", b"checkout_button|green|revenue|4")
    assert rec == {"experiment": "checkout_button", "variation": "green", "metric": "revenue", "partition": 4,
                   "n": 3, "sy": str(10**20), "syy": str(10**40), "sx": "0", "sxx": "0", "sxy": "0", "sp": "0",
                   "spp": "0", "spy": "0", "control": 0, "kind": "sum", "scaleY": 10**6, "scaleX": 1, "version": 7}
    assert row(kind, rec)["syy"] == 10**40
    assert record((e, EXCLUDED, EXCLUDED), 4, due[(e, EXCLUDED, EXCLUDED)], 7)[2]["variation"] == ""
    partials.published(0, due.items())
    assert partials.unpublished(0) == []
    assert parse_cell_id(cell_id((e, 1, 1, 2)), X_METRICS) == (e, 1, 1, 2)
