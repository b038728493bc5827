"""The oracle queries (docs/design.md §4): each metric recomputed by ClickHouse itself from the sunk events.

`windowFunnel(W, 'strict_once')`, `retention(...)` and `uniqExact` over `events_resolved` (non-late
events, each with today's person). The stream's views must equal these, cell by cell; tests use them, and
`flywheel metrics verify` runs them against a live store. They scan every event: fine for checking, not for
dashboards (that is what the views are for).
"""

from __future__ import annotations

from typing import Any

from flywheel.metrics.definitions import (
    DAY_MS,
    MONDAY_MS,
    Activity,
    Alert,
    Condition,
    Experiment,
    Funnel,
    Lifecycle,
    Metrics,
    Part,
    Performed,
    Periodic,
    Predicate,
    Retention,
    Segment,
    Trait,
)
from flywheel.metrics.exposures import MICROS


def quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def activity_sql(activity: Activity) -> str:
    """The activity rule as SQL over events' `type` and `event` columns."""
    types = ", ".join(quote(t) for t in sorted(activity.types))
    excluded = ", ".join(quote(e) for e in sorted(activity.exclude_events))
    return f"(type IN ({types}){f' AND event NOT IN ({excluded})' if excluded else ''})"


def condition(p: Predicate) -> str:
    """A predicate as SQL over events' `type`, `event` and `properties` columns (same rules as
    Predicate.matches and same_json_value)."""
    if p.event is None:
        return activity_sql(p.activity)
    parts = [f"event = {quote(p.event)}"] + [json_equals("properties", key, want) for key, want in p.where]
    return "(" + " AND ".join(parts) + ")"


def json_equals(column: str, key: str, want: Any) -> str:
    """A JSON object column's `key` equals `want`, typed as same_json_value compares."""
    k = quote(key)
    if isinstance(want, bool):
        return f"(JSONType({column}, {k}) = 'Bool' AND JSONExtractBool({column}, {k}) = {int(want)})"
    if isinstance(want, str):
        return f"(JSONType({column}, {k}) = 'String' AND JSONExtractString({column}, {k}) = {quote(want)})"
    return (f"(JSONType({column}, {k}) IN ('Int64', 'UInt64', 'Double') "
            f"AND JSONExtractFloat({column}, {k}) = toFloat64({float(want)!r}))")


def period_sql(definition: Periodic, time: str) -> str:
    """The first day of the period of `time`, as Periodic.period_of."""
    return f"toDate({time})" if definition.period == "day" else f"toMonday({time})"


def _events(source: str) -> str:
    return f"(SELECT person_id, timestamp, type, event, properties FROM {source} WHERE late = 0)"


def funnel_sql(f: Funnel, source: str = "flywheel.events_resolved") -> str:
    """(funnel, day, step, persons) for steps 1..level, days with at least one person at level ≥ 1."""
    first = condition(f.steps[0])
    conds = ", ".join([f"{first} AND toDate(e.timestamp) = p.day"] + [condition(s) for s in f.steps[1:]])
    return f"""
SELECT {quote(f.name)} AS funnel, day, step, count() AS persons
FROM (
    SELECT p.person_id, p.day AS day,
           windowFunnel({f.window_ms}, 'strict_once')(toUInt64(toUnixTimestamp64Milli(e.timestamp)), {conds}) AS level
    FROM (SELECT DISTINCT person_id, toDate(timestamp) AS day FROM {_events(source)} WHERE {first}) AS p
    INNER JOIN {_events(source)} AS e ON e.person_id = p.person_id
    GROUP BY p.person_id, p.day
)
ARRAY JOIN range(1, level + 1) AS step
GROUP BY day, step
ORDER BY day, step"""


def retention_sql(r: Retention, source: str = "flywheel.events_resolved") -> str:
    """(retention, cohort_day, period, persons, cohort_size) for periods with at least one person."""
    per = period_sql(r, "e.timestamp")
    cohort, ret = condition(r.cohort), condition(r.returning)
    conds = [f"{per} = f.cohort AND {cohort}"] + [
        f"{per} = f.cohort + {n * r.period_days} AND {ret}" for n in range(1, r.horizon + 1)
    ]
    first = period_sql(r, "min_ts")
    return f"""
SELECT {quote(r.name)} AS retention, cohort AS cohort_day, period, persons, cohort_size
FROM (
    SELECT cohort, n AS period, countIf(flags[n + 1] = 1) AS persons, countIf(flags[1] = 1) AS cohort_size
    FROM (
        SELECT f.cohort AS cohort, retention({", ".join(conds)}) AS flags
        FROM {_events(source)} AS e
        INNER JOIN (
            SELECT person_id, {first} AS cohort
            FROM (SELECT person_id, minIf(timestamp, {cohort}) AS min_ts, countIf({cohort}) AS c
                  FROM {_events(source)} GROUP BY person_id)
            WHERE c > 0
        ) AS f ON f.person_id = e.person_id
        GROUP BY e.person_id, f.cohort
    )
    ARRAY JOIN range(1, {r.horizon + 1}) AS n
    GROUP BY cohort, n
)
WHERE persons > 0
ORDER BY cohort_day, period"""


def cohort_sizes_sql(r: Retention, source: str = "flywheel.events_resolved") -> str:
    cohort = condition(r.cohort)
    first = period_sql(r, "min_ts")
    return f"""
SELECT {quote(r.name)} AS retention, {first} AS cohort_day, count() AS cohort_size
FROM (SELECT person_id, minIf(timestamp, {cohort}) AS min_ts, countIf({cohort}) AS c
      FROM {_events(source)} GROUP BY person_id)
WHERE c > 0
GROUP BY cohort_day
ORDER BY cohort_day"""


def active_users_sql(activity: Activity, source: str = "flywheel.events_resolved") -> str:
    """(day, dau, wau, mau, stickiness) for every day from the first to the last active day with mau > 0,
    over activity events."""
    active = f"(SELECT person_id, timestamp FROM {_events(source)} WHERE {activity_sql(activity)})"
    return f"""
SELECT day, dau, wau, mau, if(mau = 0, 0, dau / mau) AS stickiness
FROM (
    SELECT d AS day,
           uniqExactIf(person_id, dt = d) AS dau,
           uniqExactIf(person_id, dt > d - 7 AND dt <= d) AS wau,
           uniqExactIf(person_id, dt > d - 30 AND dt <= d) AS mau
    FROM (SELECT person_id, toDate(timestamp) AS dt FROM {active}) AS e
    CROSS JOIN (
        SELECT arrayJoin(arrayMap(x -> toDate(x), range(toUInt32(min(toDate(timestamp))),
                                                        toUInt32(max(toDate(timestamp))) + 1))) AS d
        FROM {active}
    ) AS days
    GROUP BY d
)
WHERE mau > 0
ORDER BY day"""


def lifecycle_sql(lifecycle: Lifecycle, activity: Activity, source: str = "flywheel.events_resolved") -> str:
    """(day, status, persons): per period (its first day), the persons new (first active period), returning
    (active in the previous period too), resurrecting (active, not in the previous period, but before it)
    and dormant (active in the previous period, not in this one) — over activity events."""
    per = period_sql(lifecycle, "timestamp")
    pd = lifecycle.period_days
    return f"""
SELECT day, status, count() AS persons
FROM (
    SELECT cell.1 AS day, cell.2 AS status
    FROM (
        SELECT groupUniqArray({per}) AS ps, min({per}) AS first
        FROM {_events(source)} WHERE {activity_sql(activity)}
        GROUP BY person_id
    )
    ARRAY JOIN arrayConcat(
        arrayMap(p -> (p, multiIf(p = first, 'new', has(ps, p - {pd}), 'returning', 'resurrecting')), ps),
        arrayMap(p -> (p + {pd}, 'dormant'), arrayFilter(p -> NOT has(ps, p + {pd}), ps))
    ) AS cell
)
GROUP BY day, status
ORDER BY day, status"""


def segment_members_sql(segment: Segment, metrics: Metrics, at_ms: int,
                        source: str = "flywheel.events_resolved") -> str:
    """The persons in `segment` at time `at_ms` (docs/design.md §9), from the non-late events up to then.
    Without a universe window, the universe is every person the stream holds a state for: one with an
    activity event, an event a definition's condition matches, or an identify call with a trait a segment
    reads."""
    ms = "toUnixTimestamp64Milli(timestamp)"

    def expr(c: Condition) -> str:
        if isinstance(c, Performed):
            n = f"countIf({condition(c.predicate)} AND {ms} > {at_ms - c.within_ms})"
            if c.negate:
                return f"({n} = 0)"
            return f"({n} {dict(gte='>=', lte='<=', eq='=')[c.op]} {c.n})"
        if isinstance(c, Trait):
            return (f"(argMaxIf({json_equals('traits', c.key, c.value)}, (timestamp, message_id), "
                    f"type = 'identify' AND JSONHas(traits, {quote(c.key)})) = 1)")
        return "(" + (" AND " if c.every else " OR ").join(expr(i) for i in c.items) + ")"

    if segment.universe is not None:
        universe = expr(segment.universe)
    else:
        known = [activity_sql(metrics.activity), *(condition(p) for p in metrics.predicates)]
        if metrics.trait_keys:
            keys = ", ".join(quote(k) for k in sorted(metrics.trait_keys))
            known.append(f"(type = 'identify' AND arrayExists(k -> JSONHas(traits, k), [{keys}]))")
        universe = f"(countIf({' OR '.join(known)}) > 0)"
    return f"""
SELECT person_id
FROM (
    SELECT person_id, {universe} AS universe, {expr(segment.condition)} AS member
    FROM (SELECT person_id, message_id, timestamp, type, event, properties, traits FROM {source}
          WHERE late = 0 AND {ms} <= {at_ms})
    GROUP BY person_id
)
WHERE universe AND member
ORDER BY person_id"""


def rfm_sql(order: Predicate, monetary: str, window_ms: int, at_ms: int,
            source: str = "flywheel.events_resolved") -> str:
    """(person_id, recency_days, frequency, monetary, r, f, m) at `at_ms` for every person with an order in
    the window, from the events, scored by global quintiles as metrics/rfm.py defines them."""
    ms = "toUnixTimestamp64Milli(timestamp)"
    amount = (f"if(JSONType(properties, {quote(monetary)}) IN ('Int64', 'UInt64', 'Double'), "
              f"JSONExtractFloat(properties, {quote(monetary)}), 0)")
    return rfm_scored_sql(f"""
    SELECT person_id, intDiv({at_ms} - max({ms}), 86400000) AS recency_days, count() AS frequency,
           round(sum({amount}), 6) AS monetary
    FROM (SELECT person_id, timestamp, type, event, properties FROM {source} WHERE late = 0)
    WHERE {condition(order)} AND {ms} > {at_ms - window_ms} AND {ms} <= {at_ms}
    GROUP BY person_id""")


def rfm_values_sql(at_ms: int) -> str:
    """The same from the summaries the stream published (flywheel.rfm_values): what the RFM leader scores,
    plus `user` (1 when the person id is a userId) as the last column."""
    return rfm_scored_sql(f"""
    SELECT person_id, intDiv({at_ms} - toUnixTimestamp64Milli(last_order), 86400000) AS recency_days, frequency,
           monetary, user
    FROM flywheel.rfm_values FINAL
    WHERE frequency > 0""", extra=", user")


def rfm_scored_sql(people: str, extra: str = "") -> str:
    """(person_id, recency_days, frequency, monetary, r, f, m) for `people` (person_id, recency_days,
    frequency, monetary): cut k is the value at rank ceil(k·n/5); a score is 1 + the cuts below (recency: 5 −)."""
    def cut_points(column: str) -> str:
        return "[" + ", ".join(f"{column}[greatest(1, intDiv({k} * n + 4, 5))]" for k in range(1, 5)) + "]"
    return f"""
WITH people AS ({people}
),
all_cuts AS (
    SELECT count() AS n, arraySort(groupArray(recency_days)) AS rs, arraySort(groupArray(frequency)) AS fs,
           arraySort(groupArray(monetary)) AS ms
    FROM people
)
SELECT person_id, recency_days, frequency, monetary,
       5 - arrayCount(c -> c < recency_days, {cut_points("rs")}) AS r,
       1 + arrayCount(c -> c < frequency, {cut_points("fs")}) AS f,
       1 + arrayCount(c -> c < monetary, {cut_points("ms")}) AS m{extra}
FROM people CROSS JOIN all_cuts
ORDER BY person_id"""


def _bucket(alert: Alert, column: str) -> str:
    """The start (epoch ms) of the alert's period holding `column`, as AlertSeries.period_of."""
    size, origin = alert.series.period_ms, MONDAY_MS if alert.series.period == "week" else 0
    return f"(intDiv(toUnixTimestamp64Milli({column}) - {origin}, {size}) * {size} + {origin})"


def alert_series_sql(alert: Alert, metrics: Metrics, start_ms: int, end_ms: int) -> str:
    """(period start ms, value, base) of an alert's series for the periods starting in [start_ms, end_ms),
    from the stored events (`flywheel alerts backtest`; metrics/alerts.py `history_points`): the count (base =
    the count), or a rate's numerator and denominator. Periods without a row had nothing."""
    s = alert.series
    day_ms = "toUInt64(toUnixTimestamp(toDateTime({})))* 1000"
    within = f"BETWEEN {start_ms} AND {end_ms - 1}"
    if s.kind == "events":
        where = [f"{_bucket(alert, 'timestamp')} {within}"]
        if s.event is not None:
            where.append(f"event = {quote(s.event)}")
        if s.source is not None:
            where.append(f"source = {quote(s.source)}")
        return (f"SELECT {_bucket(alert, 'timestamp')} AS p, count() AS v, count() AS b "
                f"FROM flywheel.events_resolved WHERE {' AND '.join(where)} GROUP BY p ORDER BY p")
    if s.kind == "invalid_rate":  # by arrival: an invalid event may have no usable timestamp
        source = f" AND source = {quote(s.source)}" if s.source is not None else ""
        return f"""
SELECT p, sum(bad) AS v, count() AS b
FROM (
    SELECT {_bucket(alert, 'received_at')} AS p, 1 AS bad FROM flywheel.invalid_events FINAL
    WHERE {_bucket(alert, 'received_at')} {within}{source}
    UNION ALL
    SELECT {_bucket(alert, 'received_at')} AS p, 0 AS bad FROM flywheel.events_resolved
    WHERE {_bucket(alert, 'received_at')} {within}{source}
)
GROUP BY p ORDER BY p"""
    if s.kind == "funnel":
        return (f"SELECT {day_ms.format('day')} AS p, sumIf(persons, step = {s.step}) AS v, "
                f"sumIf(persons, step = 1) AS b FROM ({funnel_sql(s.definition)}) "
                f"WHERE p {within} GROUP BY p ORDER BY p")
    if s.kind == "retention":
        r, n = s.definition, s.n
        return f"""
SELECT {day_ms.format(f'c.cohort_day + {n * r.period_days}')} AS p, r.persons AS v, c.cohort_size AS b
FROM ({cohort_sizes_sql(r)}) AS c
LEFT JOIN (SELECT cohort_day, persons FROM ({retention_sql(r)}) WHERE period = {n}) AS r ON r.cohort_day = c.cohort_day
WHERE p {within} ORDER BY p"""
    if s.kind == "active":  # persons active within the window ending on each day
        events = _events("flywheel.events_resolved")
        active = f"(SELECT person_id, timestamp FROM {events} WHERE {activity_sql(metrics.activity)})"
        first, last = start_ms // DAY_MS, -(-end_ms // DAY_MS)
        return f"""
SELECT {day_ms.format('d')} AS p, uniqExactIf(person_id, dt > d - {s.definition.days} AND dt <= d) AS v, v AS b
FROM (SELECT person_id, toDate(timestamp) AS dt FROM {active}) AS e
CROSS JOIN (SELECT arrayJoin(arrayMap(x -> toDate(x), range({first}, {last}))) AS d) AS days
GROUP BY d HAVING v > 0 AND p {within}
ORDER BY p"""
    # segment: members at each period's end, from the published changes
    size = s.period_ms
    return f"""
SELECT t AS p, countIf(last = 'entered') AS v, v AS b
FROM (
    SELECT ends.t AS t, c.person_id, argMax(c.change, c.kafka_offset) AS last
    FROM flywheel.segment_changes AS c
    CROSS JOIN (SELECT arrayJoin(range({alert.series.period_of(start_ms)}, {end_ms}, {size})) AS t) AS ends
    WHERE c.segment = {quote(s.segment)} AND toUnixTimestamp64Milli(c.at) < ends.t + {size}
    GROUP BY t, c.person_id
)
WHERE t {within}
GROUP BY t ORDER BY t"""


def experiment_stats_sql(experiment: Experiment, source: str = "flywheel.events_resolved") -> str:
    """(variation, metric, n, sy, syy, sx, sxx, sxy, sp, spp, spy, excluded) per variation and metric
    (docs/design.md §11, metrics/exposures.py): exposed persons by their first exposure (earliest by event
    time, messageId), the metric over their non-late events in (exposure, exposure + within], sums in
    millionths; p, CUPED's covariate, the same over [exposure − lookback, exposure). `excluded`: persons
    exposed to more than one variation (the same number on every row)."""
    e = experiment
    names = ", ".join(quote(name) for name, _ in e.variations)
    vp, xp = quote(e.variation_property), quote(e.experiment_property)
    ms = "toUnixTimestamp64Milli(ev.timestamp)"

    def part(p: Part, window: str) -> str:
        if p.property is None:
            return f"toInt64(countIf({condition(p.predicate)} AND {window}))"
        k = quote(p.property)
        micros = f"toInt64(round(JSONExtractFloat(ev.properties, {k}) * {MICROS}))"
        numeric = f"JSONType(ev.properties, {k}) IN ('Int64', 'UInt64', 'Double')"
        return f"toInt64(sumIf({micros}, {condition(p.predicate)} AND {numeric} AND {window}))"

    ys, xs, ps = [], [], []
    for m in e.metrics:
        window = f"{ms} > x.first_ms AND {ms} <= x.first_ms + {m.within_ms}"
        y = part(m.numerator, window)
        ys.append(f"toInt64({y} > 0)" if m.kind == "conversion" else y)
        xs.append(part(m.denominator, window) if m.denominator is not None else "toInt64(0)")
        lookback = e.cuped_for(m)
        p = part(m.numerator, f"{ms} >= x.first_ms - {lookback} AND {ms} < x.first_ms") if lookback else "toInt64(0)"
        ps.append(f"toInt64({p} > 0)" if m.kind == "conversion" else p)
    metric_names = ", ".join(quote(m.name) for m in e.metrics)
    return f"""
WITH exposed AS (
    SELECT person_id, toUnixTimestamp64Milli(argMin(timestamp, (timestamp, message_id))) AS first_ms,
           argMin(v, (timestamp, message_id)) AS variation, uniqExact(v) AS seen
    FROM (SELECT person_id, timestamp, message_id, JSONExtractString(properties, {vp}) AS v
          FROM {source}
          WHERE late = 0 AND type = 'track' AND event = {quote(e.exposure_event)}
            AND JSONType(properties, {xp}) = 'String' AND JSONExtractString(properties, {xp}) = {quote(e.experiment_id)}
            AND JSONType(properties, {vp}) = 'String' AND v IN ({names}))
    GROUP BY person_id
)
SELECT variation, [{metric_names}][m + 1] AS metric, count() AS n, sum(toInt256(y)) AS sy,
       sum(toInt256(y) * y) AS syy, sum(toInt256(xv)) AS sx, sum(toInt256(xv) * xv) AS sxx,
       sum(toInt256(xv) * y) AS sxy, sum(toInt256(pv)) AS sp, sum(toInt256(pv) * pv) AS spp,
       sum(toInt256(pv) * y) AS spy, (SELECT countIf(seen > 1) FROM exposed) AS excluded
FROM (
    SELECT x.person_id AS person_id, x.variation AS variation, [{", ".join(ys)}] AS ys, [{", ".join(xs)}] AS xs,
           [{", ".join(ps)}] AS ps
    FROM (SELECT * FROM exposed WHERE seen = 1) AS x
    INNER JOIN (SELECT person_id, timestamp, type, event, properties FROM {source} WHERE late = 0) AS ev
        ON ev.person_id = x.person_id
    GROUP BY x.person_id, x.variation
)
ARRAY JOIN ys AS y, xs AS xv, ps AS pv, range(length(ys)) AS m
GROUP BY variation, m
ORDER BY variation, metric"""
