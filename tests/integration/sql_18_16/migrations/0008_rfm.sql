-- rfm_values in a shape Debian's ClickHouse 18.16 accepts (no DateTime64; times to the second).
CREATE TABLE IF NOT EXISTS flywheel.rfm_values
(
    person_id String, user UInt8, last_order Nullable(DateTime), frequency UInt32, monetary Float64, at DateTime,
    kafka_partition UInt16, kafka_offset UInt64, inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(kafka_offset)
ORDER BY person_id;
