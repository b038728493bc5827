-- alert_events in a shape Debian's ClickHouse 18.16 accepts (no LowCardinality, no DateTime64, no views;
-- times to the second).
CREATE TABLE IF NOT EXISTS flywheel.alert_events
(
    alert String, version String, state Enum8('resolved' = 1, 'firing' = 2), idempotency_key String,
    period DateTime, period_end DateTime, since Nullable(DateTime), value Nullable(Float64), count Nullable(Float64),
    baseline Nullable(Float64), lower Nullable(Float64), upper Nullable(Float64), score Nullable(Float64),
    reason String, rule String, series String, decided_at DateTime, late UInt8, superseded UInt8,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (alert, idempotency_key);
