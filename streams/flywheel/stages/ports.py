"""What the stages need from the runtime and the edges, as protocols: the stages import no Faust, no
aiokafka and no ClickHouse client; runtime/ and clickhouse/ provide these (docs/design.md §7)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol


class Record(Protocol):
    """A consumed Kafka record (Faust's Message is one)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any  # a sequence of (name, bytes)
    timestamp: float  # seconds


class Outbox(Protocol):
    """Records for Kafka, sent together (runtime/outbox.py). Records of one topic-partition land in the
    order they were added, and if one of them landed, every one added before it did too."""

    def add(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int | None = None) -> None:
        """Without a partition, the key's: Kafka's default partitioner."""

    async def send(self) -> Mapping[tuple[str, int], int]:
        """Return once Kafka acknowledged every record, with the last offset per topic-partition."""


class Table(Protocol):
    """A changelog-backed key-value table, addressed by partition (runtime/stores.py)."""

    changelog: str  # the changelog topic: a write is a record there, on the same partition

    def get(self, partition: int, key: bytes) -> bytes | None: ...

    def scan(self, partition: int, prefix: bytes = b"", start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """The partition's keys starting with `prefix` and their values, in key order — from `start` on."""

    def write(self, partition: int, items: Mapping[bytes, bytes | None], changelog_offset: int | None) -> None:
        """Write (None = delete) what the changelog already holds, up to `changelog_offset`."""


class ClickHouseWriter(Protocol):
    """Inserts into ClickHouse (stages/sink.py's Sink)."""

    async def write(self, table: str, rows: list[dict[str, Any]]) -> None: ...

    async def query(self, sql: str) -> list[tuple]:
        """The rows of a query (raises if ClickHouse cannot answer: the caller tries again later)."""

    async def counted(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these events are stored with late = 0."""

    async def closed_values(self, partition: int, cells: Sequence[Any],
                            request: str) -> dict[Any, tuple[int, int, bool]]:
        """Metric cells' latest (value, version) on a partition not written for forget request `request`,
        and whether one for it is there."""
