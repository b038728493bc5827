"""What the collector decides about one HTTP request: `Accepted(records)` or `Rejected(status, reason)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import orjson


class Record(NamedTuple):
    """One event as it goes to events.raw: the key of docs/design.md §1 and the JSON bytes."""

    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """Records to write, all from one request: one source, one receivedAt (epoch ms)."""

    records: list[Record]
    source: str
    received_ms: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request refused as a whole: nothing of it is written.

    `code` is a short stable word (metric label, and the `code` field the Segment SDKs log);
    `message` says what was wrong in words a client developer can act on.
    """

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return orjson.dumps({"success": False, "code": self.code, "message": self.message})


class Reject(Exception):
    """Raised by the pure steps to stop at the first problem; intake() turns it into its Rejected."""

    def __init__(self, rejected: Rejected):
        super().__init__(rejected.message)
        self.rejected = rejected


def bad_request(code: str, message: str) -> Reject:
    return Reject(Rejected(400, code, message))
