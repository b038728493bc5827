"""RFM's pure part (metrics/rfm.py) against ClickHouse (oracle.rfm_sql), in chdb: per-person values from the
orders a person state keeps (devices joined to their user, redeliveries applied once), global quintile cuts,
scores and the R×F grid — equal on random order streams."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from flywheel.metrics import oracle, rfm
from flywheel.metrics.definitions import parse_metrics
from flywheel.metrics.person import PersonState, apply, join
from flywheel.model.clock import DAY_MS
from helpers import load_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# lateness longer than the stream: no order is late, whatever the order of arrival
METRICS = parse_metrics({"lateness": "60d",
                         "rfm": {"event": "Order Completed", "monetary": "revenue", "window": "30d"}})
ORDER = METRICS.rfm.order
WINDOW = METRICS.rfm.window_ms
NOW = 20_400 * DAY_MS + 12 * 3_600_000
AMOUNTS = [10.0, 10, 0.1, 0.2, 19.99, 5.5, "12", True, None, 0]

# (person, device (0 = the user id), days before now, ms offset, amount index, an Order Completed or not,
#  sent twice)
order_st = st.tuples(st.integers(0, 12), st.integers(0, 2), st.integers(0, 40), st.sampled_from([0, 1, 3_600_000]),
                     st.sampled_from(range(len(AMOUNTS))), st.booleans(), st.booleans())


def owner(person: int, device: int) -> str:
    return f"u{person}" if device == 0 else f"u{person}-d{device}"



def rows_of(orders: list[tuple]) -> list[dict]:
    out = []
    for i, (person, device, days, offset, amount, counted, _twice) in enumerate(orders):
        ts = NOW - days * DAY_MS + offset
        props = {} if AMOUNTS[amount] is None else {"revenue": AMOUNTS[amount]}
        who = owner(person, device)
        out.append({
            "message_id": f"m{i}", "type": "track", "event": "Order Completed" if counted else "Product Viewed",
            "anonymous_id": who if device else "", "user_id": "" if device else who, "person_id": who,
            "previous_id": "",
            "group_id": "", "timestamp": datetime.fromtimestamp(ts / 1000, tz=UTC),
            "received_at": datetime(2026, 1, 1, tzinfo=UTC), "sent_at": None,
            "properties": orjson.dumps(props).decode(), "traits": "{}", "context": "{}", "source": "test", "late": 0})
    return out


PERSONS: dict[str, PersonState] = {}  # the last stream's persons (for the published summaries)


def ours(orders: list[tuple]) -> dict[str, tuple]:
    """As the aggregate stage: each device's state applies its events once (a redelivery is recognised),
    then is handed to its user, whose state joins it."""
    states: dict[str, PersonState] = {}
    for i, (person, device, days, offset, amount, counted, twice) in enumerate(orders):
        name = "Order Completed" if counted else "Product Viewed"
        props = {} if AMOUNTS[amount] is None else {"revenue": AMOUNTS[amount]}
        state = states.setdefault(owner(person, device), PersonState())
        for _ in range(2 if twice else 1):
            if not state.has_applied(f"m{i}"):
                apply(state, f"m{i}", NOW - days * DAY_MS + offset, METRICS.matching(name, props), METRICS,
                      properties=props)
    persons: dict[str, PersonState] = {}
    for who, state in states.items():
        user = who.split("-")[0]
        persons[user] = join(persons[user], state, METRICS) if user in persons else state
    PERSONS.clear()
    PERSONS.update(persons)
    people = {p: v for p, s in persons.items() if (v := rfm.values(s.orders, NOW, WINDOW)) is not None}
    scored = rfm.scores(people)
    return {p: (*people[p], *scored[p][:3]) for p in people}


def theirs(ch) -> dict[str, tuple]:
    return {r[0]: (int(r[1]), int(r[2]), float(r[3]), int(r[4]), int(r[5]), int(r[6]))
            for r in ch.rows(oracle.rfm_sql(ORDER, "revenue", WINDOW, NOW))[1]}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(order_st, min_size=1, max_size=60))
def test_scores_equal_clickhouse_on_random_orders(ch, orders):
    """And the RFM leader's scoring over the summaries the stream publishes (rfm_values) gives the same."""
    from flywheel.model.rows import rfm_row

    load_stream(ch, rows_of(orders))
    expected = ours(orders)
    assert expected == theirs(ch)
    ch.command("TRUNCATE TABLE flywheel.rfm_values")
    published = [rfm.summary_record(p, rfm.summary(s.orders, NOW, WINDOW), NOW) for p, s in PERSONS.items()]
    ch.insert("flywheel.rfm_values", [rfm_row(orjson.loads(orjson.dumps(r)), 0, i) for i, r in enumerate(published)])
    leader = {r[0]: (int(r[1]), int(r[2]), float(r[3]), int(r[4]), int(r[5]), int(r[6]))
              for r in ch.rows(oracle.rfm_values_sql(NOW))[1]}
    assert leader == expected


def test_quintiles_of_ten_persons():
    """Ten persons with 1..10 orders: cuts at ranks 2, 4, 6, 8; equal values, equal scores."""
    assert rfm.cuts(range(1, 11)) == (2, 4, 6, 8)
    assert [rfm.score(v, (2, 4, 6, 8)) for v in range(1, 11)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [rfm.score(v, (2, 4, 6, 8), reverse=True) for v in (0, 2, 3, 9)] == [5, 5, 4, 1]
    assert rfm.cuts([7, 7, 7]) == (7, 7, 7, 7) and rfm.score(7, (7, 7, 7, 7)) == 1


def test_the_grid_places_every_score_pair_once():
    cells = [(r, f) for rs, fs, _ in rfm.GRID for r in rs for f in fs]
    assert sorted(cells) == [(r, f) for r in range(1, 6) for f in range(1, 6)]
    assert rfm.grid_segment(5, 5) == "champions" and rfm.grid_segment(1, 5) == "cant_lose"
    assert len(set(rfm.SEGMENTS)) == 10


def test_a_state_keeps_its_orders_within_the_window_and_only_with_rfm():
    state = PersonState()
    for i, days in enumerate((95, 40, 1)):
        apply(state, f"o{i}", NOW - days * DAY_MS, METRICS.matching("Order Completed", {}), METRICS,
              properties={"revenue": 2.5})
    # pruned a window plus the lateness (30 + 60 days) behind the newest order
    assert [(NOW - ts) // DAY_MS for ts, _, _ in state.orders] == [40, 1]
    again = PersonState.from_json(orjson.loads(orjson.dumps(state.to_json())), METRICS)
    assert again.orders == state.orders and rfm.values(again.orders, NOW, WINDOW) == (1, 1, 2.5)
    without = PersonState.from_json(state.to_json(), parse_metrics({}))
    assert without.orders == [] and "o" not in without.to_json()


def test_rfm_definition_errors_say_where():
    from flywheel.metrics.definitions import MetricsError

    with pytest.raises(MetricsError, match=r"rfm.window: Value error, must be positive"):
        parse_metrics({"rfm": {"event": "Order Completed", "monetary": "revenue", "window": "500d"}})
    with pytest.raises(MetricsError, match=r"rfm.monetary: Field required"):
        parse_metrics({"rfm": {"event": "Order Completed"}})


def test_summary_records_become_rfm_values_rows_the_latest_per_person(ch):
    from flywheel.model.rows import rfm_row

    ch.command("TRUNCATE TABLE flywheel.rfm_values")
    records = [rfm.summary_record("u1", (NOW - DAY_MS, 1, 10.0), NOW), rfm.summary_record("u1", None, NOW + 1),
               rfm.summary_record("u2", (NOW, 2, 3.5), NOW)]
    ch.insert("flywheel.rfm_values", [rfm_row(orjson.loads(orjson.dumps(r)), 0, i) for i, r in enumerate(records)])
    rows = ch.rows("SELECT person_id, frequency, monetary, last_order IS NULL FROM flywheel.rfm_values FINAL "
                   "ORDER BY person_id")[1]
    assert [tuple(r) for r in rows] == [("u1", 0, 0.0, 1), ("u2", 2, 3.5, 0)]


def test_the_rfm_view_scores_the_published_summaries_now(ch):
    """flywheel.rfm: the same scores and grid segments as metrics/rfm.py, over rfm_values, at query time."""
    import time

    from flywheel.model.rows import rfm_row

    now = int(time.time() * 1000)
    people = {f"p{i}": (now - (i % 7) * DAY_MS - 3_600_000, 1 + i % 4, float(i % 5) * 2.5) for i in range(23)}
    ch.command("TRUNCATE TABLE flywheel.rfm_values")
    ch.insert("flywheel.rfm_values", [rfm_row(orjson.loads(orjson.dumps(rfm.summary_record(p, v, now))), 0, i)
                                      for i, (p, v) in enumerate(sorted(people.items()))])
    expected = rfm.scores({p: ((now - last) // DAY_MS, f, m) for p, (last, f, m) in people.items()})
    got = {r[0]: (int(r[4]), int(r[5]), int(r[6]), r[7]) for r in ch.rows(
        "SELECT person_id, recency_days, frequency, monetary, r, f, m, segment FROM flywheel.rfm")[1]}
    assert got == expected and len({v[3] for v in got.values()}) > 1
