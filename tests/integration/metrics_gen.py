"""Generated multi-device journeys for the metrics tests: anonymous browsing, sign-up mid-stream, logins
on other devices, journeys crossing midnight, equal timestamps, exposures to two experiments (assigned per
device, so often anonymous and stitched at sign-up, and a person on two devices may see two variations) —
plus two hand-written persons whose numbers are known, and late events sent after everything else."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from flywheel.experiments import assign

# Lateness is longer than any journey (12 days): whatever order a person's devices' events arrive in
# (their raw partitions progress at different rates, more so across a rebalance), no journey event is
# late, so runs with one worker, two workers or a kill agree on every late flag. Only the events sent
# as late are late: older than the person's newest event by more than the lateness.
METRICS_YAML = """
lateness: 14d
activity:
  types: [track, page, screen]
  exclude_events: [Email Opened]
funnels:
  - name: checkout
    window: 6h
    steps:
      - event: Product Viewed
      - event: Product Added
      - event: Checkout Started
      - event: Order Completed
  - name: shoes
    window: 1d
    steps:
      - event: Product Viewed
        where: {category: shoes}
      - event: Product Viewed
        where: {category: shoes}
      - event: Order Completed
retention:
  - name: daily
    cohort_event: any
    return_event: any
    period: day
    horizon: 7
  - name: weekly_buyers
    cohort_event: Signed Up
    return_event: Order Completed
    period: week
    horizon: 3
segments:
  - name: shoe_browsers
    all:
      - performed: Product Viewed
        where: {category: shoes}
        count: {gte: 2}
        within: 7d
      - not_performed: Order Completed
        within: 5d
  - name: pro
    all:
      - trait: {plan: pro}
  - name: buyers_or_pro
    any:
      - performed: Order Completed
        within: 3d
      - trait: {plan: pro}
churn_risk: {active_within: 5d, silent_for: 3d}
lifecycle: {period: day}
experiments:
  - name: checkout_button
    exposure: {event: Experiment Viewed, experiment_id: checkout_button}
    variations: {control: 0.5, green: 0.5}
    control: control
    metrics:
      - name: purchased
        conversion: {event: Order Completed, within: 7d}
      - name: revenue
        sum: {event: Order Completed, property: revenue, within: 7d}
      - name: orders_per_checkout
        ratio: {numerator: {count: Order Completed}, denominator: {count: Checkout Started}, within: 7d}
    guardrails: [revenue]
    cuped: 3d
  - name: search_layout
    exposure: {event: Experiment Viewed, experiment_id: search_layout}
    variations: {a: 0.34, b: 0.33, c: 0.33}
    control: a
    metrics:
      - name: shoe_views
        count: {event: Product Viewed, where: {category: shoes}, within: 2d}
      - name: basket_value
        ratio: {numerator: {sum: {event: Order Completed, property: revenue}}, denominator: {count: Product Added},
                within: 3d}
"""
# RFM needs every person's summary in one ClickHouse (README "Segments"): not for two workers with their own
# embedded stores, whose tests use METRICS_YAML_ONE_STORE_EACH.
METRICS_YAML_ONE_STORE_EACH = METRICS_YAML
METRICS_YAML += """rfm: {event: Order Completed, monetary: revenue, window: 14d, refresh: 1s}
"""

BASE = datetime(2026, 10, 1, tzinfo=UTC)  # a Thursday
JOURNEY_DAY = BASE + timedelta(days=13)  # only the journey person is active that day
COHORT_DAY = BASE + timedelta(days=15)  # only the cohort person is active that day (and day + 2)


# The workers' clock (FLYWHEEL_CLOCK_FILE): segment windows are relative to it. NOW is after every event;
# by LATER every windowed membership has run out (only the trait ones remain).
NOW = BASE + timedelta(days=18)
LATER = BASE + timedelta(days=40)


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def journeys(n_persons: int = 150, days: int = 12, seed: int = 11) -> tuple[list[dict], list[dict]]:
    """(messages in roughly time order, late messages to send afterwards)."""
    rng = random.Random(seed)
    xrng = random.Random(seed + 1)  # experiments' draws: the journeys stay what they were without them
    timed: list[tuple[datetime, int, dict[str, Any]]] = []
    late: list[dict] = []
    seq = 0

    def emit(ts: datetime, **msg: Any) -> None:
        nonlocal seq
        seq += 1
        timed.append((ts, seq, {"messageId": f"m-{seed}-{seq}", "timestamp": _iso(ts), **msg}))

    for p in range(n_persons):
        user = f"user-{p}"
        devices = [f"dev-{p}-{d}" for d in range(rng.randint(1, 3))]
        signup_day = rng.randrange(days) if rng.random() < 0.7 else None
        linked: set[str] = set()
        seen: list[tuple[str, datetime]] = []  # (device, time) of this person's events
        for day in sorted(rng.sample(range(days), rng.randint(1, 6))):
            device = rng.choice(devices)
            known = signup_day is not None and day >= signup_day
            # sessions start at any hour, some just before midnight so the journey crosses it
            t = BASE + timedelta(days=day, seconds=rng.choice([rng.uniform(0, 86_000), 86_400 - 600]))
            ids = {"anonymousId": device}

            def track(event: str, t: datetime, props: dict | None = None, ids=ids, known=known,
                      device=device, user=user, linked=linked) -> None:
                emit(t, type="track", event=event, properties=props or {}, **ids,
                     **({"userId": user} if known and device in linked else {}))

            emit(t, type="page", name="Home", properties={}, **ids)
            # exposures, often while anonymous (stitched at sign-up); some persons see two variations (excluded)
            for experiment, variations in (("checkout_button", {"control": 0.5, "green": 0.5}),
                                           ("search_layout", {"a": 0.34, "b": 0.33, "c": 0.33})):
                if xrng.random() < (0.5 if not seen else 0.08):
                    variation = assign(experiment, device, variations)  # the same for the device, every time
                    if xrng.random() < 0.05:
                        variation = xrng.choice(list(variations))
                    track("Experiment Viewed", t, {"experiment_id": experiment, "variation_id": variation})
            if day == signup_day or (known and device not in linked):
                t += timedelta(seconds=rng.randint(1, 60))
                emit(t, type="identify", userId=user, traits={}, **ids)
                linked.add(device)
                if day == signup_day and devices.index(device) == 0:
                    track("Signed Up", t, {"method": "email"})
            for _ in range(rng.randint(1, 4)):
                category = rng.choice(["shoes", "hats", "bags"])
                t += timedelta(seconds=rng.choice([0, 30, 600, 3600]))  # 0: equal timestamps
                track("Product Viewed", t, {"product_id": "p", "category": category})
                if rng.random() < 0.5:
                    t += timedelta(seconds=rng.randint(1, 4000))
                    track("Product Added", t, {"product_id": "p", "category": category})
                    if rng.random() < 0.6:
                        t += timedelta(seconds=rng.randint(1, 9000))
                        track("Checkout Started", t, {"items": 1})
                        if rng.random() < 0.7:
                            t += timedelta(seconds=rng.randint(1, 9000))
                            track("Order Completed", t, {"order_id": f"o{seq}",
                                                         "revenue": xrng.choice([10.0, 19.99, 5.5, 120.0])})
            seen.append((device, t))
        if signup_day is not None:
            # a backend's trait syncs and e-mail opens: no activity by the rule above, on any day
            for day in rng.sample(range(days), 2):
                t = BASE + timedelta(days=day, seconds=rng.uniform(0, 86_000))
                emit(t, type="identify", userId=user, traits={"plan": rng.choice(["free", "pro"])})
                emit(t + timedelta(seconds=5), type="track", event="Email Opened", userId=user, properties={})
        if p % 10 == 0 and linked:
            # late: 16 days before the user's newest event (over every device linked to it), sent as the user
            # after everything else
            newest = max(at for d, at in seen if d in linked)
            late.append({"messageId": f"late-{seed}-{p}", "timestamp": _iso(newest - timedelta(days=16)),
                         "type": "track", "event": "Product Viewed", "userId": user,
                         "properties": {"product_id": "p", "category": "shoes"}})

    # A journey started anonymously and finished after identify: counts once, for the user.
    t = JOURNEY_DAY + timedelta(hours=10)
    emit(t, type="track", event="Product Viewed", anonymousId="journey-anon", properties={"product_id": "p"})
    emit(t + timedelta(minutes=5), type="track", event="Product Added", anonymousId="journey-anon",
         properties={"product_id": "p"})
    emit(t + timedelta(minutes=6), type="identify", anonymousId="journey-anon", userId="journey-user", traits={})
    emit(t + timedelta(minutes=7), type="track", event="Checkout Started", anonymousId="journey-anon",
         userId="journey-user", properties={})
    emit(t + timedelta(minutes=8), type="track", event="Order Completed", userId="journey-user",
         properties={"order_id": "oj", "revenue": 5.0})
    # Active anonymously on day 1, as a user (another device) on day 3: one member of day 1's cohort. On day
    # 2 a CRM syncs its traits and it opens an e-mail: no activity, so no return on day 2.
    c = COHORT_DAY + timedelta(hours=9)
    emit(c, type="page", name="Home", anonymousId="cohort-anon", properties={})
    emit(c + timedelta(days=1), type="identify", userId="cohort-user", traits={"plan": "pro"})
    emit(c + timedelta(days=1, hours=1), type="track", event="Email Opened", userId="cohort-user", properties={})
    emit(c + timedelta(days=2), type="identify", anonymousId="cohort-anon", userId="cohort-user", traits={})
    emit(c + timedelta(days=2, minutes=1), type="page", name="Home", anonymousId="cohort-phone", properties={})
    emit(c + timedelta(days=2, minutes=2), type="identify", anonymousId="cohort-phone", userId="cohort-user",
         traits={})

    timed.sort(key=lambda x: (x[0] + timedelta(seconds=rng.uniform(-1800, 1800)), x[1]))  # arrival jitter
    return [m for _, _, m in timed], late
