"""Views vs oracles: the live metric views compared with ClickHouse's own functions, cell by cell, and
segment_members with the members the oracle finds at a time (the worker's now).

Used by `flywheel metrics verify` and by the integration tests. `query` runs SQL on the configured
ClickHouse and returns rows.
"""

from __future__ import annotations

from collections.abc import Callable

from flywheel.metrics import oracle, rfm
from flywheel.metrics.definitions import Metrics
from flywheel.model.clock import wall_ms

Query = Callable[[str], list]


def _cells(rows, n_keys: int) -> set[tuple]:
    return {tuple(str(v) for v in r[:n_keys]) + tuple(round(float(v), 9) for v in r[n_keys:]) for r in rows}


def _exact(rows, n_keys: int) -> set[tuple]:
    """Cells whose values are integers that may exceed a float's precision (experiment sums)."""
    return {tuple(str(v) for v in r[:n_keys]) + tuple(int(v) for v in r[n_keys:]) for r in rows}


def views(query: Query) -> dict[str, set]:
    return {
        "funnel_daily": _cells(query("SELECT funnel, day, step, persons FROM flywheel.funnel_daily"), 3),
        "retention_daily": _cells(query(
            "SELECT retention, cohort_day, period, persons, cohort_size FROM flywheel.retention_daily"), 3),
        "active_users_daily": _cells(query(
            "SELECT day, dau, wau, mau, stickiness FROM flywheel.active_users_daily"), 1),
        "lifecycle_daily": _cells(query(
            "SELECT day, s.1, s.2 FROM flywheel.lifecycle_daily ARRAY JOIN [('new', new), ('returning', returning), "
            "('resurrecting', resurrecting), ('dormant', dormant)] AS s WHERE s.2 > 0"), 2),
        "segment_members": _cells(query("SELECT segment, person_id FROM flywheel.segment_members"), 2),
        "experiment_stats": _exact(query("SELECT experiment, variation, metric, n, sy, syy, sx, sxx, sxy, sp, spp, "
                                         "spy FROM flywheel.experiment_stats"), 3),
    }


def oracles(query: Query, metrics: Metrics, at_ms: int | None = None) -> dict[str, set]:
    """The oracles; segment members at `at_ms` (default: now)."""
    at_ms = wall_ms() if at_ms is None else at_ms
    members = set()
    for s in metrics.segments:
        members |= {(s.name, str(r[0])) for r in query(oracle.segment_members_sql(s, metrics, at_ms))}
    if metrics.rfm is not None:  # the R×F segments, as the leader publishes them
        rfm_def = metrics.rfm
        members |= {(f"rfm_{rfm.grid_segment(int(r[4]), int(r[5]))}", str(r[0]))
                    for r in query(oracle.rfm_sql(rfm_def.order, rfm_def.monetary, rfm_def.window_ms, at_ms))}
    lifecycle: set = set()
    if metrics.lifecycle is not None:  # up to the last period anyone was active in, as the view
        rows = query(oracle.lifecycle_sql(metrics.lifecycle, metrics.activity))
        last = max((r[0] for r in rows if r[1] != "dormant"), default=None)
        lifecycle = _cells([r for r in rows if r[0] <= last], 2)
    funnels, retention = set(), set()
    for f in metrics.funnels:
        funnels |= _cells(query(oracle.funnel_sql(f)), 3)
    for r in metrics.retention:
        retention |= _cells(query(oracle.retention_sql(r)), 3)
    experiments: set = set()
    for e in metrics.experiments:  # the view's row of excluded persons: variation and metric ''
        rows = query(oracle.experiment_stats_sql(e))
        experiments |= _exact([(e.name, *r[:11]) for r in rows], 3)
        if rows and int(rows[0][11]):
            experiments.add((e.name, "", "", int(rows[0][11]), 0, 0, 0, 0, 0, 0, 0, 0))
    return {"funnel_daily": funnels, "retention_daily": retention,
            "active_users_daily": _cells(query(oracle.active_users_sql(metrics.activity)), 1),
            "lifecycle_daily": lifecycle, "segment_members": members, "experiment_stats": experiments}


def compare(query: Query, metrics: Metrics, at_ms: int | None = None) -> dict[str, tuple[set, set]]:
    """{view: (cells only in the view, cells only in the oracle)} for the views that differ."""
    v, o = views(query), oracles(query, metrics, at_ms)
    return {k: (v[k] - o[k], o[k] - v[k]) for k in v if v[k] != o[k]}
