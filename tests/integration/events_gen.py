"""Generated traffic for the pipeline tests: valid events, SDK-style retries and broken records."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

INVALID_KINDS = ("malformed_json", "no_ids", "unknown_type", "wrong_property_type", "bad_timestamp")


@dataclass
class Traffic:
    """What was sent, to compare with what arrived."""

    records: list[tuple[str | None, bytes]] = field(default_factory=list)  # (key, value) in send order
    valid_ids: set[str] = field(default_factory=set)
    retries: int = 0
    invalid_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def invalid(self) -> int:
        return sum(self.invalid_by_kind.values())


def generate(n_valid: int, *, retry_rate: float, n_invalid: int, seed: int = 1) -> Traffic:
    rng = random.Random(seed)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    traffic = Traffic()
    sent_valid: list[tuple[str | None, bytes]] = []
    for i in range(n_valid):
        anon = f"anon-{rng.randrange(n_valid // 5 + 1)}"
        ts = base + timedelta(seconds=rng.uniform(0, 5 * 86_400))
        mid = str(uuid.UUID(int=rng.getrandbits(128)))
        msg = {
            "type": "track", "event": rng.choice(["Product Viewed", "Product Added", "Page Loaded"]),
            "anonymousId": anon, "messageId": mid,
            "originalTimestamp": ts.isoformat(), "sentAt": (ts + timedelta(seconds=1)).isoformat(),
            "properties": {"product_id": f"p{i % 50}", "price": 9.5},
        }
        if i % 7 == 0:
            msg["userId"] = f"user-{i % 300}"
        record = (anon, orjson.dumps(msg))
        traffic.records.append(record)
        traffic.valid_ids.add(mid)
        sent_valid.append(record)
    # SDK-style retries: the same bytes again (same messageId), later in the stream.
    n_retries = int(n_valid * retry_rate)
    for record in rng.sample(sent_valid, n_retries):
        traffic.records.insert(rng.randrange(len(traffic.records) + 1), record)
    traffic.retries = n_retries
    per_kind = n_invalid // len(INVALID_KINDS)
    for kind in INVALID_KINDS:
        for j in range(per_kind):
            key, value = _invalid(kind, j, base)
            traffic.records.insert(rng.randrange(len(traffic.records) + 1), (key, value))
        traffic.invalid_by_kind[kind] = per_kind
    return traffic


def _invalid(kind: str, j: int, base: datetime) -> tuple[str | None, bytes]:
    anon = f"bad-{j}"
    good = {"type": "track", "event": "Product Viewed", "anonymousId": anon, "messageId": f"bad-{kind}-{j}",
            "timestamp": base.isoformat(), "properties": {"product_id": "p1"}}
    if kind == "malformed_json":
        return anon, b'{"type": "track", "event": "Product Viewed", "anonymousId": "' + anon.encode() + b'"'
    if kind == "no_ids":
        good.pop("anonymousId")
        return None, orjson.dumps(good)
    if kind == "unknown_type":
        return anon, orjson.dumps(good | {"type": "purchase"})
    if kind == "wrong_property_type":
        return anon, orjson.dumps(good | {"properties": {"product_id": 12345}})
    if kind == "bad_timestamp":
        return anon, orjson.dumps(good | {"timestamp": "yesterday at noon"})
    raise ValueError(kind)


# --------------------------------------------------------------------------- identity-heavy traffic

JUNK_CALLS = (
    {"type": "identify", "userId": "undefined"},
    {"type": "track", "anonymousId": "null", "event": "Product Viewed", "properties": {"product_id": "p0"}},
    {"type": "alias", "previousId": "0", "userId": "user-0"},
    {"type": "identify", "anonymousId": "anonymous", "userId": "user-1"},
    {"type": "page", "anonymousId": "a-ok", "userId": "[object Object]", "name": "Home"},
)


def identity_stream(n_persons: int = 250, *, seed: int = 11, start: datetime | None = None) -> list[dict]:
    """Segment messages (explicit messageId and timestamp) in send order, for the identity tests.

    Per person (user id `user-<i>`, or an e-mail for some): 1-4 devices (anonymous ids). Per device:
    anonymous browsing, then (85%) a link to the person: identify, login (a track carrying both ids)
    or a backend alias (previousId); more browsing after it, some of it with both ids; 10% of the
    devices are later claimed by someone else (identify, login or alias naming another user: a
    conflict). Per person, server-side events with only the user id. Also: identifies whose
    anonymousId equals the userId (no link), SDK retries (the same message again, later), and junk
    ids (DLQ). Each device's own calls stay in order (they share its Kafka key); devices interleave
    at random.
    """
    rng = random.Random(seed)
    t0 = start or datetime(2026, 11, 10, tzinfo=UTC)
    queues: list[list[dict]] = []

    def browse(anon: str, t: datetime, n: int, user: str = "") -> list[dict]:
        calls = []
        for _ in range(n):
            t += timedelta(seconds=rng.uniform(1, 300))
            product = f"p{rng.randrange(100)}"
            kind = rng.random()
            if kind < 0.2:
                call = {"type": "page", "name": rng.choice(["Home", "Search", "Help"]), "properties": {"path": "/"}}
            elif kind < 0.7:
                call = {"type": "track", "event": "Product Viewed", "properties": {"product_id": product}}
            else:
                call = {"type": "track", "event": "Product Added", "properties": {"product_id": product, "quantity": 1}}
            call |= {"anonymousId": anon, "timestamp": t.isoformat()}
            if user:
                call["userId"] = user
            calls.append(call)
        return calls

    def link(kind: str, anon: str, user: str, t: datetime) -> dict:
        if kind == "identify":
            return {"type": "identify", "anonymousId": anon, "userId": user, "timestamp": t.isoformat(),
                    "traits": {"plan": rng.choice(["free", "pro"])}}
        if kind == "login":
            return {"type": "track", "event": "Signed In", "anonymousId": anon, "userId": user,
                    "timestamp": t.isoformat()}
        return {"type": "alias", "previousId": anon, "userId": user, "timestamp": t.isoformat()}

    users = [f"user-{i}" if i % 5 else f"person{i}@example.com" for i in range(n_persons)]
    for i, user in enumerate(users):
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
            anon = str(uuid.UUID(int=rng.getrandbits(128)))
            t = t0 + timedelta(seconds=rng.uniform(0, 3 * 86_400))
            calls = browse(anon, t, rng.randint(1, 5))
            t += timedelta(hours=1)
            if rng.random() < 0.85:
                calls.append(link(rng.choice(("identify", "identify", "login", "alias")), anon, user, t))
                calls += browse(anon, t, rng.randint(0, 3))
                calls += browse(anon, t + timedelta(minutes=30), rng.randint(0, 2), user=user)
            if rng.random() < 0.10:
                other = rng.choice([u for u in users if u != user])
                t += timedelta(hours=2)
                calls.append(link(rng.choice(("identify", "login", "alias")), anon, other, t))
                calls += browse(anon, t, rng.randint(1, 2))
            queues.append(calls)
        t = t0 + timedelta(days=3, seconds=rng.uniform(0, 86_400))
        server = [{"type": "track", "event": "Order Completed", "userId": user, "timestamp": t.isoformat(),
                   "properties": {"order_id": f"o-{i}-{j}", "revenue": round(rng.uniform(5, 500), 2)}}
                  for j in range(rng.randint(0, 2))]
        if i % 25 == 0:
            server.append({"type": "identify", "anonymousId": user, "userId": user, "timestamp": t.isoformat()})
        queues.append(server)
    queues.append([dict(c, timestamp=t0.isoformat()) for c in JUNK_CALLS])
    for calls in queues:
        for call in calls:
            call["messageId"] = str(uuid.UUID(int=rng.getrandbits(128)))
    # SDK retries: a call again (same messageId and bytes) a little later in its own queue.
    for calls in queues:
        for j in range(len(calls) - 1, -1, -1):
            if rng.random() < 0.03:
                calls.insert(rng.randint(j + 1, len(calls)), dict(calls[j]))
    out: list[dict] = []
    live = [q for q in queues if q]
    while live:
        q = rng.choice(live)
        out.append(q.pop(0))
        if not q:
            live.remove(q)
    return out
