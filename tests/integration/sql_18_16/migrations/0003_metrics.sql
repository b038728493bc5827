-- The metric partial tables in a shape Debian's ClickHouse 18.16 accepts (no LowCardinality, no
-- DateTime64, no views): the server transport test sinks them too.
CREATE TABLE IF NOT EXISTS flywheel.funnel_partials
(
    funnel String, day Date, step UInt8, kafka_partition UInt16, persons UInt64, version UInt64,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (funnel, day, step, kafka_partition);

CREATE TABLE IF NOT EXISTS flywheel.retention_partials
(
    retention String, cohort_day Date, period UInt8, kafka_partition UInt16, persons UInt64, version UInt64,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (retention, cohort_day, period, kafka_partition);

CREATE TABLE IF NOT EXISTS flywheel.active_user_partials
(
    day Date, kind String, kafka_partition UInt16, persons UInt64, version UInt64, inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (kind, day, kafka_partition);
