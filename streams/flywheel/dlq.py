"""`flywheel dlq replay`: rejected events back to events.raw, once the tracking plan (or a client) is fixed.

The rejected records come from ClickHouse's `invalid_events` (the DLQ's sink), filtered by time, reason
and source; each goes back to events.raw with its original bytes, key, source and receivedAt, and a
header naming the record first rejected (its origin). The pipeline then treats it as a new receipt:
received + 1 and valid + 1 (or invalid + 1, rejected again: its DLQ row names the original in
`replay_of`), and flywheel_events_replayed_total + 1, so received = valid + invalid holds across replays.

Replaying twice counts once: the first time a replay passes, the ingest stage remembers the original's
origin (stages/ingest.py); later replays of it are dropped as duplicates, also once its messageId has
left the dedup table. A replay rejected again can be replayed again after the next fix. Rows the sink
dead-lettered (ClickHouse refused them: origin `sink:…`) are rows, not events: they are never replayed.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from flywheel.config import Settings
from flywheel.metrics.definitions import parse_duration_ms
from flywheel.metrics.oracle import quote
from flywheel.model.clock import from_ms
from flywheel.model.envelope import HEADER_REPLAY_OF, kafka_key


@dataclass(frozen=True)
class Rejected:
    origin: str
    source: str
    received_ms: int
    payload: bytes
    reasons: list[str]


def when(text: str, *, now: datetime) -> datetime:
    """An ISO time (UTC unless it says otherwise), or a duration back from now: 2h, 7d."""
    try:
        return now - timedelta(milliseconds=parse_duration_ms(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-30T08:00) nor a duration back from now (2h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def select(rows: Callable[[str], list], *, since: datetime | None = None, until: datetime | None = None,
           reason: str | None = None, source: str | None = None, limit: int | None = None) -> list[Rejected]:
    """The rejected events matching the filters, oldest first; `rows` runs a query (flywheel.query.run's rows).
    Originals only: a replay rejected again is replayed through its original."""
    return rejected(rows(select_sql(since=since, until=until, reason=reason, source=source, limit=limit)))


def select_sql(*, since: datetime | None = None, until: datetime | None = None, reason: str | None = None,
               source: str | None = None, limit: int | None = None) -> str:
    """`select`'s query, for a caller that runs it itself (the UI, asynchronously); `rejected` reads its rows."""
    where = ["replay_of = ''", "NOT startsWith(origin, 'sink:')"]
    if since is not None:
        where.append(f"received_at >= fromUnixTimestamp64Milli(toInt64({int(since.timestamp() * 1000)}))")
    if until is not None:
        where.append(f"received_at < fromUnixTimestamp64Milli(toInt64({int(until.timestamp() * 1000)}))")
    if reason:
        where.append(f"arrayExists(r -> positionCaseInsensitive(r, {quote(reason)}) > 0, reasons)")
    if source:
        where.append(f"source = {quote(source)}")
    return (f"SELECT origin, source, toUnixTimestamp64Milli(received_at), payload, payload_encoding, reasons "
            f"FROM flywheel.invalid_events FINAL WHERE {' AND '.join(where)} ORDER BY received_at, origin"
            + (f" LIMIT {int(limit)}" if limit else ""))


def rejected(rows: Iterable[Sequence[Any]]) -> list[Rejected]:
    return [Rejected(origin, src, int(ms), base64.b64decode(payload) if encoding == "base64" else payload.encode(),
                     list(reasons))
            for origin, src, ms, payload, encoding, reasons in rows]


def replay(settings: Settings, rejected: list[Rejected]) -> int:
    """Send them back to events.raw; return how many Kafka acknowledged (all of them, or it raises)."""
    from flywheel.producer import Producer

    with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="dlq-replay") as producer:
        futures = []
        for r in rejected:
            try:
                message = orjson.loads(r.payload)
            except orjson.JSONDecodeError:
                message = None
            key = kafka_key(message) if isinstance(message, dict) else None
            futures.append(producer.send_raw(r.payload, key=key, received_at=from_ms(r.received_ms),
                                             source=r.source, headers=[(HEADER_REPLAY_OF, r.origin.encode())]))
        return producer.confirm(futures)


def summary(rejected: list[Rejected]) -> list[str]:
    """What a dry run prints: how many, by source, the commonest reasons."""
    if not rejected:
        return ["no rejected events match"]
    by_source = Counter(r.source for r in rejected)
    reasons = Counter(reason for r in rejected for reason in r.reasons)
    first, last = from_ms(rejected[0].received_ms), from_ms(rejected[-1].received_ms)
    return [f"{len(rejected):,} rejected events received {first:%Y-%m-%d %H:%M:%S} … {last:%Y-%m-%d %H:%M:%S} UTC",
            "by source: " + ", ".join(f"{s} {n:,}" for s, n in by_source.most_common()),
            "reasons:", *[f"  {n:>6,}  {reason}" for reason, n in reasons.most_common(10)]]
