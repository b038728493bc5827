"""Segment membership (metrics/segments.py) against ClickHouse, in chdb (docs/design.md §9).

For random streams — several devices per person handed over to their user, late events, equal
timestamps, identify calls with typed traits — the members of every segment at a time `now` equal the
oracle's (oracle.segment_members_sql) over the same non-late events resolved through identity_map. And
`next_change` misses no change: between two of its answers, membership stays as it was.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from flywheel.metrics import oracle
from flywheel.metrics.definitions import MetricsError, parse_metrics
from flywheel.metrics.person import PersonState, apply, is_late, join
from flywheel.metrics.segments import NEVER, is_member, memberships, next_change, trim
from flywheel.model.clock import DAY_MS
from helpers import load_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

H = 3_600_000
METRICS = parse_metrics({
    "lateness": "2d",
    "activity": {"types": ["track", "page"], "exclude_events": ["Other"]},
    "funnels": [{"name": "f", "window": "1h", "steps": [{"event": "View"}, {"event": "Buy"}]}],
    "segments": [
        {"name": "browsers_not_buyers", "all": [
            {"performed": "View", "count": {"gte": 2}, "within": "2d"},
            {"not_performed": "Buy", "within": "3d"}]},
        {"name": "shoes_or_pro", "any": [
            {"performed": "Add", "where": {"category": "shoes"}, "within": "1d"},
            {"trait": {"plan": "pro"}}]},
        {"name": "one_buy", "universe": "all", "all": [{"performed": "Buy", "count": {"eq": 1}, "within": "4d"}]},
        {"name": "few_views", "all": [{"performed": "View", "count": {"lte": 1}, "within": "3d"}]},
        {"name": "pro", "all": [{"trait": {"plan": "pro"}}]},
        {"name": "two_seats", "all": [{"trait": {"seats": 2}}]},
        {"name": "nested", "universe": {"active_within": "5d"}, "all": [
            {"any": [{"performed": "View", "within": "12h"}, {"performed": "any", "within": "6h"}]},
            {"not_performed": "Other", "within": "1d"}]},
    ],
    "churn_risk": {"active_within": "2d", "silent_for": "1d"},
})

BASE_DAY = 20_400
NAMES = ["View", "Add", "Buy", "Other"]
PROPS = [{}, {"category": "shoes"}, {"category": "hats"}]
TRAITS = [{}, {"plan": "pro"}, {"plan": "free"}, {"plan": None}, {"plan": ["pro"]}, {"seats": 2},
          {"seats": 2.0}, {"seats": "2"}, {"plan": "pro", "seats": 3}, {"other": 1}]
TYPES = ["track", "track", "track", "page", "screen", "identify", "identify"]

# (person, device (0 = the user id), day offset, time of day, name, properties, type, traits)
event_st = st.tuples(
    st.integers(0, 3), st.integers(0, 2), st.integers(0, 6),
    st.sampled_from([0, 1, 6 * H - 1, 6 * H, 12 * H, 18 * H, 24 * H - 1]),
    st.sampled_from(NAMES), st.sampled_from(range(len(PROPS))), st.sampled_from(TYPES),
    st.sampled_from(range(len(TRAITS))),
)



def run_stream(events: list[tuple]) -> tuple[dict[str, PersonState], list[dict], int]:
    """As the aggregate stage: per device until it is handed to its user; an identify call reaches the
    state when it carries a trait a segment reads. Returns the persons, the rows and the newest time."""
    states: dict[str, PersonState] = {}
    rows = []
    newest = 0
    for i, (person, device, day, tod, name, props, mtype, traits) in enumerate(events):
        name = "" if mtype == "identify" else name
        trait_values = TRAITS[traits] if mtype == "identify" else {}
        ts = (BASE_DAY + day) * DAY_MS + tod
        newest = max(newest, ts)
        owner = f"u{person}" if device == 0 else f"u{person}-d{device}"
        matched, active = METRICS.matching(name, PROPS[props], mtype), METRICS.activity.matches(mtype, name)
        reads_traits = bool(METRICS.trait_keys.intersection(trait_values))
        late = False
        if matched or active or reads_traits:
            state = states.setdefault(owner, PersonState())
            late = is_late(state, ts, METRICS)
            if not late:
                apply(state, f"m{i:03}", ts, matched, METRICS, active=active, traits=trait_values)
        rows.append({
            "message_id": f"m{i:03}", "type": mtype, "event": name,
            "anonymous_id": owner if device else "", "user_id": owner if not device else "",
            "person_id": owner, "previous_id": "", "group_id": "",
            "timestamp": datetime.fromtimestamp(ts / 1000, tz=UTC), "received_at": datetime(2026, 1, 1, tzinfo=UTC),
            "sent_at": None, "properties": orjson.dumps(PROPS[props]).decode(),
            "traits": orjson.dumps(trait_values).decode(), "context": "{}", "source": "test", "late": int(late),
        })
    persons: dict[str, PersonState] = {}
    for owner, state in states.items():
        user = owner.split("-")[0]
        persons[user] = join(persons[user], state, METRICS) if user in persons else state
    return persons, rows, newest


def stream_members(persons: dict[str, PersonState], now: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s.name: [] for s in METRICS.segments}
    for person, state in sorted(persons.items()):
        for name in memberships(state, METRICS, now):
            out[name].append(person)
    return out


def oracle_members(ch, now: int) -> dict[str, list[str]]:
    return {s.name: [r[0] for r in ch.rows(oracle.segment_members_sql(s, METRICS, now))[1]]
            for s in METRICS.segments}


OFFSETS = [0, 1, 6 * H, 12 * H + 1, DAY_MS, 2 * DAY_MS, 3 * DAY_MS + 5, 6 * DAY_MS]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event_st, min_size=1, max_size=40))
def test_members_equal_clickhouse_on_random_streams(ch, events):
    persons, rows, newest = run_stream(events)
    load_stream(ch, rows)
    for offset in OFFSETS:
        assert stream_members(persons, newest + offset) == oracle_members(ch, newest + offset), offset


def test_a_known_stream(ch):
    """Readable anchor: browsing as an anonymous device, identified later, then time passes."""
    d0 = BASE_DAY * DAY_MS
    events = [
        (0, 1, 0, 0, "View", 0, "track", 0),          # anonymous device: two views
        (0, 1, 0, 6 * H, "View", 0, "track", 0),
        (0, 0, 0, 12 * H, "", 0, "identify", 1),      # the user: plan pro
        (1, 0, 0, 12 * H, "Buy", 0, "track", 0),      # another person buys once
    ]
    persons, rows, newest = run_stream(events)
    load_stream(ch, rows)
    assert newest == d0 + 12 * H
    now = newest
    members = stream_members(persons, now)
    assert members["browsers_not_buyers"] == ["u0"]  # stitched: the device's views count for the user
    assert members["pro"] == ["u0"] and members["shoes_or_pro"] == ["u0"]
    assert members["one_buy"] == ["u1"]
    assert members == oracle_members(ch, now)
    # the first view leaves the 2d window at d0 + 2d: u0 exits then, not before
    seg = next(s for s in METRICS.segments if s.name == "browsers_not_buyers")
    assert next_change([seg], persons["u0"], now) == d0 + 2 * DAY_MS
    assert is_member(seg, persons["u0"], d0 + 2 * DAY_MS - 1)
    assert not is_member(seg, persons["u0"], d0 + 2 * DAY_MS)
    # churn risk: active in the 2 days before the last day, silent since
    churn = next(s for s in METRICS.segments if s.name == "churn_risk")
    assert not is_member(churn, persons["u1"], now)
    assert is_member(churn, persons["u1"], now + DAY_MS)
    assert not is_member(churn, persons["u1"], now + 3 * DAY_MS)
    for t in (now + DAY_MS, now + 3 * DAY_MS):
        assert stream_members(persons, t) == oracle_members(ch, t)


@settings(max_examples=200, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=30), st.integers(0, 3 * DAY_MS))
def test_next_change_misses_no_change(events, start):
    """Membership is constant from one next_change to the next: checked on a grid and just before each."""
    persons, _, newest = run_stream(events)
    for state in persons.values():
        t = newest + start
        trimmed = state.copy()
        for _ in range(20):
            trim(trimmed, METRICS, t)  # what the stage keeps, evaluating at t: the same answers from t on
            due = next_change(METRICS.segments, trimmed, t)  # (the untrimmed state may name an earlier one)
            before = memberships(state, METRICS, t)
            assert memberships(trimmed, METRICS, t) == before
            end = due if due != NEVER else t + 8 * DAY_MS
            for probe in (t + 1, (t + end) // 2, end - 1):
                if t <= probe < end:
                    assert memberships(state, METRICS, probe) == before, (t, probe, due)
                    assert memberships(trimmed, METRICS, probe) == before, (t, probe, due)
            if due == NEVER:
                break
            assert due > t
            t = due


def test_state_round_trip_keeps_segment_history():
    persons, _, _ = run_stream([(0, 0, 0, 0, "View", 0, "track", 0), (0, 0, 0, 1, "", 0, "identify", 1),
                                (0, 0, 0, 2, "View", 0, "track", 0)])
    state = persons["u0"]
    state.members = {"pro": ("v1", 5)}
    state.due = 123
    again = PersonState.from_json(orjson.loads(orjson.dumps(state.to_json())), METRICS)
    assert again.to_json() == state.to_json()
    assert again.traits["plan"][0] == "pro" and len(again.events) == 2


def test_trim_keeps_the_newest_events_a_condition_needs_and_every_later_one():
    state = PersonState()
    now = BASE_DAY * DAY_MS + 100
    for i in range(10):
        apply(state, f"m{i}", now - 5 + i, METRICS.matching("View", {}), METRICS)  # 5 before now, 5 after
    view = next(p for p in METRICS.predicates if p.event == "View" and not p.where)
    trim(state, METRICS, now)
    # gte 2 and lte 1 both need the newest two up to now; the later ones count from their time on
    assert [ts - now for ts, _ in state.events[view.pid]] == [-1, 0, 1, 2, 3, 4]


@pytest.mark.parametrize(("segment", "message"), [
    ({"name": "s", "all": [{"performed": "X"}]}, "`within` is required"),
    ({"name": "s", "all": [{"performed": "X", "within": "1d", "trait": {"a": 1}}]}, "exactly one of"),
    ({"name": "s", "all": [{"not_performed": "X", "within": "1d", "count": {"gte": 2}}]}, "takes no count"),
    ({"name": "s", "all": [{"performed": "X", "within": "1d", "count": {"gte": 1, "lte": 3}}]}, "exactly one of gte"),
    ({"name": "s", "all": [{"trait": {"plan": "pro"}, "within": "1d"}]}, "belong to performed"),
    ({"name": "s", "all": [{"performed": "X", "within": "500d"}]}, "at most 400d"),
    ({"name": "s", "all": [], "any": []}, "at least 1 item"),
    ({"name": "s", "all": [{"trait": {"plan": "pro"}}], "universe": "some"}, "universe: `all`"),
])
def test_definition_errors_say_where(segment, message):
    with pytest.raises(MetricsError) as err:
        parse_metrics({"segments": [segment]})
    assert "segments[0]" in str(err.value) and message in str(err.value)


def test_versions_follow_meaning():
    a = parse_metrics({"segments": [{"name": "s", "all": [{"performed": "X", "within": "1d"}]}]}).segments[0]
    b = parse_metrics({"funnels": [{"name": "f", "window": "1h", "steps": [{"event": "Y"}]}],
                       "segments": [{"name": "s", "all": [{"performed": "X", "within": "1d"}]}]}).segments[0]
    c = parse_metrics({"segments": [{"name": "s", "all": [{"performed": "X", "within": "2d"}]}]}).segments[0]
    assert a.version == b.version != c.version


def test_the_views_follow_the_records_order_and_count_days(ch):
    """segment_members: the latest change by offset, whatever `at` says (a fixed clock, or a new owner's
    clock behind the old one's); segment_sizes_daily: members at each day's end, distinct persons entering
    and leaving that day."""
    from flywheel.metrics.segments import audience_record
    from flywheel.model.envelope import AUDIENCE_ENTERED as ENTERED
    from flywheel.model.envelope import AUDIENCE_EXITED as EXITED
    from flywheel.model.rows import audience_row

    ch.command("TRUNCATE TABLE flywheel.segment_changes")
    day = BASE_DAY * DAY_MS
    changes = [  # (event, person, at, since, offset)
        (ENTERED, "a", day + 1, day + 1, 0), (EXITED, "a", day + 1, day + 1, 1),  # same ms: the exit is later
        (ENTERED, "b", day + 5, day + 5, 2), (EXITED, "b", day + 4, day + 5, 3),  # a clock behind: still later
        (ENTERED, "c", day + 9, day + 9, 4), (ENTERED, "c", day + 9, day + 9, 5),  # republished after a crash
        (ENTERED, "d", day + DAY_MS, day + DAY_MS, 6),
    ]
    rows = []
    for event, person, at, since, offset in changes:
        _, rec = audience_record(event, "s", "v1", person, user=True, at=at, since=since)
        rows.append(audience_row(orjson.loads(orjson.dumps(rec)), 0, offset))
    ch.insert("flywheel.segment_changes", rows)
    members = ch.rows("SELECT person_id FROM flywheel.segment_members WHERE segment = 's' ORDER BY person_id")[1]
    assert [r[0] for r in members] == ["c", "d"]
    sizes = ch.rows("SELECT toString(day), persons, entered, exited FROM flywheel.segment_sizes_daily "
                    "WHERE segment = 's' ORDER BY day LIMIT 2")[1]
    assert [tuple(r) for r in sizes] == [("2025-11-08", 1, 3, 2), ("2025-11-09", 2, 1, 0)]


def test_cli_lists_segments_and_members_and_says_when_one_does_not_exist(ch, tmp_path, monkeypatch):
    """`flywheel segments list / members` over a store holding one entry. The commands' queries go to the
    module's store (chdb holds one directory per process; opening a store is tested with the worker)."""
    from flywheel import cli as cli_module
    from flywheel.cli import cli
    from flywheel.metrics.segments import audience_record
    from flywheel.model.envelope import AUDIENCE_ENTERED
    from flywheel.model.rows import audience_row
    from typer.testing import CliRunner

    metrics_file = tmp_path / "metrics.yaml"
    metrics_file.write_text("segments:\n  - name: pro\n    all:\n      - trait: {plan: pro}\n")
    ch.command("TRUNCATE TABLE flywheel.segment_changes")
    _, rec = audience_record(AUDIENCE_ENTERED, "pro", "v1", "u1", user=True, at=BASE_DAY * DAY_MS,
                             since=BASE_DAY * DAY_MS)
    ch.insert("flywheel.segment_changes", [audience_row(orjson.loads(orjson.dumps(rec)), 0, 0)])
    monkeypatch.setattr(cli_module, "_query", lambda settings: ch.rows)
    monkeypatch.setenv("FLYWHEEL_METRICS", str(metrics_file))
    runner = CliRunner()
    listed = runner.invoke(cli, ["segments", "list"])
    assert listed.exit_code == 0 and "pro\t1 members\tversion " in listed.output, listed.output
    members = runner.invoke(cli, ["segments", "members", "pro", "--format", "csv"])
    assert members.exit_code == 0 and members.output.splitlines()[:2] == [
        "person_id,user_id,anonymous_id,since", "u1,u1,,2025-11-08 00:00:00.000"], members.output
    unknown = runner.invoke(cli, ["segments", "members", "nope"])
    assert unknown.exit_code == 1 and "no segment 'nope'" in unknown.output
