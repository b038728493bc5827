"""The pure person state against ClickHouse's own functions, in chdb (docs/design.md §4; issues 5 and 6).

For random streams — equal timestamps, out-of-order arrival, late events, repeated steps, chains across
midnight, windows exceeded, several devices per person handed over to their user — the sum of the
persons' contributions equals windowFunnel(W, 'strict_once'), retention(...) and uniqExact run by chdb
over the same (non-late) events, resolved through identity_map exactly as the stream resolves them.
Exact, every cell.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime

from flywheel.metrics import alerts, oracle
from flywheel.metrics.definitions import LIFECYCLE_STATUSES, Funnel, Lifecycle, Retention, parse_metrics
from flywheel.metrics.person import PersonState, apply, contributions, is_late, join
from flywheel.model.clock import DAY_MS
from helpers import load_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

METRICS = parse_metrics({
    "lateness": "2d",
    # page views count, screens and identity calls do not, nor does the "Other" event
    "activity": {"types": ["track", "page"], "exclude_events": ["Other"]},
    "funnels": [
        {"name": "checkout", "window": "3h", "steps": [
            {"event": "View"}, {"event": "Add", "where": {"category": "shoes"}}, {"event": "Buy"}]},
        # a repeated step: one event satisfies at most one step, a second occurrence is needed
        {"name": "twice", "window": "1d", "steps": [{"event": "View"}, {"event": "View"}, {"event": "Buy"}]},
        {"name": "typed", "window": "90m", "steps": [
            {"event": "Add", "where": {"qty": 2}}, {"event": "Add", "where": {"gift": True}}]},
        {"name": "single", "window": "1h", "steps": [{"event": "Buy"}]},
    ],
    "retention": [
        {"name": "daily", "cohort_event": "any", "return_event": "any", "period": "day", "horizon": 5},
        {"name": "buyers", "cohort_event": "View", "return_event": "Buy", "period": "day", "horizon": 3},
        {"name": "weekly", "cohort_event": "any", "return_event": "View", "period": "week", "horizon": 2},
    ],
    "lifecycle": {"period": "day"},
    # alert series: from the cells (their feeds) and from the events (the ingest stage's tallies)
    "alerts": [{"name": name, "series": series, "rule": {"threshold": {"above": 1}}} for name, series in [
        ("conversion", {"funnel": "checkout", "step": 3, "rate": True}), ("adds", {"funnel": "checkout", "step": 2}),
        ("day2", {"retention": "daily", "n": 2}), ("week1", {"retention": "weekly", "n": 1}),
        ("dau", {"active": "dau"}), ("mau", {"active": "mau"}),
        ("buys", {"events": "Buy", "period": "hour"}), ("daily_events", {"events": "any", "period": "day"}),
        ("weekly_views", {"events": "View", "period": "week", "source": "test"}),
        ("other_source", {"events": "any", "source": "elsewhere"}),
    ]],
})
# the same activity rule, weekly lifecycle periods: evaluated on the states built with METRICS
WEEKLY = parse_metrics({"activity": {"types": ["track", "page"], "exclude_events": ["Other"]},
                        "lifecycle": {"period": "week"}})

BASE_DAY = 20_400  # 2025-11-08 (a Saturday): weeks and midnights are crossed
NAMES = ["View", "Add", "Buy", "Other"]
PROPS = [{}, {"category": "shoes"}, {"category": "hats"}, {"category": 1}, {"qty": 2}, {"qty": 2.0},
         {"qty": "2"}, {"gift": True}, {"gift": 1}, {"qty": 2, "gift": True, "category": "shoes"}]

TYPES = ["track", "track", "track", "page", "screen", "identify", "group"]  # identify/group have no name

# an event: (person, device (0 = the user id itself), day offset, coarse time of day, name, properties, type)
event_st = st.tuples(
    st.integers(0, 3), st.integers(0, 2), st.integers(0, 9),
    st.sampled_from([0, 1, 3_599_999, 3_600_000, 7_200_000, 10_800_000, 10_800_001, 43_200_000,
                     79_200_000, 86_399_999]),
    st.sampled_from(NAMES), st.sampled_from(range(len(PROPS))), st.sampled_from(TYPES),
)



def _day(value: str) -> int:
    return date.fromisoformat(value).toordinal() - date(1970, 1, 1).toordinal()


def run_stream(events: list[tuple]) -> tuple[dict[str, PersonState], list[dict]]:
    """The stream's semantics, in arrival order: each device keeps its own state (late verdicts against
    its own newest event) until it is handed to its user, whose state joins it."""
    states: dict[str, PersonState] = {}
    rows = []
    for i, (person, device, day, tod, name, props, mtype) in enumerate(events):
        name = "" if mtype in ("identify", "group") else name
        ts = (BASE_DAY + day) * DAY_MS + tod
        owner = f"u{person}" if device == 0 else f"u{person}-d{device}"
        state = states.setdefault(owner, PersonState())
        # as the aggregate stage: an event that is no activity and satisfies no condition touches nothing
        matched, active = METRICS.matching(name, PROPS[props], mtype), METRICS.activity.matches(mtype, name)
        late = (matched or active) and is_late(state, ts, METRICS)
        if (matched or active) and not late:
            apply(state, f"m{i}", ts, matched, METRICS, active=active)
        rows.append({
            "message_id": f"m{i}", "type": mtype, "event": name,
            "anonymous_id": owner if device else "", "user_id": owner if not device else "",
            "person_id": owner, "previous_id": "", "group_id": "",
            "timestamp": datetime.fromtimestamp(ts / 1000, tz=UTC), "received_at": datetime(2026, 1, 1, tzinfo=UTC),
            "sent_at": None, "properties": __import__("orjson").dumps(PROPS[props]).decode(), "traits": "{}",
            "context": "{}", "source": "test", "late": int(late),
        })
    # identify: every device is handed over to its user (join order: the order devices appear)
    persons: dict[str, PersonState] = {}
    for owner, state in states.items():
        user = owner.split("-")[0]
        persons[user] = join(persons[user], state, METRICS) if user in persons else state
    return persons, rows


def tagged(cell) -> tuple:
    """A typed cell as the tuples below: ("f", funnel, day, step), ("r", retention, cohort, n), ("a", kind, day),
    ("l", day, status)."""
    if isinstance(cell[0], Funnel):
        return ("f", cell[0].name, *cell[1:])
    if isinstance(cell[0], Retention):
        return ("r", cell[0].name, *cell[1:])
    if isinstance(cell[0], Lifecycle):
        return ("l", cell[1], LIFECYCLE_STATUSES[cell[2]])
    return ("a", cell[0].name, cell[1])


def expected_from_state(persons: dict[str, PersonState]) -> Counter:
    total: Counter = Counter()
    for state in persons.values():
        total.update(tagged(c) for c in contributions(state, METRICS, open_from=-(10**6)))
    return total


def oracle_cells(ch) -> Counter:
    got: Counter = Counter()
    for f in METRICS.funnels:
        for name, day, step, persons in ch.rows(oracle.funnel_sql(f))[1]:
            got[("f", name, _day(day), int(step))] = int(persons)
    for r in METRICS.retention:
        for name, cohort, n, persons, _size in ch.rows(oracle.retention_sql(r))[1]:
            got[("r", name, _day(cohort), int(n))] = int(persons)
        for name, cohort, size in ch.rows(oracle.cohort_sizes_sql(r))[1]:
            got[("r", name, _day(cohort), 0)] = int(size)
    for day, status, persons in ch.rows(oracle.lifecycle_sql(METRICS.lifecycle, METRICS.activity))[1]:
        got[("l", _day(day), status)] = int(persons)
    for day, dau, wau, mau, _ in ch.rows(oracle.active_users_sql(METRICS.activity))[1]:
        for kind, value in (("dau", dau), ("wau", wau), ("mau", mau)):
            if int(value):
                got[("a", kind, _day(day))] = int(value)
    return got


def state_cells(persons: dict[str, PersonState]) -> Counter:
    cells = expected_from_state(persons)
    # the views show activity up to the last active day (rolling windows would run into the future)
    last = max((k[2] for k in cells if k[:2] == ("a", "dau")), default=None)
    return Counter({k: v for k, v in cells.items() if v and not (k[0] == "a" and k[2] > last)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event_st, min_size=1, max_size=45))
def test_state_equals_clickhouse_on_random_streams(ch, events):
    persons, rows = run_stream(events)
    load_stream(ch, rows)
    assert state_cells(persons) == oracle_cells(ch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event_st, min_size=1, max_size=45))
def test_weekly_lifecycle_equals_clickhouse(ch, events):
    persons, rows = run_stream(events)
    load_stream(ch, rows)
    ours: Counter = Counter()
    for state in persons.values():
        ours.update(tagged(c) for c in contributions(state, WEEKLY, open_from=-(10**6)) if isinstance(c[0], Lifecycle))
    theirs = Counter({("l", _day(day), status): int(n)
                      for day, status, n in ch.rows(oracle.lifecycle_sql(WEEKLY.lifecycle, WEEKLY.activity))[1]})
    assert ours == theirs


def test_a_known_stream_cell_by_cell(ch):
    """Readable anchor: one person, a chain across midnight, a repeated step, an exceeded window."""
    d = 0
    events = [
        (0, 1, d, 79_200_000, "View", 0, "track"),        # 22:00 day 0, anonymous device
        (0, 1, d + 1, 0, "Add", 1, "track"),              # 00:00 day 1: within 3h, shoes
        (0, 0, d + 1, 3_600_000, "Buy", 0, "track"),      # 01:00 day 1 as the user: 3h after the view — inclusive
        (0, 0, d + 2, 0, "", 0, "identify"),              # a trait sync on day 2: nobody active that day
        (0, 0, d + 3, 0, "View", 0, "track"),
        (0, 0, d + 3, 43_200_000, "Buy", 0, "track"),     # twice: needs a second View
        (1, 0, d + 2, 0, "", 0, "identify"),              # a person who only ever synced traits
    ]
    persons, rows = run_stream(events)
    load_stream(ch, rows)
    cells = state_cells(persons)
    assert cells[("f", "checkout", BASE_DAY, 3)] == 1
    assert cells[("f", "twice", BASE_DAY, 1)] == 1 and cells[("f", "twice", BASE_DAY, 2)] == 0
    assert cells[("r", "daily", BASE_DAY, 0)] == 1
    assert cells[("r", "daily", BASE_DAY, 1)] == 1 and cells[("r", "daily", BASE_DAY, 3)] == 1
    assert cells[("r", "daily", BASE_DAY, 2)] == 0
    assert cells[("a", "mau", BASE_DAY + 3)] == 1 and cells[("a", "dau", BASE_DAY + 2)] == 0
    assert cells[("r", "daily", BASE_DAY + 2, 0)] == 0  # the trait-synced person has no cohort
    # lifecycle: new on day 0, returning on day 1, dormant on day 2 (a trait sync is no activity),
    # resurrecting on day 3, dormant again on day 4
    assert [cells[("l", BASE_DAY + d, s)] for d, s in enumerate(
        ["new", "returning", "dormant", "resurrecting", "dormant"])] == [1, 1, 1, 1, 1]
    assert cells == oracle_cells(ch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event_st, min_size=1, max_size=45))
def test_alert_series_equal_clickhouse(ch, events):
    """Each rule's series as the stream feeds it — the cells' shares (alerts.cell_feeds) summed like the
    evaluator sums them (alerts.point), the events counted like the ingest stage's tallies — equals
    oracle.alert_series_sql over the stored events, period by period."""
    persons, rows = run_stream(events)
    load_stream(ch, rows)
    index = alerts.cell_index(METRICS.alerts)
    shares: dict = {}  # (rule, period) → {"v": …, "b": …} as one partition's share
    for state in persons.values():
        for cell in contributions(state, METRICS, open_from=-(10**6)):
            for rule, role, period in alerts.cell_feeds(index, cell):
                share = shares.setdefault((rule.name, period), {"p0": {"v": [0, 1], "b": [0, 1]}})["p0"]
                share[role][0] += 1
    start, end = (BASE_DAY - 14) * DAY_MS, (BASE_DAY + 60) * DAY_MS
    for rule in METRICS.alerts:
        theirs = alerts.history_points(rule, ch.rows(oracle.alert_series_sql(rule, METRICS, start, end))[1], start, end)
        if rule.series.kind in alerts.COUNTED:  # what the ingest stage's tallies count (test_ingest.py)
            counted = Counter(rule.series.period_of(int(r["timestamp"].timestamp() * 1000)) for r in rows
                              if alerts.counts_valid(rule, r["event"], r["source"]))
            ours = {p: alerts.Point(n, n) for p, n in counted.items()}
        else:
            ours = {p: alerts.point(rule, by) for (name, p), by in shares.items() if name == rule.name}
        nonzero = {p: pt for p, pt in theirs.items() if pt.count}
        assert {p: pt for p, pt in ours.items() if pt.count} == nonzero, rule.name
