"""Time in the data model: event times travel as epoch milliseconds (UTC); aggregates bucket them by
UTC day number (days since 1970-01-01)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)
_EPOCH_DT = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def wall_ms() -> int:
    """The system clock, epoch milliseconds."""
    return time.time_ns() // 1_000_000


def to_ms(ts: datetime) -> int:
    """Epoch milliseconds, floored exactly (float seconds * 1000 can be off by one)."""
    return (ts - _EPOCH_DT) // _MS


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def day_text(day: int) -> str:
    """UTC day number → 'YYYY-MM-DD'."""
    return (EPOCH + timedelta(days=day)).isoformat()



def iso_ms(ms: int) -> str:
    """Epoch milliseconds → '2024-10-04T12:00:00.000Z' (ISO 8601, as Segment's timestamps)."""
    return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
