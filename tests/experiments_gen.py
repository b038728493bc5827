"""Random stitched streams for the experiment tests: persons with devices (anonymous ids) and a user id, exposures
(some to other experiments, some to variations the experiment does not have), orders with revenues of every
JSON type, checkouts and product views."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from flywheel.metrics.definitions import parse_metrics
from flywheel.metrics.exposures import Event
from flywheel.model.clock import DAY_MS
from hypothesis import strategies as st

SPEC = {"experiments": [{
    "name": "checkout_button", "exposure": {"experiment_id": "checkout_button"},
    "variations": {"control": 0.5, "green": 0.3, "blue": 0.2}, "control": "control", "cuped": "1d",
    "metrics": [{"name": "purchased", "conversion": {"event": "Order Completed", "within": "2d"}},
                {"name": "revenue", "sum": {"event": "Order Completed", "property": "revenue", "within": "2d"}},
                {"name": "shoe_views", "count": {"event": "Product Viewed", "where": {"category": "shoes"},
                                                  "within": "1d"}},
                {"name": "orders_per_checkout", "ratio": {"numerator": {"count": "Order Completed"},
                                                          "denominator": {"count": "Checkout Started"},
                                                          "within": "2d"}}]}]}
EXPERIMENT = parse_metrics(SPEC).experiments[0]
T0 = 20_400 * DAY_MS
VARIATIONS = ["control", "green", "blue", "red", 7]  # "red" and 7 are no variations of it
REVENUES = [19.99, 5, 0.01, "12", None, 100.5]

# an event: (person, device (0 = the user), hours after T0, kind, variation or revenue index, other experiment)
event_st = st.tuples(st.integers(0, 6), st.integers(0, 2), st.integers(0, 96),
                     st.sampled_from(["exposure", "order", "checkout", "view_shoes", "view_hats"]),
                     st.integers(0, 5), st.booleans())


def rows_and_persons(events: list[tuple]) -> tuple[list[dict], dict[str, list[Event]]]:
    rows, persons = [], {}
    for i, (person, device, hours, kind, k, other) in enumerate(events):
        ts = T0 + hours * 3_600_000 + (i % 3) * 1000
        owner = f"u{person}" if device == 0 else f"u{person}-d{device}"
        if kind == "exposure":
            name, props = "Experiment Viewed", {"experiment_id": "search" if other else "checkout_button",
                                                "variation_id": VARIATIONS[k % len(VARIATIONS)]}
        elif kind == "order":
            name, props = "Order Completed", {} if REVENUES[k] is None else {"revenue": REVENUES[k]}
        elif kind == "checkout":
            name, props = "Checkout Started", {}
        else:
            name, props = "Product Viewed", {"category": "shoes" if kind == "view_shoes" else "hats"}
        rows.append({"message_id": f"m{i}", "type": "track", "event": name, "anonymous_id": owner if device else "",
                     "user_id": "" if device else owner, "person_id": owner, "previous_id": "", "group_id": "",
                     "timestamp": datetime.fromtimestamp(ts / 1000, tz=UTC),
                     "received_at": datetime(2026, 1, 1, tzinfo=UTC), "sent_at": None,
                     "properties": orjson.dumps(props).decode(), "traits": "{}", "context": "{}", "source": "test",
                     "late": 0})
        persons.setdefault(f"u{person}", []).append(Event(ts, f"m{i}", "track", name, props))
    return rows, persons
