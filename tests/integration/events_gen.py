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
