-- experiment_partials in a shape Debian's ClickHouse 18.16 accepts (no LowCardinality, no DateTime64, no
-- Int256: sums beyond 64 bits are refused there, and dead-lettered; no views).
CREATE TABLE IF NOT EXISTS flywheel.experiment_partials
(
    experiment String, variation String, metric String, kafka_partition UInt16, n UInt64, sy Int64, syy Int64,
    sx Int64, sxx Int64, sxy Int64, sp Int64, spp Int64, spy Int64, control UInt8, kind String, scale_y UInt32,
    scale_x UInt32, version UInt64, inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment, variation, metric, kafka_partition);
