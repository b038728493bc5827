"""Metric cells: what a partition counts persons in, and the one record format they are published in.

A cell is a tuple headed by the compiled definition it belongs to (docs/design.md §4):

    (funnel, day, step)          persons whose level on `day` reached `step`
    (retention, cohort, n)       persons of the cohort (n = 0) / returning n periods later
    (window, day)                persons active in the dau/wau/mau window ending on `day`
    (lifecycle, period, status)  persons of that lifecycle status in the period (its first day)
    (experiment, variation, metric, stat)
                                 a sum over the exposed persons (exposures.cells): the one weighted kind,
                                 published per (experiment, variation, metric) with its nine stats together

The head's type says what the rest means (`KINDS`), and definitions compare by identity, so two metrics
never share a cell. Plain tuples because contributions build millions of them: a tuple display costs a
twentieth of a NamedTuple's constructor.

Each kind declares its published fields once (`Kind`): the record on its metrics.* topic, that record's
Kafka key, the row of its ClickHouse *_partials table and the cell's id in a checkpoint all derive from
that declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from flywheel.metrics.definitions import (
    ACTIVE_WINDOWS,
    LIFECYCLE_STATUSES,
    ActiveWindow,
    Experiment,
    Funnel,
    Lifecycle,
    Metrics,
    Retention,
    ref,
)
from flywheel.metrics.exposures import EXCLUDED, STATS, scales
from flywheel.model.clock import day_text

Cell = tuple  # (definition, *coordinates), as above


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of cell: when it is open, and how it is published."""

    name: str  # "funnels" | "retention" | "active_users" | "lifecycle": the Topics field and the record kind
    table: str  # ClickHouse table of the per-partition values
    fields: tuple[tuple[str, str], ...]  # (record field, ClickHouse column) of the cell's identity
    dates: frozenset[str]  # record fields holding a 'YYYY-MM-DD' day
    is_open: Callable[[Cell, int], bool]  # still derived from the person states, given the first open day
    values: Callable[[Cell], tuple]  # the record's identity fields, in `fields` order
    tag: str  # of its checkpoint id
    # (record field, ClickHouse column) of the published value(s); a grouped kind's cells are published
    # together, one record per group (`group`), with one value per measure (the cell's last coordinate)
    measures: tuple[tuple[str, str], ...] = (("persons", "persons"),)
    group: Callable[[Cell], Cell] | None = None
    text: frozenset[str] = frozenset()  # measures published as decimal text: they may exceed 64 bits
    # (record field, ClickHouse column) of what a record says about its definition, and their values for a cell
    # (a grouped kind: its group) — so that SQL over the table needs no metrics file
    attributes: tuple[tuple[str, str], ...] = ()
    describe: Callable[[Cell], tuple] = lambda c: ()


def _retention_open(cell: Cell, open_from: int) -> bool:
    # a cohort's size is kept for good (first-seen is never pruned); a return period while open
    r, cohort, n = cell
    return n == 0 or cohort + n * r.period_days >= open_from


KINDS: dict[type, Kind] = {
    # a funnel's and a retention's cells are per version of the definition: a changed one has its own history,
    # and the old version's cells stay (docs/design.md §13)
    Funnel: Kind("funnels", "flywheel.funnel_partials",
                 (("funnel", "funnel"), ("definitionVersion", "definition_version"), ("day", "day"), ("step", "step")),
                 frozenset({"day"}), lambda c, open_from: c[1] >= open_from,
                 lambda c: (c[0].name, c[0].version, day_text(c[1]), c[2]), "f"),
    Retention: Kind("retention", "flywheel.retention_partials",
                    (("retention", "retention"), ("definitionVersion", "definition_version"),
                     ("cohortDay", "cohort_day"), ("period", "period")),
                    frozenset({"cohortDay"}), _retention_open,
                    lambda c: (c[0].name, c[0].version, day_text(c[1]), c[2]), "r"),
    # the 30-day window ending on `day` must lie within the open days
    ActiveWindow: Kind("active_users", "flywheel.active_user_partials", (("kind", "kind"), ("day", "day")),
                       frozenset({"day"}), lambda c, open_from: c[1] >= open_from + 29,
                       lambda c: (c[0].name, day_text(c[1])), "a"),
    # a period's status needs the previous period too
    Lifecycle: Kind("lifecycle", "flywheel.lifecycle_partials", (("day", "day"), ("status", "status")),
                    frozenset({"day"}), lambda c, open_from: c[1] - c[0].period_days >= open_from,
                    lambda c: (day_text(c[1]), LIFECYCLE_STATUSES[c[2]]), "l"),
    # never closed: a person's contribution is kept for good (person.prune); values of the group (e, v, m)
    Experiment: Kind("experiments", "flywheel.experiment_partials",
                     (("experiment", "experiment"), ("variation", "variation"), ("metric", "metric")),
                     frozenset(), lambda c, open_from: True, lambda c: _experiment_values(*c[:3]), "x",
                     tuple((s, s) for s in STATS), lambda c: c[:3], frozenset(STATS[1:]),
                     (("control", "control"), ("kind", "kind"), ("scaleY", "scale_y"), ("scaleX", "scale_x")),
                     lambda c: _experiment_attributes(*c[:3])),
}
KIND_BY_NAME = {k.name: k for k in KINDS.values()}
# What every record carries besides the cell and its values: (record field, ClickHouse column).
COMMON = (("partition", "kafka_partition"), ("version", "version"))


def _experiment_values(e: Experiment, v: int, m: int) -> tuple[str, str, str]:
    """(experiment, variation, metric) names; the excluded persons' group names no variation and no metric."""
    if v == EXCLUDED:
        return e.name, "", ""
    return e.name, e.variations[v][0], e.metrics[m].name


def _experiment_attributes(e: Experiment, v: int, m: int) -> tuple[int, str, int, int]:
    """Whether the variation is the control, the metric's kind, and what its y and x sums are in (millionths
    of a property, or units)."""
    if v == EXCLUDED:
        return 0, "", 1, 1
    return int(e.variations[v][0] == e.control), e.metrics[m].kind, *scales(e.metrics[m])


def kind_of(cell: Cell) -> Kind:
    return KINDS[type(cell[0])]


def is_open(cell: Cell, open_from: int) -> bool:
    """Whether a cell is still derived from the person states (partials.py)."""
    return KINDS[type(cell[0])].is_open(cell, open_from)


def record(cell: Cell, partition: int, value: int | tuple[int, ...], version: int,
           correction: str = "") -> tuple[Kind, bytes, dict[str, Any]]:
    """A cell's absolute value on a partition → (kind, Kafka key, record). Documented in the README, "Topics":

      metrics.funnels       {"funnel", "definitionVersion", "day", "step", "partition", "persons", "version"}
      metrics.retention     {"retention", "definitionVersion", "cohortDay", "period", "partition", "persons",
                             "version"}
      metrics.active_users  {"kind": "dau"|"wau"|"mau", "day", "partition", "persons", "version"}
      metrics.lifecycle     {"day", "status": "new"|"returning"|"resurrecting"|"dormant", "partition", "persons",
                             "version"}
      metrics.experiments   {"experiment", "variation", "metric", "partition", "n", "sy", "syy", "sx", "sxx", "sxy",
                             "sp", "spp", "spy", "control", "kind", "scaleY", "scaleX", "version"}: one record
                             per group (`value`: its values, the cell its group), sums as decimal text (they may
                             exceed 64 bits; y and p in 1/scaleY, x in 1/scaleX of the property's unit); variation
                             and metric "" count the persons excluded (exposed to more than one variation) in n

    plus `"correction": <request id>` on a closed cell republished for a forgotten person.
    The key names the cell and the partition (`checkout|42d0fd28|2024-10-04|3|5`): a compacted topic keeps the
    latest.
    """
    kind = KINDS[type(cell[0])]
    values = kind.values(cell)
    out = {name: v for (name, _), v in zip(kind.fields, values, strict=True)}
    out["partition"] = partition
    for (name, _), v in zip(kind.measures, value if isinstance(value, tuple) else (value,), strict=True):
        out[name] = str(v) if name in kind.text else v
    out.update(zip((name for name, _ in kind.attributes), kind.describe(cell), strict=True))
    out["version"] = version
    if correction:
        out["correction"] = correction
    key = "|".join(map(str, (*values, partition))).encode()
    return kind, key, out


def row(kind: Kind, rec: dict[str, Any]) -> dict[str, Any]:
    """A metrics.* record → the row of its *_partials table."""
    out = {column: (date.fromisoformat(rec[name]) if name in kind.dates else rec[name])
           for name, column in kind.fields}
    out.update({column: rec[name] for name, column in COMMON})
    out.update({column: int(rec[name]) for name, column in kind.measures})
    out.update({column: rec[name] for name, column in kind.attributes})
    if "correction" in rec:
        out["correction"] = rec["correction"]
    return out


# ---- checkpoint ids: a cell as text, with its definition's version -------------------------------

def cell_id(cell: Cell) -> str:
    head, *coordinates = cell
    name = head.name if isinstance(head, ActiveWindow) else ref(head)
    return "|".join((KINDS[type(head)].tag, name, *map(str, coordinates)))


_WINDOWS = {w.name: w for w in ACTIVE_WINDOWS}


def parse_cell_id(text: str, metrics: Metrics) -> Cell | None:
    """The cell of `cell_id` text, or None if its definition is no longer in the registry."""
    tag, name, *rest = text.split("|")
    head = _WINDOWS.get(name) if tag == "a" else metrics.by_ref(name)
    if head is None or KINDS[type(head)].tag != tag:
        return None
    return (head, *map(int, rest))
