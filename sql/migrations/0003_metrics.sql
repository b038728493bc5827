-- Funnels, retention and active users (docs/design.md §4; README, "Querying"): per-partition partials from metrics.*, and the
-- analyst views over them.
--
-- Each row is the absolute count of persons, on one partition of events.identified, that count for one
-- cell; `version` grows with every publication of that (cell, partition). The value of a cell is the sum
-- over partitions of each partition's latest version: exact (a person lives on one partition) and safe
-- to re-publish (a replayed row has the same or an older version). The views compute argMax per
-- (cell, partition), so they are exact before ReplacingMergeTree merges, without FINAL.
CREATE TABLE IF NOT EXISTS flywheel.funnel_partials
(
    funnel           LowCardinality(String),
    day              Date COMMENT 'UTC day of the funnel''s first step',
    step             UInt8 COMMENT '1..N: persons whose level that day reached this step',
    kafka_partition  UInt16,
    persons          UInt64,
    version          UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (funnel, day, step, kafka_partition);

CREATE TABLE IF NOT EXISTS flywheel.retention_partials
(
    retention        LowCardinality(String),
    cohort_day       Date COMMENT 'first day of the cohort period (a Monday for weekly retention)',
    period           UInt8 COMMENT '0 = cohort size; n >= 1 = persons returning n periods later',
    kafka_partition  UInt16,
    persons          UInt64,
    version          UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (retention, cohort_day, period, kafka_partition);

CREATE TABLE IF NOT EXISTS flywheel.active_user_partials
(
    day              Date,
    kind             LowCardinality(String) COMMENT 'dau | wau (7 days ending on day) | mau (30 days)',
    kafka_partition  UInt16,
    persons          UInt64,
    version          UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (kind, day, kafka_partition);

-- Persons per funnel, day (of step 1) and step: windowFunnel(window, 'strict_once') per person and day.
CREATE OR REPLACE VIEW flywheel.funnel_daily AS
SELECT funnel, day, step, sum(persons) AS persons
FROM
(
    SELECT funnel, day, step, kafka_partition, argMax(persons, version) AS persons
    FROM flywheel.funnel_partials
    GROUP BY funnel, day, step, kafka_partition
)
GROUP BY funnel, day, step
HAVING persons > 0;

-- The same with conversion: from step 1, and from the previous step.
CREATE OR REPLACE VIEW flywheel.funnel_conversion AS
SELECT
    funnel, day, step, persons,
    first_value(persons) OVER w AS entered,
    persons / entered AS conversion,
    persons / lagInFrame(persons, 1, persons) OVER w AS step_conversion
FROM flywheel.funnel_daily
WINDOW w AS (PARTITION BY funnel, day ORDER BY step ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW);

-- Retention triangle: persons of each cohort returning `period` periods later (only periods with
-- returning persons have a row), with the cohort's size.
CREATE OR REPLACE VIEW flywheel.retention_daily AS
WITH cells AS
(
    SELECT retention, cohort_day, period, sum(persons) AS persons
    FROM
    (
        SELECT retention, cohort_day, period, kafka_partition, argMax(persons, version) AS persons
        FROM flywheel.retention_partials
        GROUP BY retention, cohort_day, period, kafka_partition
    )
    GROUP BY retention, cohort_day, period
)
SELECT r.retention AS retention, r.cohort_day AS cohort_day, r.period AS period, r.persons AS persons,
       s.persons AS cohort_size
FROM cells AS r
INNER JOIN (SELECT retention, cohort_day, persons FROM cells WHERE period = 0) AS s
    ON s.retention = r.retention AND s.cohort_day = r.cohort_day
WHERE r.period > 0 AND r.persons > 0;

-- DAU, WAU (7 days ending that day), MAU (30 days) and stickiness (DAU / MAU) per UTC day, up to the
-- last day anyone was active.
CREATE OR REPLACE VIEW flywheel.active_users_daily AS
WITH cells AS
(
    SELECT day, kind, sum(persons) AS persons
    FROM
    (
        SELECT day, kind, kafka_partition, argMax(persons, version) AS persons
        FROM flywheel.active_user_partials
        GROUP BY day, kind, kafka_partition
    )
    GROUP BY day, kind
)
SELECT day, sumIf(persons, kind = 'dau') AS dau, sumIf(persons, kind = 'wau') AS wau,
       sumIf(persons, kind = 'mau') AS mau, if(mau = 0, 0, dau / mau) AS stickiness
FROM cells
WHERE day <= (SELECT max(day) FROM cells WHERE kind = 'dau' AND persons > 0)
GROUP BY day
HAVING mau > 0;
