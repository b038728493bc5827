-- Lifecycle (the metrics file's `lifecycle:`; docs/design.md §4): persons per period by status, per
-- partition of events.identified; the view sums the latest version of each partition.
CREATE TABLE IF NOT EXISTS flywheel.lifecycle_partials
(
    day              Date COMMENT 'the period''s first day (a Monday for weekly periods)',
    status           LowCardinality(String) COMMENT 'new | returning | resurrecting | dormant',
    kafka_partition  UInt16,
    persons          UInt64,
    version          UInt64,
    correction       String DEFAULT '' COMMENT 'the forget request this row corrects for',
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (status, day, kafka_partition);

-- Per period: new (first active period), returning (active in the previous period too), resurrecting
-- (active, not in the previous period, but before it), dormant (active in the previous period, not in
-- this one); up to the last period anyone was active in.
CREATE OR REPLACE VIEW flywheel.lifecycle_daily AS
WITH cells AS
(
    SELECT day, status, sum(persons) AS persons
    FROM
    (
        SELECT day, status, kafka_partition, argMax(persons, version) AS persons
        FROM flywheel.lifecycle_partials
        GROUP BY day, status, kafka_partition
    )
    GROUP BY day, status
)
SELECT day, sumIf(persons, status = 'new') AS new, sumIf(persons, status = 'returning') AS returning,
       sumIf(persons, status = 'resurrecting') AS resurrecting, sumIf(persons, status = 'dormant') AS dormant
FROM cells
WHERE day <= (SELECT max(day) FROM cells WHERE status != 'dormant' AND persons > 0)
GROUP BY day
HAVING new + returning + resurrecting + dormant > 0
ORDER BY day;
