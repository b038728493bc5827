-- lifecycle_partials in a shape Debian's ClickHouse 18.16 accepts (no LowCardinality, no DateTime64, no views).
CREATE TABLE IF NOT EXISTS flywheel.lifecycle_partials
(
    day Date, status String, kafka_partition UInt16, persons UInt64, version UInt64, correction String DEFAULT '',
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (status, day, kafka_partition);
