-- RFM (docs/design.md §9): each person's summary as the stream last published it on segments.rfm — the
-- newest order in the window, frequency and monetary; frequency 0 once no order is left in the window.
-- The latest record per person wins (one person's records are on one partition, in order).
CREATE TABLE IF NOT EXISTS flywheel.rfm_values
(
    person_id        String,
    user             UInt8 COMMENT '1: the person id is a userId, else an anonymousId',
    last_order       Nullable(DateTime64(3, 'UTC')),
    frequency        UInt32,
    monetary         Float64,
    at               DateTime64(3, 'UTC') COMMENT 'the worker''s clock when the summary changed',
    kafka_partition  UInt16,
    kafka_offset     UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(kafka_offset)
ORDER BY person_id;
