"""Views vs oracles: the live metric views compared with ClickHouse's own functions, cell by cell.

Used by `flywheel metrics verify` and by the integration tests. `query` runs SQL on the configured
ClickHouse and returns rows.
"""

from __future__ import annotations

from collections.abc import Callable

from flywheel.metrics import oracle
from flywheel.metrics.definitions import Metrics

Query = Callable[[str], list]


def _cells(rows, n_keys: int) -> set[tuple]:
    return {tuple(str(v) for v in r[:n_keys]) + tuple(round(float(v), 9) for v in r[n_keys:]) for r in rows}


def views(query: Query) -> dict[str, set]:
    return {
        "funnel_daily": _cells(query("SELECT funnel, day, step, persons FROM flywheel.funnel_daily"), 3),
        "retention_daily": _cells(query(
            "SELECT retention, cohort_day, period, persons, cohort_size FROM flywheel.retention_daily"), 3),
        "active_users_daily": _cells(query(
            "SELECT day, dau, wau, mau, stickiness FROM flywheel.active_users_daily"), 1),
    }


def oracles(query: Query, metrics: Metrics) -> dict[str, set]:
    funnels, retention = set(), set()
    for f in metrics.funnels:
        funnels |= _cells(query(oracle.funnel_sql(f)), 3)
    for r in metrics.retention:
        retention |= _cells(query(oracle.retention_sql(r)), 3)
    return {"funnel_daily": funnels, "retention_daily": retention,
            "active_users_daily": _cells(query(oracle.active_users_sql(metrics.activity)), 1)}


def compare(query: Query, metrics: Metrics) -> dict[str, tuple[set, set]]:
    """{view: (cells only in the view, cells only in the oracle)} for the views that differ."""
    v, o = views(query), oracles(query, metrics)
    return {k: (v[k] - o[k], o[k] - v[k]) for k in v if v[k] != o[k]}
