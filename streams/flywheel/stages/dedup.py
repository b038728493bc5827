"""The dedup table, bounded by arrival time (docs/design.md §2).

SDKs retry on arrival time — a retry follows the first copy within hours, or days for a phone that was
offline — while event times can be anything (a backfill, an offline flush). So entries expire by the
partition's **arrival clock**: the newest `receivedAt` among the records it has read. They go in
generations `horizon` days wide, keyed by the first day of their generation:

    b"\\x01" + first day (4 bytes, big-endian) + messageId  →  origin of the record that first carried it

A lookup checks the clock's generation and the one before, so a retry arriving within `horizon` of its
first copy is always found; entries live between one and two horizons. When the clock enters a new
generation, the generation two back is deleted (tombstones on the changelog, so it compacts), a slice
of keys per batch, from where the last slice stopped: no scan of the live entries, ever.

Per partition, besides the entries:
- CLOCK + partition → b"<arrival day> <first day not yet swept>" (ASCII);
- LEGACY + partition → b"<first day>": messageIds stored before generations existed (bare keys, flywheel ≤ 7ae8eae)
  count as that generation — looked up while they last, swept like it.
Changing `horizon` is safe: the sweep goes by days; only retries straddling the change may be missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.model.clock import DAY_MS
from flywheel.stages.ports import Table
from flywheel.stages.tables import Writes

GEN = b"\x01"
CLOCK = b"\x00clock\x00"  # + partition (a memory store keeps every partition in one dict)
LEGACY = b"\x00legacy\x00"  # + partition
BARE = b"\x02"  # bare (legacy) keys sort from here; our own keys start with \x00 or \x01
SWEEP_PER_BATCH = 2_000  # keys deleted per partition per batch while a generation expires


def clock_key(partition: int) -> bytes:
    return CLOCK + str(partition).encode()


def legacy_key(partition: int) -> bytes:
    return LEGACY + str(partition).encode()


def entry_key(first_day: int, message_id: bytes) -> bytes:
    return GEN + first_day.to_bytes(4, "big") + message_id


def key_day(key: bytes) -> int:
    return int.from_bytes(key[1:5], "big")


@dataclass
class _Clock:
    day: int  # arrival day: the newest receivedAt's day
    swept: int  # every generation starting before this day is gone
    legacy: int | None  # the generation bare keys count as, while any are left
    dirty: bool = False
    cursor: bytes | None = None  # where this batch's sweep stopped (kept once the batch landed)
    legacy_cursor: bytes | None = None
    prefixes: tuple[bytes, ...] = ()  # key prefixes of the generations a lookup checks, current first


@dataclass
class Dedup:
    """The dedup table of one ingest stage. `batch(writes)` gives the view one batch uses."""

    table: Table
    horizon_days: int
    # Where the last landed sweep stopped, per partition: the next sweep seeks there instead of wading
    # through the tombstones before it. Memory only: after a restart the first sweep seeks from the start.
    cursors: dict[int, bytes] = field(default_factory=dict)
    legacy_cursors: dict[int, bytes] = field(default_factory=dict)

    def first_day(self, day: int) -> int:
        return day - day % self.horizon_days

    def batch(self, writes: Writes) -> DedupBatch:
        return DedupBatch(self, writes)


class DedupBatch:
    def __init__(self, dedup: Dedup, writes: Writes):
        self.dedup = dedup
        self.writes = writes
        self.clocks: dict[int, _Clock] = {}

    def _clock(self, partition: int) -> _Clock:
        clock = self.clocks.get(partition)
        if clock is None:
            value = self.writes.get(partition, clock_key(partition))
            legacy = self.writes.get(partition, legacy_key(partition))
            if value is None:
                # A fresh partition — or one written before generations: its bare keys become a generation.
                clock = _Clock(day=-1, swept=0, legacy=None, dirty=True)
                if legacy is None and next(self.dedup.table.scan(partition, start=BARE), None) is not None:
                    clock.legacy = -1  # set to the first generation once the clock has a day
            else:
                day, swept = map(int, value.split())
                clock = _Clock(day=day, swept=swept, legacy=int(legacy) if legacy is not None else None)
                self._prefixes(clock)
            self.clocks[partition] = clock
        return clock

    def arrived(self, partition: int, received_ms: int) -> None:
        """A record of `partition` arrived at `received_ms`: the clock moves on (never back)."""
        clock = self._clock(partition)
        day = received_ms // DAY_MS
        if day > clock.day:
            clock.day, clock.dirty = day, True
            if clock.legacy == -1:
                clock.legacy = self.dedup.first_day(day)
                self.writes.put(partition, legacy_key(partition), str(clock.legacy).encode())
            self._prefixes(clock)

    def _prefixes(self, clock: _Clock) -> None:
        current, horizon = self.dedup.first_day(clock.day), self.dedup.horizon_days
        clock.prefixes = (entry_key(current, b""),
                          *((entry_key(current - horizon, b""),) if current >= horizon else ()),
                          *((b"",) if clock.legacy is not None else ()))

    def seen(self, partition: int, message_id: bytes) -> tuple[bytes, bytes | None]:
        """Where this messageId is (or would be) kept, and the origin of its first record if it is."""
        clock = self._clock(partition)
        get = self.writes.get
        for prefix in clock.prefixes:
            origin = get(partition, prefix + message_id)
            if origin is not None:
                return prefix + message_id, origin
        return clock.prefixes[0] + message_id, None

    def remember(self, partition: int, key: bytes, origin: bytes) -> None:
        self.writes.put(partition, key, origin)

    def forget(self, partition: int, message_id: bytes) -> bool:
        """Delete this messageId wherever a lookup would find it (a person forgotten); whether it was there."""
        clock = self._clock(partition)
        found = False
        for prefix in clock.prefixes:
            if self.writes.get(partition, prefix + message_id) is not None:
                self.writes.put(partition, prefix + message_id, None)
                found = True
        return found

    def finish(self) -> None:
        """Before the batch's outbox is sent: the clocks, and a slice of the expired generations' tombstones."""
        for partition, clock in self.clocks.items():
            if clock.day < 0:
                continue
            expired_before = self.dedup.first_day(clock.day) - self.dedup.horizon_days
            if clock.swept < expired_before:
                clock.cursor = self._sweep(partition, clock, expired_before)
                if clock.cursor is None:
                    clock.swept, clock.dirty = expired_before, True
            if clock.legacy is not None and clock.legacy >= 0 and clock.legacy < expired_before:
                clock.legacy_cursor = self._sweep_legacy(partition)
                if clock.legacy_cursor is None:
                    clock.legacy = None
                    self.writes.put(partition, legacy_key(partition), None)
            if clock.dirty:
                self.writes.put(partition, clock_key(partition), f"{clock.day} {clock.swept}".encode())

    def landed(self) -> None:
        """After the outbox landed and the writes were applied: the next sweep starts where this one stopped."""
        for partition, clock in self.clocks.items():
            for cursor, cursors in ((clock.cursor, self.dedup.cursors), (clock.legacy_cursor,
                                                                          self.dedup.legacy_cursors)):
                if cursor is None:
                    cursors.pop(partition, None)
                else:
                    cursors[partition] = cursor

    def _sweep(self, partition: int, clock: _Clock, expired_before: int) -> bytes | None:
        """Delete up to SWEEP_PER_BATCH entries of generations starting before `expired_before`; return the
        last key deleted, or None when none are left. This batch's own entries count too: the clock may
        have entered a new generation after it stored some."""
        for key, value in list(self.writes.pending.get(partition, {}).items()):
            if key.startswith(GEN) and value is not None and key_day(key) < expired_before:
                self.writes.put(partition, key, None)
        start = max(self.dedup.cursors.get(partition, b""), GEN + clock.swept.to_bytes(4, "big"))
        deleted = None
        for n, (key, _) in enumerate(self.dedup.table.scan(partition, GEN, start)):
            if n >= SWEEP_PER_BATCH:
                return deleted
            if key_day(key) >= expired_before:
                return None
            self.writes.put(partition, key, None)
            deleted = key
        return None

    def _sweep_legacy(self, partition: int) -> bytes | None:
        for key, value in list(self.writes.pending.get(partition, {}).items()):
            if key >= BARE and value is not None:
                self.writes.put(partition, key, None)
        start = max(self.dedup.legacy_cursors.get(partition, b""), BARE)
        deleted = None
        for n, (key, _) in enumerate(self.dedup.table.scan(partition, start=start)):
            if n >= SWEEP_PER_BATCH:
                return deleted
            self.writes.put(partition, key, None)
            deleted = key
        return None
