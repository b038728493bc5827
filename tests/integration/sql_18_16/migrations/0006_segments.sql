-- segment_changes in a shape Debian's ClickHouse 18.16 accepts (no LowCardinality, no DateTime64, no
-- views; `at` and `since` to the second).
CREATE TABLE IF NOT EXISTS flywheel.segment_changes
(
    segment String, version String, person_id String, user_id String, anonymous_id String,
    change Enum8('exited' = 1, 'entered' = 2), at DateTime, since DateTime, message_id String,
    kafka_partition UInt16, kafka_offset UInt64, inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (segment, person_id, at, change);
