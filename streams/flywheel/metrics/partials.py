"""Partition partials: the sum of the contributions of the persons a partition owns (DESIGN §4).

A partition's partial of a metric cell (funnel day step, cohort period, active-users day) is the number
of its persons that count for the cell; the global value is the plain sum over partitions, exact
because a person lives on exactly one partition. Partials are derived, never stored on their own:

- updated incrementally as persons change (their new contribution minus their old one);
- rebuilt from the person table when a partition is (re)assigned, so a crash cannot make them disagree
  with the state;
- published as absolute values with a version per (cell, partition), so a re-publication replaces
  instead of adding up (ClickHouse keeps the highest version).

Open cells. A cell is derived while every person's state still holds what it needs: from
`open_from = day(watermark) − horizon_days` on, where the watermark is the newest event time applied
on the partition (each person keeps at least that much history before its own newest event,
person.prune). A cell that falls behind is closed: dropped from memory, not re-published, its last
value in ClickHouse final. Lateness stays per person (DESIGN §4); the one case a closed cell would need
to change — an old event of a person silent for longer than lateness + close_after (37 days by
default) — is counted (flywheel_closed_cell_updates_total) and logged, and the cell keeps its value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

from flywheel.metrics.definitions import DAY_MS, Metrics
from flywheel.metrics.person import Key, PersonState, contributions, key_open

EPOCH = date(1970, 1, 1)


def day_text(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()


@dataclass
class PartitionPartials:
    watermark: int = -1  # newest event time (ms) applied on this partition
    open_from: int = 0  # first open day: day(watermark) − horizon_days, kept with the watermark
    counts: Counter = field(default_factory=Counter)
    dirty: set[Key] = field(default_factory=set)


class Partials:
    """The partials of the partitions this worker owns. Pure bookkeeping: no Kafka, no I/O."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.parts: dict[int, PartitionPartials] = {}

    def ready(self, partition: int) -> bool:
        return partition in self.parts

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """After a rebalance: partials must be rebuilt from the person table before use."""
        if partitions is None:
            self.parts.clear()
        for p in partitions or ():
            self.parts.pop(p, None)

    def open_from(self, partition: int) -> int:
        return self.parts[partition].open_from

    def _open_from(self, watermark: int) -> int:
        return (watermark // DAY_MS if watermark >= 0 else 0) - self.metrics.horizon_days

    def touches_closed(self, partition: int, ts_ms: int) -> bool:
        """Whether an event's effects reach a closed cell (they are not published: see the module doc).
        Only an old event of a person silent for longer than the horizon can do that."""
        return ts_ms // DAY_MS - self.metrics.reach_days < self.open_from(partition)

    def rebuild(self, partition: int, states: Iterable[PersonState], watermark: int,
                zeros: Iterable[Key] = ()) -> None:
        """Count the partition's persons afresh; every counted cell is re-published, and so are `zeros`:
        cells the last batch took to 0, whose publication may not have landed (a crash after the state
        was written) — absent from the counts, nothing else would ever publish them again."""
        states = list(states)
        wm = max([watermark, *(s.newest for s in states)])
        open_from = self._open_from(wm)
        part = self.parts[partition] = PartitionPartials(watermark=wm, open_from=open_from)
        for s in states:
            part.counts.update(contributions(s, self.metrics, open_from))
        part.dirty = set(part.counts) | {k for k in zeros if key_open(k, open_from, self.metrics)}

    def advance(self, partition: int, ts_ms: int) -> None:
        """Raise the watermark; cells that fall behind the open bound are closed (dropped)."""
        part = self.parts[partition]
        if ts_ms <= part.watermark:
            return
        before = part.open_from
        part.watermark = ts_ms
        open_from = part.open_from = self._open_from(ts_ms)
        if open_from != before:
            for key in [k for k in part.counts if not key_open(k, open_from, self.metrics)]:
                del part.counts[key]
            part.dirty = {k for k in part.dirty if key_open(k, open_from, self.metrics)}

    def update(self, partition: int, old: PersonState | None, new: PersonState | None) -> None:
        """A person changed (or arrived, or left): apply its new contribution minus its old one."""
        part = self.parts[partition]
        open_from = part.open_from
        before = contributions(old, self.metrics, open_from) if old is not None else set()
        after = contributions(new, self.metrics, open_from) if new is not None else set()
        for key in before - after:
            part.counts[key] -= 1
            part.dirty.add(key)
        for key in after - before:
            part.counts[key] += 1
            part.dirty.add(key)

    def drain(self, partition: int) -> list[tuple[Key, int]]:
        """The changed cells and their absolute values, once."""
        part = self.parts[partition]
        out = [(k, part.counts[k]) for k in sorted(part.dirty, key=repr)]
        part.dirty = set()
        for k, v in out:
            if v == 0:
                del part.counts[k]  # published as 0 once; absent = 0 from now on
        return out


def records(cells: list[tuple[Key, int]], partition: int, version: int) -> dict[str, list[dict]]:
    """Cells → topic records, by metric kind ("funnels", "retention", "active_users").

    Documented formats (README, "Topics"):
      metrics.funnels       {"funnel", "day", "step", "partition", "persons", "version"}
      metrics.retention     {"retention", "cohortDay", "period", "partition", "persons", "version"}
                            period 0 = the cohort's size
      metrics.active_users  {"day", "kind": "dau"|"wau"|"mau", "partition", "persons", "version"}
    """
    out: dict[str, list[dict]] = {"funnels": [], "retention": [], "active_users": []}
    for key, value in cells:
        if key[0] == "f":
            out["funnels"].append({"funnel": key[1], "day": day_text(key[2]), "step": key[3],
                                   "partition": partition, "persons": value, "version": version})
        elif key[0] == "r":
            out["retention"].append({"retention": key[1], "cohortDay": day_text(key[2]), "period": key[3],
                                     "partition": partition, "persons": value, "version": version})
        else:
            out["active_users"].append({"day": day_text(key[2]), "kind": key[1], "partition": partition,
                                        "persons": value, "version": version})
    return out


def record_key(kind: str, record: dict) -> bytes:
    """Kafka key of a partial record: one per (cell, partition), so a compacted topic keeps the latest."""
    if kind == "funnels":
        parts = (record["funnel"], record["day"], record["step"])
    elif kind == "retention":
        parts = (record["retention"], record["cohortDay"], record["period"])
    else:
        parts = (record["kind"], record["day"])
    return "|".join(map(str, (*parts, record["partition"]))).encode()
