"""The Segment envelope: which Kafka key a message gets, and when it happened (DESIGN §1, §2).

Pure functions shared by the collector, the Python producer and the validate stage, so the key and the
event time are computed the same way wherever an event enters.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

MESSAGE_TYPES = frozenset({"track", "identify", "alias", "page", "screen", "group"})


def as_id(value: Any) -> str | None:
    """Segment SDKs send ids as strings; numbers are accepted and stringified like Segment does."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def kafka_key(message: dict[str, Any]) -> str | None:
    """events.raw key: anonymousId (an alias: its previousId), else userId.

    An anonymous id's events and the call that links it land on one partition, in order, so the
    identity lookup stays partition-local.
    """
    if message.get("type") == "alias":  # the id being linked decides on its own partition
        prev = as_id(message.get("previousId"))
        if prev:
            return prev
    anon = as_id(message.get("anonymousId"))
    if anon:
        return anon
    return as_id(message.get("userId")) or None


class BadTimestamp(ValueError):
    pass


def parse_time(value: Any, field: str) -> datetime | None:
    """ISO-8601 string (Segment's format) → aware UTC datetime. None if absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadTimestamp(f"{field}: expected an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadTimestamp(f"{field}: unparseable timestamp {value[:64]!r}") from None
    if parsed.tzinfo is None:  # Segment treats naive times as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def event_time(message: dict[str, Any], received_at: datetime) -> datetime:
    """Event time with Segment's clock-skew correction (DESIGN §2).

    - explicit `timestamp` (server SDKs, imports): taken as sent;
    - `originalTimestamp` and `sentAt` (device clocks): receivedAt − (sentAt − originalTimestamp);
    - neither: receivedAt.
    Raises BadTimestamp when a present field does not parse.
    """
    explicit = parse_time(message.get("timestamp"), "timestamp")
    if explicit is not None:
        return explicit
    original = parse_time(message.get("originalTimestamp"), "originalTimestamp")
    sent = parse_time(message.get("sentAt"), "sentAt")
    if original is not None and sent is not None:
        return received_at - (sent - original)
    if original is not None:
        return original
    return received_at


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def to_ms(ts: datetime) -> int:
    """Epoch milliseconds, floored exactly (float seconds * 1000 can be off by one)."""
    return (ts - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
