"""A realistic sample stream: anonymous visitors browsing a shop, some signing up and buying; half of the
sessions see the `checkout_button` experiment (README "Experiments"), whose green button sells a little more.

`flywheel sample` sends it with the Producer so a newcomer sees data flow within a minute. Seeded,
so the same arguments give the same events.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from flywheel.experiments import assign

CATEGORIES = ["shoes", "shirts", "bags", "hats"]
PAGES = ["Home", "Category", "Search", "Help"]


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def journeys(n_events: int, *, seed: int = 7, days: int = 3, start: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Yield about `n_events` Segment messages, grouped in visitor sessions over `days` days."""
    rng = random.Random(seed)
    xrng = random.Random(seed + 1)  # the experiment's own draws
    start = start or (datetime.now(UTC) - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    sent = 0
    visitor = 0
    while sent < n_events:
        visitor += 1
        anon = str(uuid.UUID(int=rng.getrandbits(128)))
        user = f"user-{visitor}" if rng.random() < 0.4 else None
        t = start + timedelta(seconds=rng.uniform(0, days * 86_400))
        device = rng.choice(["ios", "android", "web"])
        context = {"library": {"name": "flywheel-sample", "version": "1"}, "os": {"name": device}}

        def msg(kind: str, anon: str = anon, context: dict = context, **fields: Any) -> dict[str, Any]:
            nonlocal t
            t += timedelta(seconds=rng.uniform(2, 240))
            return {"type": kind, "anonymousId": anon, "timestamp": _iso(t),
                    "messageId": str(uuid.UUID(int=rng.getrandbits(128))), "context": context, **fields}

        session = [msg("page", name=rng.choice(PAGES), properties={"path": "/"})]
        variation = assign("checkout_button", user or anon, {"control": 0.5, "green": 0.5})
        exposed = xrng.random() < 0.5
        if exposed:
            session.append(msg("track", event="Experiment Viewed", properties={
                "experiment_id": "checkout_button", "variation_id": variation}))
        for _ in range(rng.randint(1, 5)):
            category = rng.choice(CATEGORIES)
            product = f"p-{rng.randint(1, 200)}"
            price = round(rng.uniform(5, 200), 2)
            session.append(msg("track", event="Product Viewed",
                               properties={"product_id": product, "category": category, "price": price}))
            if rng.random() < 0.35:
                session.append(msg("track", event="Product Added",
                                   properties={"product_id": product, "category": category, "price": price,
                                               "quantity": 1}))
        if user:
            session.append(msg("identify", userId=user, traits={"plan": rng.choice(["free", "pro"])}))
            if rng.random() < 0.5:
                session.append(msg("track", event="Signed Up", userId=user, properties={"method": "email"}))
            if any(m.get("event") == "Product Added" for m in session) and rng.random() < 0.6:
                session.append(msg("track", event="Checkout Started", userId=user, properties={"items": 1}))
                if rng.random() < 0.7:
                    session.append(msg("track", event="Order Completed", userId=user, properties={
                        "order_id": f"o-{visitor}", "revenue": round(rng.uniform(10, 400), 2), "currency": "EUR",
                    }))
                elif exposed and variation == "green" and xrng.random() < 0.3:
                    session.append(msg("track", event="Order Completed", userId=user, properties={
                        "order_id": f"o-{visitor}", "revenue": round(xrng.uniform(10, 400), 2), "currency": "EUR",
                    }))
        for m in session:
            if sent >= n_events:
                return
            sent += 1
            yield m
