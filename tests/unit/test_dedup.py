"""stages/dedup.py: the dedup table bounded by arrival time — what is found, what is swept, and when."""

from __future__ import annotations

import pytest
from flywheel.model.clock import DAY_MS
from flywheel.stages import dedup as dedup_mod
from flywheel.stages.dedup import GEN, Dedup, clock_key, entry_key, key_day, legacy_key
from flywheel.stages.tables import MemoryTable, Writes
from hypothesis import given, settings
from hypothesis import strategies as st

HOUR_MS = DAY_MS // 24


class Log:
    """An outbox that only records what was added (the changelog records)."""

    def __init__(self):
        self.records: list[tuple[int, bytes, bytes | None]] = []

    def add(self, topic, key, value, *, partition=None):
        self.records.append((partition, key, value))


class Stage:
    def __init__(self, horizon_days: int = 7):
        self.table = MemoryTable("first-seen-changelog")
        self.dedup = Dedup(self.table, horizon_days)
        self.arrivals = 0
        self.changelog: list[tuple[int, bytes, bytes | None]] = []

    def batch(self, arrivals: list[tuple[int, int, bytes]], *, lands: bool = True) -> list[bool]:
        """Each (partition, receivedAt ms, messageId) in turn: True where it is dropped as a retry."""
        log = Log()
        writes = Writes(self.table, log)
        batch = self.dedup.batch(writes)
        dropped = []
        for partition, received_ms, mid in arrivals:
            self.arrivals += 1
            batch.arrived(partition, received_ms)
            key, seen = batch.seen(partition, mid)
            if seen is None:
                batch.remember(partition, key, f"raw/{partition}@{self.arrivals}".encode())
            dropped.append(seen is not None)
        batch.finish()
        if lands:
            writes.apply({})
            batch.landed()
            self.changelog += log.records
        return dropped

    def entries(self, partition: int = 0) -> list[bytes]:
        return [k for k in self.table.data.get(partition, {}) if k.startswith(GEN)]


def at(day: float) -> int:
    return int(day * DAY_MS)


def test_a_retry_within_the_horizon_is_dropped_and_one_beyond_two_horizons_is_not():
    s = Stage(horizon_days=7)
    assert s.batch([(0, at(100.5), b"m1")]) == [False]
    assert s.batch([(0, at(107.4), b"m1")]) == [True]  # 6.9 days later, in the next generation
    assert s.batch([(0, at(100.6), b"m1")]) == [True]  # an old receivedAt does not move the clock back
    s.batch([(0, at(113), b"other")])
    assert s.batch([(0, at(114), b"m1")]) == [False]  # 13.5 days later: its generation has expired
    assert s.batch([(0, at(114.1), b"m1")]) == [True]  # and is remembered again


def test_the_clock_is_per_partition():
    s = Stage(horizon_days=1)
    s.batch([(0, at(10), b"m1"), (1, at(10), b"m1")])
    s.batch([(1, at(30), b"n")])  # partition 1 moves on; partition 0 still remembers
    assert s.batch([(0, at(10.5), b"m1"), (1, at(30.1), b"m1")]) == [True, False]


def test_expired_generations_are_swept_a_slice_per_batch_with_tombstones(monkeypatch):
    monkeypatch.setattr(dedup_mod, "SWEEP_PER_BATCH", 3)
    s = Stage(horizon_days=2)
    s.batch([(0, at(0.5), f"old-{i}".encode()) for i in range(7)])
    s.batch([(0, at(2.5), b"mid")])
    assert len(s.entries()) == 8
    s.changelog.clear()
    s.batch([(0, at(4.5), b"new-1")])  # generation 0 is now two back: 3 of its 7 keys go
    assert sorted(key_day(k) for k in s.entries()) == [0] * 4 + [2, 4]
    assert [v for _, k, v in s.changelog if k.startswith(GEN) and key_day(k) == 0] == [None] * 3
    s.batch([(0, at(4.6), b"new-2")])
    s.batch([(0, at(4.7), b"new-3")])
    assert sorted(key_day(k) for k in s.entries()) == [2, 4, 4, 4]
    assert s.table.get(0, clock_key(0)) == b"4 2"  # arrival day 4; everything before day 2 is gone


def test_a_sweep_whose_batch_failed_is_done_again(monkeypatch):
    monkeypatch.setattr(dedup_mod, "SWEEP_PER_BATCH", 2)
    s = Stage(horizon_days=1)
    s.batch([(0, at(0.5), f"old-{i}".encode()) for i in range(4)])
    s.batch([(0, at(2.5), b"a")], lands=False)  # its tombstones never reached Kafka
    assert len(s.entries()) == 4
    for _ in range(3):
        s.batch([(0, at(2.6), b"b")])
    assert [key_day(k) for k in s.entries()] == [2]


def test_ids_stored_before_generations_count_as_the_first_generation_then_are_swept():
    s = Stage(horizon_days=3)
    s.table.write(0, {b"legacy-1": b"raw/0@1", b"legacy-2": b"raw/0@2"}, None)  # flywheel <= 7ae8eae
    assert s.batch([(0, at(10), b"legacy-1")]) == [True]
    assert s.table.get(0, legacy_key(0)) == b"9"  # the generation starting on day 9
    assert s.batch([(0, at(13), b"legacy-2")]) == [True]  # still within the next generation
    s.batch([(0, at(15.5), b"x")])  # generation 9 expired
    assert b"legacy-1" not in s.table.data[0] and s.table.get(0, legacy_key(0)) is None
    assert s.batch([(0, at(15.6), b"legacy-2")]) == [False]


def test_a_new_horizon_applies_from_the_next_batch():
    s = Stage(horizon_days=7)
    s.batch([(0, at(20), b"m1")])
    shorter = Dedup(s.table, 2)
    s.dedup = shorter
    s.batch([(0, at(24.5), b"other")])  # generations of 2 days: day 24, before it day 22 — day 14 is swept
    assert s.entries() != [] and all(key_day(k) >= 22 for k in s.entries())


@settings(max_examples=200, deadline=None)
@given(
    horizon=st.integers(1, 5),
    steps=st.lists(st.tuples(st.integers(-12, 40), st.sampled_from([b"a", b"b", b"c", b"d"]), st.booleans()),
                   min_size=1, max_size=80),
)
def test_dropped_exactly_when_the_first_copy_is_in_this_generation_or_the_last(horizon, steps):
    """Arrival times wander (hours, sometimes back); batches end at random. A messageId is dropped iff its
    kept copy is in the clock's generation or the one before — so always within `horizon` days of
    arrival clock — and the table never holds an entry older than that after a full sweep."""
    s = Stage(horizon_days=horizon)
    clock, now = -1, at(1000)
    kept: dict[bytes, int] = {}
    pending: list[tuple[int, int, bytes]] = []
    expected: list[bool] = []
    got: list[bool] = []
    for hours, mid, end_batch in steps:
        now += hours * HOUR_MS
        clock = max(clock, now // DAY_MS)
        current = clock - clock % horizon
        dropped = mid in kept and kept[mid] in (current, current - horizon)
        if not dropped:
            kept[mid] = current
        expected.append(dropped)
        pending.append((0, now, mid))
        if end_batch:
            got += s.batch(pending)
            pending = []
    got += s.batch(pending)
    assert got == expected
    current = clock - clock % horizon
    assert all(key_day(k) >= current - horizon for k in s.entries())


def test_entry_keys_sort_by_generation_then_id():
    assert entry_key(5, b"z") < entry_key(6, b"a") and key_day(entry_key(19_000, b"m")) == 19_000


@pytest.mark.parametrize("received_day", [0, 6, 7, 13])
def test_the_generation_is_the_first_day_of_its_horizon(received_day):
    s = Stage(horizon_days=7)
    s.batch([(0, at(received_day + 0.5), b"m")])
    assert s.entries() == [entry_key(received_day - received_day % 7, b"m")]


def test_forget_deletes_a_message_id_from_every_generation_a_lookup_reads():
    s = Stage(horizon_days=7)
    s.table.write(0, {b"legacy-mid": b"raw/0@1"}, None)  # a bare key of release 7ae8eae
    s.batch([(0, at(3), b"old")])
    s.batch([(0, at(8), b"new")])  # the next generation: "old" is in the previous one
    log = Log()
    writes = Writes(s.table, log)
    batch = s.dedup.batch(writes)
    assert [batch.forget(0, m) for m in (b"old", b"new", b"legacy-mid", b"never")] == [True, True, True, False]
    batch.finish()
    writes.apply({})
    assert s.entries() == [] and b"legacy-mid" not in s.table.data[0]
    assert sorted(k for _, k, v in log.records if v is None) == sorted(
        [entry_key(0, b"old"), entry_key(7, b"new"), b"legacy-mid"])
    assert s.batch([(0, at(8.5), b"old"), (0, at(8.5), b"new")]) == [False, False]  # new events now


def test_forget_on_a_fresh_partition_finds_nothing():
    s = Stage()
    batch = s.dedup.batch(Writes(s.table, Log()))
    assert batch.forget(5, b"m") is False
