"""RFM's pure part (metrics/rfm.py) against ClickHouse (oracle.rfm_sql), in chdb: per-person values from the
orders in the window, global quintile cuts, scores and the R×F grid — equal on random order streams."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from flywheel import paths
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.clickhouse.migrate import apply as migrate
from flywheel.metrics import oracle, rfm
from flywheel.metrics.definitions import parse_metrics
from flywheel.model.clock import DAY_MS
from helpers import load_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ORDER = parse_metrics({"funnels": [{"name": "f", "window": "1h", "steps": [{"event": "Order Completed"}]}]}
                      ).funnels[0].steps[0]
WINDOW = 30 * DAY_MS
NOW = 20_400 * DAY_MS + 12 * 3_600_000
AMOUNTS = [10.0, 10, 0.1, 0.2, 19.99, 5.5, "12", True, None, 0]

# (person, days before now, ms offset, amount index, counted: an Order Completed or another event)
order_st = st.tuples(st.integers(0, 12), st.integers(0, 40), st.sampled_from([0, 1, 3_600_000]),
                     st.sampled_from(range(len(AMOUNTS))), st.booleans())


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    engine = EmbeddedClickHouse(tmp_path_factory.mktemp("chdb-rfm"))
    migrate(engine, paths.sql_dir() / "migrations")
    yield engine
    engine.close()


def rows_of(orders: list[tuple]) -> list[dict]:
    out = []
    for i, (person, days, offset, amount, counted) in enumerate(orders):
        ts = NOW - days * DAY_MS + offset
        props = {} if AMOUNTS[amount] is None else {"revenue": AMOUNTS[amount]}
        out.append({
            "message_id": f"m{i}", "type": "track", "event": "Order Completed" if counted else "Product Viewed",
            "anonymous_id": "", "user_id": f"u{person}", "person_id": f"u{person}", "previous_id": "",
            "group_id": "", "timestamp": datetime.fromtimestamp(ts / 1000, tz=UTC),
            "received_at": datetime(2026, 1, 1, tzinfo=UTC), "sent_at": None,
            "properties": orjson.dumps(props).decode(), "traits": "{}", "context": "{}", "source": "test", "late": 0})
    return out


def ours(orders: list[tuple]) -> dict[str, tuple]:
    by_person: dict[str, list[tuple[int, float]]] = {}
    for person, days, offset, amount, counted in orders:
        if not counted:
            continue
        value = AMOUNTS[amount]
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else 0
        by_person.setdefault(f"u{person}", []).append((NOW - days * DAY_MS + offset, float(number)))
    people = {p: v for p, orders_ in by_person.items() if (v := rfm.values(orders_, NOW, WINDOW)) is not None}
    scored = rfm.scores(people)
    return {p: (*people[p], *scored[p][:3]) for p in people}


def theirs(ch) -> dict[str, tuple]:
    return {r[0]: (int(r[1]), int(r[2]), float(r[3]), int(r[4]), int(r[5]), int(r[6]))
            for r in ch.rows(oracle.rfm_sql(ORDER, "revenue", WINDOW, NOW))[1]}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(order_st, min_size=1, max_size=60))
def test_scores_equal_clickhouse_on_random_orders(ch, orders):
    load_stream(ch, rows_of(orders))
    assert ours(orders) == theirs(ch)


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
