"""A batch's writes to a changelog-backed table: the order every stage writes state in (docs/design.md §7).

1. `put` keeps the value for the rest of the batch (`get` reads it back) and adds its changelog record
   to the batch's outbox, on the key's partition;
2. the stage sends the outbox, with its other outputs, and awaits Kafka;
3. `apply` writes the values to the store — only what the changelog already holds, so a store is never
   ahead of its changelog.

A batch that fails before step 3 leaves the store as it was: its retry starts from the same state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from flywheel.stages.ports import Outbox, Table


class Writes:
    def __init__(self, table: Table, outbox: Outbox):
        self.table = table
        self.outbox = outbox
        self.pending: dict[int, dict[bytes, bytes | None]] = {}

    def get(self, partition: int, key: bytes) -> bytes | None:
        values = self.pending.get(partition)
        if values is not None and key in values:
            return values[key]
        return self.table.get(partition, key)

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Write `value` (None = delete) once the batch's outbox landed."""
        self.pending.setdefault(partition, {})[key] = value
        self.outbox.add(self.table.changelog, key, value, partition=partition)

    def apply(self, last_offsets: Mapping[tuple[str, int], int]) -> None:
        """After the outbox landed (its `send` returned `last_offsets`): into the store."""
        changelog = self.table.changelog
        for partition, values in self.pending.items():
            self.table.write(partition, values, last_offsets.get((changelog, partition)))
        self.pending.clear()


class MemoryTable:
    """stages.ports.Table in plain dicts, one per partition: for unit tests and the in-process benches (a
    worker's tables are Faust's, through runtime/faust_seams.py)."""

    def __init__(self, changelog: str):
        self.changelog = changelog
        self.data: dict[int, dict[bytes, bytes]] = {}
        self.persisted: dict[int, int] = {}  # partition → changelog offset its store holds

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self.data.get(partition, {}).get(key)

    def scan(self, partition: int, prefix: bytes = b"", start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        store = self.data.get(partition, {})
        for key in sorted(k for k in store if k.startswith(prefix) and k >= start):
            if key in store:  # deleted while the scan went on
                yield key, store[key]

    def write(self, partition: int, items: Mapping[bytes, bytes | None], changelog_offset: int | None) -> None:
        store = self.data.setdefault(partition, {})
        for key, value in items.items():
            if value is None:
                store.pop(key, None)
            else:
                store[key] = value
        if changelog_offset is not None:
            self.persisted[partition] = changelog_offset
