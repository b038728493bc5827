"""The Segment envelope: which Kafka key a message gets, and when it happened (docs/design.md §1, §2).

Pure functions shared by the collector, the Python producer and the validate stage, so the key and the
event time are computed the same way wherever an event enters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

MESSAGE_TYPES = frozenset({"track", "identify", "alias", "page", "screen", "group"})
# Segment-spec track events of the audiences Flywheel publishes (segments.changes)
AUDIENCE_ENTERED, AUDIENCE_EXITED = "Audience Entered", "Audience Exited"



@dataclass(frozen=True, slots=True)
class Limits:
    """What an event may be: Segment's 32 KB per event and 500 KB per request (after decompression),
    and how far ahead of its receipt its time may lie (a client clock set wrong)."""

    max_event_bytes: int = 32 * 1024
    max_request_bytes: int = 500 * 1024
    max_future: timedelta = timedelta(days=1)


# Headers of an events.raw record, stamped by whoever writes it (collector, flywheel.producer).
HEADER_SOURCE = "flywheel-source"  # where it came from: writekey:<hash>, or a producer's name
HEADER_RECEIVED_AT = "flywheel-received-at"  # epoch ms
HEADER_REPLAY_OF = "flywheel-replay-of"  # a replayed DLQ record: the origin of the rejected one (flywheel dlq)
HEADER_FORGET = "flywheel-forget"  # not an event: a request to forget a person's ids here (flywheel persons)
HEADER_TICK = "flywheel-tick"  # not an event: a progress marker, epoch ms (runtime/ticker.py, docs/design.md §10)
# not a new event: a stored one sent back to its person for new conditions (JSON revision, pids; docs/design.md §13)
HEADER_BACKFILL = "flywheel-backfill"


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
    """Event time with Segment's clock-skew correction (docs/design.md §2).

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



_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    return _JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)
