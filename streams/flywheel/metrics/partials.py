"""Partition partials: the sum of the contributions of the persons a partition owns (docs/design.md §4).

A partition's partial of a metric cell (funnel day step, cohort period, active-users day) is the number
of its persons that count for the cell; the global value is the plain sum over partitions, exact
because a person lives on exactly one partition. Partials are derived from the person table:

- a batch's effect is computed first (`change`: the persons' new contribution minus their old one) and
  applied only once the states that explain it are written (`commit`), so the partials never count
  what the table does not hold, whatever fails in between;
- they are checkpointed with the states (the aggregate stage writes each changed cell's count beside
  them) and loaded from there at assignment (`load`), or counted afresh from the states (`count`);
- they are published as absolute values with a version per (cell, partition), so a re-publication
  replaces instead of adding up; a cell stays `dirty` until a publication of its current value landed.

Open cells. A cell is derived while every person's state still holds what it needs: from
`open_from = day(watermark) − horizon_days` on, where the watermark is the newest event time applied
on the partition (each person keeps at least that much history before its own newest event,
person.prune). A cell that falls behind is closed: dropped from memory, not re-published, its last
value in ClickHouse final. Lateness stays per person; the one case a closed cell would need to change
— an old event of a person silent for longer than lateness + close_after (37 days by default) — is
counted (flywheel_closed_cell_updates_total) and logged, and the cell keeps its value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flywheel.metrics.cells import Cell, is_open, kind_of
from flywheel.metrics.definitions import Metrics
from flywheel.metrics.exposures import changed
from flywheel.metrics.person import PersonState, changed_contributions, contributions, weights
from flywheel.model.clock import DAY_MS


@dataclass
class PartitionPartials:
    watermark: int = -1  # newest event time (ms) applied on this partition
    open_from: int = 0  # first open day: day(watermark) − horizon_days, kept with the watermark
    counts: Counter = field(default_factory=Counter)
    dirty: set[Cell] = field(default_factory=set)  # cells whose current value is not yet published


@dataclass(frozen=True)
class Change:
    """What a batch does to one partition's partials, computed before anything is written."""

    partition: int
    watermark: int
    open_from: int
    values: dict[Cell, int]  # changed open cells → their new absolute value
    closed: tuple[Cell, ...]  # counted cells the new watermark closes
    unpublished_zeros: tuple[Cell, ...]  # cells at 0 whose publication is still due once this is applied


class Partials:
    """The partials of the partitions this worker owns. Pure bookkeeping: no Kafka, no I/O."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.parts: dict[int, PartitionPartials] = {}

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """After a rebalance: partials must be loaded or rebuilt before use."""
        if partitions is None:
            self.parts.clear()
        for p in partitions or ():
            self.parts.pop(p, None)

    def open_from(self, partition: int) -> int:
        return self.parts[partition].open_from

    def open_from_of(self, watermark: int) -> int:
        """The first open day under a watermark."""
        return (watermark // DAY_MS if watermark >= 0 else 0) - self.metrics.horizon_days

    def touches_closed(self, partition: int, ts_ms: int) -> bool:
        """Whether an event's effects reach a closed cell (they are not published: see the module doc).
        Only an old event of a person silent for longer than the horizon can do that."""
        return ts_ms // DAY_MS - self.metrics.reach_days < self.open_from(partition)

    # ---- a partition's partials, from the table ------------------------------------------------------
    def load(self, partition: int, watermark: int, counts: Mapping[Cell, int], zeros: Iterable[Cell] = ()) -> None:
        """From a checkpoint, or from `count` over the partition's persons. Every counted cell, and every
        zero whose publication may not have landed, is to be published again: a crash may have come between
        the checkpoint and the publication."""
        open_from = self.open_from_of(watermark)
        part = self.parts[partition] = PartitionPartials(watermark, open_from)
        part.counts.update({c: n for c, n in counts.items() if n and is_open(c, open_from)})
        part.dirty = set(part.counts) | {c for c in zeros if is_open(c, open_from)}

    # ---- a batch -------------------------------------------------------------------------------------
    def watermark_of(self, partition: int, watermark: int) -> int:
        """The partition's watermark once an event of time `watermark` is applied."""
        return max(self.parts[partition].watermark, watermark)

    def delta(self, partition: int, watermark: int,
              persons: Iterable[tuple[PersonState | None, PersonState | None]]) -> Counter:
        """What persons changing (old → new, None = absent) does to the open cells once the partition's
        watermark reached `watermark`: new contribution minus old. Pure; large batches add several up."""
        open_from = self.open_from_of(self.watermark_of(partition, watermark))
        delta: Counter = Counter()
        weighted = bool(self.metrics.experiments)
        for old, new in persons:
            before, after = changed_contributions(old, new, self.metrics, open_from)
            for c in before - after:
                delta[c] -= 1
            for c in after - before:
                delta[c] += 1
            if weighted and ((old is not None and old.exposures) or (new is not None and new.exposures)):
                # only the experiments whose exposure or parts changed: the others' cells are the same
                which = None if old is None or new is None else changed(self.metrics.experiments, old.track, new.track)
                if which == []:
                    continue
                was = weights(old, self.metrics, which) if old is not None else {}
                now = weights(new, self.metrics, which) if new is not None else {}
                if was != now:
                    for c in was.keys() | now.keys():
                        delta[c] += now.get(c, 0) - was.get(c, 0)
        return delta

    def change(self, partition: int, watermark: int, delta: Counter) -> Change:
        """The effect of `delta` (from `delta`, at the same `watermark`) and of the partition's watermark
        reaching `watermark`. Changes nothing: `commit` applies it."""
        part = self.parts[partition]
        wm = self.watermark_of(partition, watermark)
        open_from = self.open_from_of(wm)
        closed = tuple(c for c in part.counts if not is_open(c, open_from)) if open_from != part.open_from else ()
        values = {c: part.counts.get(c, 0) + d for c, d in delta.items() if d}
        dirty = (part.dirty - set(closed)) | values.keys()
        zeros = tuple(c for c in dirty if values.get(c, part.counts.get(c, 0)) == 0 and is_open(c, open_from))
        return Change(partition, wm, open_from, values, closed, zeros)

    def commit(self, change: Change) -> None:
        """Apply a change once the states it derives from are written."""
        part = self.parts[change.partition]
        if change.open_from != part.open_from:
            for c in change.closed:
                part.counts.pop(c, None)
            part.dirty = {c for c in part.dirty if is_open(c, change.open_from)}
        part.watermark, part.open_from = change.watermark, change.open_from
        for c, value in change.values.items():
            part.counts[c] = value
            part.dirty.add(c)

    # ---- publication ---------------------------------------------------------------------------------
    def unpublished(self, partition: int) -> list[tuple[Cell, int | tuple[int, ...]]]:
        """The cells whose current value is still to be published, with that value; for a grouped kind
        (cells.Kind.group) its group, with every value of the group, if any of them is due."""
        part = self.parts[partition]
        out: list[tuple[Cell, int | tuple[int, ...]]] = []
        groups: dict[Cell, int] = {}
        for c in part.dirty:
            kind = kind_of(c)
            if kind.group is None:
                out.append((c, part.counts.get(c, 0)))
            else:
                groups[kind.group(c)] = len(kind.measures)
        for g, n in groups.items():
            out.append((g, tuple(part.counts.get((*g, i), 0) for i in range(n))))
        return out

    def published(self, partition: int, cells: Iterable[tuple[Cell, int | tuple[int, ...]]]) -> None:
        """These values landed: their cells are clean unless they changed meanwhile; a 0 is dropped."""
        part = self.parts.get(partition)
        if part is None:  # forgotten meanwhile (a rebalance)
            return
        for c, value in cells:
            for cell, v in ([((*c, i), v) for i, v in enumerate(value)] if isinstance(value, tuple)
                            else [(c, value)]):
                if part.counts.get(cell, 0) == v:
                    part.dirty.discard(cell)
                    if v == 0:
                        part.counts.pop(cell, None)


def count(states: Iterable[PersonState], metrics: Metrics, open_from: int) -> Counter:
    """The partials of these persons: how many count for each open cell."""
    counts: Counter = Counter()
    for s in states:
        counts.update(contributions(s, metrics, open_from))
        if metrics.experiments:
            counts.update(weights(s, metrics))
    return counts
